"""``oddaemon tensorboard``'s pure parts: which jobs become runs, TensorBoard's command line, the
daemon's answers read, and the words for a TensorBoard that would not start."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from oddaemon.cli.main import build_parser
from oddaemon.cli.tensorboard import (
    TensorBoardError,
    choose_runs,
    default_program,
    explain_exit,
    free_port,
    job_views,
    logdir_spec,
    parse_program,
    resolve,
    tensorboard_argv,
    url_of,
)


def view(name: str, model_dir: str, state: str = "running") -> dict:
    return {"name": name, "model_dir": model_dir, "state": state}


def test_the_command_line_names_each_job_as_a_group_of_runs_on_loopback():
    runs = [("effdet", "/srv/m/effdet"), ("ssd", "/srv/m/ssd:2")]
    argv = tensorboard_argv(default_program("/opt/venv/bin/python"), runs, 6123)
    assert argv == ["/opt/venv/bin/python", "-m", "tensorboard.main", "--logdir_spec",
                    "effdet:/srv/m/effdet,ssd:/srv/m/ssd:2", "--host", "127.0.0.1", "--port", "6123"]
    assert logdir_spec(runs[:1]) == "effdet:/srv/m/effdet"
    assert url_of("127.0.0.1", 6123) == "http://127.0.0.1:6123/"


def test_named_jobs_without_a_model_dir_are_an_error_naming_each():
    exists = {"/m/a"}.__contains__
    assert choose_runs([view("a", "/m/a")], ["a"], exists) == ([("a", "/m/a")], [])
    with pytest.raises(TensorBoardError) as err:
        choose_runs([view("a", "/m/a"), view("b", "/m/b", "queued"), view("c", "/m/c")], ["a", "b", "c"], exists)
    assert "job b: its model_dir /m/b does not exist yet" in str(err.value) and "job c:" in str(err.value)


def test_every_job_when_none_is_named_leaving_out_those_without_a_model_dir():
    exists = {"/m/a", "/m/c"}.__contains__
    runs, notes = choose_runs([view("a", "/m/a", "succeeded"), view("b", "/m/b", "queued"), view("c", "/m/c")],
                              [], exists)
    assert runs == [("a", "/m/a"), ("c", "/m/c")]
    assert notes == ["left out b (queued): its model_dir /m/b does not exist yet"]
    with pytest.raises(TensorBoardError, match="no job has a model_dir to show yet"):
        choose_runs([view("b", "/m/b", "queued")], [], exists)
    with pytest.raises(TensorBoardError, match="the daemon has no jobs"):
        choose_runs([], [], exists)


def test_a_comma_in_a_model_dir_cannot_be_said_to_tensorboard():
    with pytest.raises(TensorBoardError, match="has a ',' in it"):
        choose_runs([view("a", "/m/a,b")], ["a"], lambda _: True)


def test_job_views_asks_status_per_name_once_and_names_every_unknown_one():
    asked = []
    known = {"a": view("a", "/m/a"), "b": view("b", "/m/b")}

    def ask(payload):
        asked.append(payload)
        if payload["cmd"] == "list":
            return {"ok": True, "jobs": list(known.values())}
        job = known.get(payload["name"])
        return {"ok": True, "job": job} if job else {"ok": False, "error": "no job", "kind": "not_found"}

    assert [v["name"] for v in job_views(ask, ["b", "a", "b"])] == ["b", "a"]
    assert [p["name"] for p in asked] == ["b", "a"]
    assert [v["name"] for v in job_views(ask, [])] == ["a", "b"]
    with pytest.raises(TensorBoardError, match=r"no job named 'x', 'y' \(see `oddaemon list`\)"):
        job_views(ask, ["x", "a", "y"])
    with pytest.raises(TensorBoardError) as err:
        job_views(lambda p: {"ok": False, "error": "permission denied", "kind": "denied"}, ["a"])
    assert err.value.status == 1


def test_the_program_is_a_command_line_and_its_first_word_must_run(tmp_path):
    assert parse_program("/opt/tb/bin/python -m tensorboard.main") == ["/opt/tb/bin/python", "-m", "tensorboard.main"]
    with pytest.raises(TensorBoardError, match="empty"):
        parse_program("  ")
    assert resolve([sys.executable, "-m", "x"]) == [os.path.abspath(sys.executable), "-m", "x"]
    assert resolve(["sh"])[0].endswith("/sh")
    with pytest.raises(TensorBoardError, match="cannot run /nonexistent/python: no such executable"):
        resolve(["/nonexistent/python"])
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(TensorBoardError, match="not executable"):
        resolve([str(plain)])
    with pytest.raises(TensorBoardError, match="no such executable"):
        resolve(["no-such-program-oddaemon"])


def test_a_missing_tensorboard_module_names_the_interpreter_tried():
    out = "/usr/bin/python3: No module named tensorboard\n"
    text = explain_exit(["/usr/bin/python3", "-m", "tensorboard.main"], 1, out, default=True)
    assert text.startswith("tensorboard is not installed for /usr/bin/python3 (the workers' interpreter, "
                           "[worker] python)"), text
    assert "--tensorboard" in text
    other = explain_exit(["/opt/tb"], 2, "a\nE0101 TensorBoard could not bind to port 6006\n", default=False)
    assert other.startswith("TensorBoard (/opt/tb) exited with status 2 before it answered:")
    assert other.endswith("could not bind to port 6006")


def test_the_cli_parses_names_port_and_program():
    args = build_parser().parse_args(["tensorboard", "a", "b", "--port", "7000", "--tensorboard", "tb --x"])
    assert (args.command, args.names, args.port, args.tensorboard) == ("tensorboard", ["a", "b"], 7000, "tb --x")
    args = build_parser().parse_args(["tensorboard"])
    assert (args.names, args.port, args.tensorboard, args.verbose) == ([], 0, None, False)


def test_a_given_port_must_be_free_and_none_given_picks_one():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TensorBoardError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            free_port(port)
    assert 0 < free_port() < 65536
