"""What keeps ``oddaemon list`` and ``status`` fast, as behaviour (the figures are ``bench/cli``'s): the
control commands load nothing heavy, read two settings exactly as the full configuration reader
would, ask for the table's columns only, and a finished job's view is built once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from oddaemon.cli.control_settings import ControlSettings, control_settings
from oddaemon.cli.render import format_list
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config, load_config
from oddaemon.core.errors import ConfigError
from oddaemon.core.evalbook import EvalBook, EvalPolicy
from oddaemon.core.jobspec import EvalOptions, JobSpec, TrainOptions
from oddaemon.core.views import LIST_COLUMNS, FinishedViews, job_view, list_row
from oddaemon.service.commands import Commands

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("gi", "pydbus", "prometheus_client", "tensorflow", "oddaemon.service", "oddaemon.core.config",
         "oddaemon.core.job_validation", "oddaemon.core.evalbook", "oddaemon.adapters.loop", "oddaemon.cli.follow",
         "oddaemon.cli.dbus_client",
         # dataclasses imports inspect (5 ms); the cgroup usage lines are imported only for a status that has some
         "oddaemon.core.resources", "oddaemon.core.checks", "dataclasses", "inspect")

# In a fresh interpreter: a fake daemon on the control socket (a thread: socket and json only), the
# CLI's main() for one command, then which heavy modules the process holds and what was asked.
CLIENT = r"""
import json, os, socket, sys, threading
state, argv, reply = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
os.makedirs(state, exist_ok=True)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(os.path.join(state, "control.sock"))
server.listen(1)
asked = []
def serve():
    conn, _ = server.accept()
    data = b""
    while not data.endswith(b"\n"):
        data += conn.recv(65536)
    asked.append(json.loads(data))
    conn.sendall(reply.encode() + b"\n")
    conn.close()
threading.Thread(target=serve, daemon=True).start()
from oddaemon.cli.main import main
status = main(argv)
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in json.loads(sys.argv[4])))
print("RESULT " + json.dumps({"status": status, "heavy": heavy, "asked": asked}))
"""

ROW = {"name": "cats", "state": "running", "reason": "started", "wants_gpus": 0, "gpus": [], "queue_position": None,
       "step": 10, "target_steps": 20, "progress": 0.5, "eta_seconds": 4.0}


def run_cli(tmp_path, bus: str, argv: list[str], reply: dict) -> tuple[dict, str]:
    config = tmp_path / "oddaemon.toml"
    config.write_text(f'[paths]\nstate_dir = "state"\n[daemon]\ndbus = "{bus}"\n')
    out = subprocess.run([sys.executable, "-c", CLIENT, str(tmp_path / "state"), json.dumps(["-c", str(config), *argv]),
                          json.dumps(reply), json.dumps(HEAVY)],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={k: v for k, v in os.environ.items() if k != "ODDAEMON_DBUS_BUS"})
    result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert result is not None, out.stderr
    return json.loads(result[len("RESULT "):]), out.stdout


@pytest.mark.parametrize("bus", ["none", "system"])
def test_list_asks_for_the_table_only_and_loads_nothing_heavy(tmp_path, bus):
    reply = {"ok": True, "jobs": [ROW], "gpus": [], "free_gpus": [], "queue": []}
    result, printed = run_cli(tmp_path, bus, ["list"], reply)
    assert result["status"] == 0
    assert result["asked"] == [{"cmd": "list", "brief": True}]
    assert result["heavy"] == []  # a config naming the system bus too: the socket answered, D-Bus never loaded
    assert "cats" in printed and "running" in printed and "10/20" in printed


def test_status_loads_nothing_heavy(tmp_path):
    job = {**ROW, "priority": 0, "attempt": 1, "restarts": 0, "last_exit": None, "losses": {}, "learning_rate": None,
           "steps_per_second": None, "model_dir": "/m", "train_log": "/l", "history": [],
           "evaluation": {"enabled": False}}
    result, printed = run_cli(tmp_path, "system", ["status", "cats"], {"ok": True, "job": job})
    assert (result["status"], result["heavy"]) == (0, [])
    assert result["asked"] == [{"cmd": "status", "name": "cats"}]
    assert printed.startswith("cats: running")


def test_an_error_reply_keeps_its_exit_status_without_loading_anything_heavy(tmp_path):
    result, _ = run_cli(tmp_path, "none", ["cancel", "ghost"],
                        {"ok": False, "error": "no job named 'ghost'", "kind": "not_found"})
    assert (result["status"], result["heavy"]) == (1, [])


# ---- the two settings, as the full reader has them
def test_the_settings_are_the_full_configurations(tmp_path):
    path = tmp_path / "oddaemon.toml"
    path.write_text('[paths]\nstate_dir = "../elsewhere/state"\n[daemon]\ndbus = "session"\n[gpus]\ndevices = "none"\n')
    full, lean = load_config(str(path)), control_settings(str(path))
    assert isinstance(lean, ControlSettings)
    assert (lean.state_dir, lean.dbus_bus) == (full.state_dir, full.dbus_bus)
    path.write_text("")
    full, lean = load_config(str(path)), control_settings(str(path))
    assert (lean.state_dir, lean.dbus_bus) == (full.state_dir, full.dbus_bus) == (Config.state_dir, Config.dbus_bus)
    none = control_settings(None)
    assert (none.state_dir, none.dbus_bus) == (Config.state_dir, Config.dbus_bus)


@pytest.mark.parametrize("text", ['[paths]\nstate_dir = ""\n', '[daemon]\ndbus = "carrier pigeon"\n',
                                  "[paths\n", 'paths = "x"\n'])
def test_a_wrong_setting_gets_the_full_readers_error(tmp_path, text):
    path = tmp_path / "oddaemon.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as full:
        load_config(str(path))
    with pytest.raises(ConfigError) as lean:
        control_settings(str(path))
    assert str(lean.value) == str(full.value) and str(path) in str(lean.value)


def test_an_unreadable_config_file_is_the_full_readers_error(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as lean:
        control_settings(missing)
    assert missing in str(lean.value)


# ---- the daemon's side: brief rows, kept views of finished jobs
def spec(name: str) -> JobSpec:
    return JobSpec(name=name, pipeline_config="/srv/p.config", model_dir=f"/srv/models/{name}",
                   train=TrainOptions(), eval=EvalOptions(enabled=False))


class Progress:
    def __init__(self, step: int):
        self.step = step

    def view(self) -> dict:
        return {"step": self.step, "target_steps": 20, "progress": self.step / 20, "steps_per_second": 2.0,
                "eta_seconds": (20 - self.step) / 2.0, "losses": {"total_loss": 0.5}, "learning_rate": 0.01,
                "updated_at": 5.0, "loss_history": [[self.step, 0.5]], "eval_by_step": {}}


class RowsDaemon:
    """What ``Commands``' list needs of the daemon: a finished job and a running one."""

    def __init__(self):
        self.state = sch.State(inventory=())
        for name in ("done", "busy", "waiting"):
            self.state, _ = sch.step(self.state, sch.Submit(spec(name), token=f"/spool/new/{name}.toml"), 0.0)
        self.state, _ = sch.step(self.state, sch.ProcessExited("done", 1, 0), 1.0)
        self.progress = {"done": Progress(20), "busy": Progress(10)}

    def views(self, shown: int = 20) -> list[dict]:
        return [job_view(job, self.progress.get(job.name), self.state.queue_position(job.name), f"/l/{job.name}",
                         None, shown) for job in self.state.jobs.values()]


