"""The CLI's control-socket commands (``oddaemon.cli.main.main``) against an in-process daemon: the
CLI runs in a thread, this thread turns the daemon's fake loop until it has its answer. What it
prints and its exit status, checked against the job the test gave the daemon."""

from __future__ import annotations

import json
import threading

from oddaemon.cli.main import main
from oddaemon.core import scheduler as sch
from tests.support.harness import wait_for
from tests.support.inprocess import job_spec


def run_cli(loop, env, *args: str) -> int:
    """``oddaemon -c CONFIG ARGS...`` in a thread while the loop serves the control socket."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(["-c", env.config_path, *args])), daemon=True)
    thread.start()

    def answered():
        loop.turn(0.05)
        return not thread.is_alive()

    wait_for(answered, 30, 0, what=f"oddaemon {' '.join(args)} to finish")
    return result[0]


def test_status_json_is_the_daemons_view_of_the_job(started, capsys):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    assert run_cli(loop, env, "status", "cats", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["name"], printed["state"], printed["attempt"]) == ("cats", "running", 1)
    assert printed["model_dir"] == f"{env.models}/cats"


def test_list_names_each_job_with_its_state(started, capsys):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env, "cats")))
    daemon.dispatch(sch.Submit(job_spec(env, "dogs")))
    assert run_cli(loop, env, "list", "--json") == 0
    assert [(v["name"], v["state"]) for v in json.loads(capsys.readouterr().out)] == [
        ("cats", "running"), ("dogs", "queued")]


def test_cancel_stops_the_worker_and_an_unknown_job_is_refused_with_exit_status_1(started, capsys):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    assert run_cli(loop, env, "cancel", "cats") == 0
    assert capsys.readouterr().out == "cats: stopping\n"
    assert [(name, role) for name, role, _, _ in executor.stops] == [("cats", "train")]
    assert run_cli(loop, env, "status", "nosuchjob") == 1
    err = capsys.readouterr().err
    assert err.startswith("oddaemon: ") and "nosuchjob" in err