def test_the_brief_list_is_the_tables_columns_and_renders_the_same():
    daemon = RowsDaemon()
    commands = Commands(daemon)
    brief = commands.handle_request({"cmd": "list", "brief": True})
    full = commands.handle_request({"cmd": "list"})
    assert [sorted(row) for row in brief["jobs"]] == [sorted(LIST_COLUMNS)] * 3
    assert [list_row(view) for view in full["jobs"]] == brief["jobs"]
    assert {k: v for k, v in brief.items() if k != "jobs"} == {k: v for k, v in full.items() if k != "jobs"}
    assert format_list(brief) == format_list(full)
    assert "done" in format_list(brief) and "waiting" in format_list(brief)


def test_a_finished_jobs_view_is_built_once_until_what_it_shows_changes():
    daemon = RowsDaemon()
    views = FinishedViews()
    done, busy = daemon.state.jobs["done"], daemon.state.jobs["busy"]
    assert done.state.value == "succeeded" and busy.state.value == "running"
    first = views.job_view(done, daemon.progress["done"], None, "/l/done")
    assert views.job_view(done, daemon.progress["done"], None, "/l/done") is first
    assert views.job_view(busy, daemon.progress["busy"], None, "/l/busy") is not views.job_view(busy, daemon.progress["busy"],
                                                                                     None, "/l/busy")
    # what it is made from changes: the progress, the log path, the book, the job itself
    daemon.progress["done"].step = 19
    changed = views.job_view(done, daemon.progress["done"], None, "/l/done")
    assert changed is not first and changed["step"] == 19
    assert views.job_view(done, daemon.progress["done"], None, "/elsewhere")["train_log"] == "/elsewhere"
    book = EvalBook(EvalPolicy())
    with_book = views.job_view(done, daemon.progress["done"], None, "/l/done", book)
    assert with_book["evaluation"]["total"] == 0
    book.add(1, "/srv/models/done/ckpt-1", 2.0)
    assert views.job_view(done, daemon.progress["done"], None, "/l/done", book)["evaluation"]["total"] == 1
    renamed = dataclasses.replace(done, reason="finished, and said so again")  # a new Job: every change is one
    assert views.job_view(renamed, daemon.progress["done"], None, "/l/done", book)["reason"] == "finished, and said so again"


def test_a_kept_view_is_escaped_like_a_new_one():
    state, _ = sch.step(sch.State(inventory=()), sch.Submit(spec("esc"), token="/spool/new/esc.toml"), 0.0)
    state, _ = sch.step(state, sch.ProcessExited("esc", 1, 0), 1.0)
    job = state.jobs["esc"]
    for _ in range(2):
        view = job_view(job, None, None, "/l/\x1b[31mred")
        assert view["train_log"] == "/l/\\x1b[31mred"
