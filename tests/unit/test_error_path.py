"""One typed error path: every kind becomes the same text, wire reply and D-Bus error name; a refusal
from the scheduler keeps its kind through ``Commands`` to the control socket's reply and the CLI's exit status."""

from __future__ import annotations

import json
import os
import socket

import pytest

from oddaemon.adapters.control import ControlServer, DaemonForbidden, DaemonUnreachable
from oddaemon.adapters.loop import SelectLoop
from oddaemon.cli import main as cli_main
from oddaemon.cli.dbus_client import ClientError
from oddaemon.cli.exit_codes import EXIT_REFUSED, EXIT_UNREACHABLE
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config
from oddaemon.core.errors import (
    CommandError,
    ConfigError,
    ErrorKind,
    OperationError,
    dbus_error_name,
    error_kind,
    error_reply,
    kind_of_dbus_error,
    kind_of_reply,
    user_message,
)
from oddaemon.core.jobspec import EvalOptions, JobSpec, TrainOptions
from oddaemon.service import dbus_service
from oddaemon.service.commands import Commands, DaemonPort
from oddaemon.service.intake import Verdict

# the D-Bus error names are an interface (docs, scripts): written out here, not taken from the code
DBUS_NAMES = {
    ErrorKind.NOT_FOUND: "io.github.oddaemon1.Error.NotFound",
    ErrorKind.INVALID: "io.github.oddaemon1.Error.Invalid",
    ErrorKind.REFUSED: "io.github.oddaemon1.Error.Refused",
    ErrorKind.DENIED: "org.freedesktop.DBus.Error.AccessDenied",
    ErrorKind.UNAVAILABLE: "io.github.oddaemon1.Error.Unavailable",
    ErrorKind.INTERNAL: "io.github.oddaemon1.Error.Internal",
}


# ---- the conversion point ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(ErrorKind))
def test_each_kind_has_one_text_one_wire_form_and_one_dbus_name(kind):
    exc = CommandError(kind, f"something {kind.value} happened")
    assert user_message(exc) == f"something {kind.value} happened"
    assert error_kind(exc) is kind
    assert error_reply(exc) == {"ok": False, "error": f"something {kind.value} happened", "kind": kind.value}
    assert dbus_error_name(kind) == DBUS_NAMES[kind]
    assert kind_of_dbus_error(DBUS_NAMES[kind]) is kind
    assert kind_of_reply(error_reply(exc)) is kind
    # the daemon's D-Bus error and the client's view of it
    sent = dbus_service.dbus_error(exc)
    assert type(sent).__name__ == DBUS_NAMES[kind] and str(sent) == f"something {kind.value} happened"
    received = ClientError(DBUS_NAMES[kind], str(sent))
    assert received.kind is kind and error_reply(received) == error_reply(exc)


def test_the_kinds_of_exceptions_that_are_not_commands():
    assert error_kind(ConfigError("/etc/o.toml", ["bad key"])) is ErrorKind.INVALID
    assert error_kind(OperationError("/x", "write", "disk full")) is ErrorKind.INTERNAL
    assert error_kind(DaemonUnreachable("no answer on /s")) is ErrorKind.UNAVAILABLE
    assert error_kind(DaemonForbidden("permission denied on /s")) is ErrorKind.DENIED
    broken = RuntimeError("the fake broke")
    assert error_kind(broken) is ErrorKind.INTERNAL
    assert error_reply(broken, logged=True) == {
        "ok": False, "error": "internal error: RuntimeError: the fake broke (details in the daemon log)",
        "kind": "internal"}
    assert str(dbus_service.dbus_error(broken, logged=True)) == \
        "internal error: RuntimeError: the fake broke (details in the daemon log)"
    assert kind_of_dbus_error("org.freedesktop.DBus.Error.InvalidArgs") is ErrorKind.INTERNAL
    assert kind_of_reply({"ok": False, "error": "from an older daemon"}) is ErrorKind.REFUSED
    assert kind_of_reply({"ok": False, "error": "x", "kind": "no-such-kind"}) is ErrorKind.INTERNAL


def test_the_scheduler_says_which_refusals_are_about_a_missing_job():
    state, _ = sch.step(sch.State(inventory=()), sch.Submit(spec("a"), token="/spool/new/a.toml"), 0.0)
    _, actions = sch.step(state, sch.Cancel("ghost"), 1.0)
    assert [a for a in actions if isinstance(a, sch.Refused)] == [sch.Refused("no job named 'ghost'", ErrorKind.NOT_FOUND)]
    _, actions = sch.step(state, sch.Retry("a"), 1.0)
    refused = [a for a in actions if isinstance(a, sch.Refused)]
    assert [(r.kind, r.reason) for r in refused] == \
        [(ErrorKind.REFUSED, "job 'a' is running; only failed or cancelled jobs can be retried")]
    _, actions = sch.step(state, sch.Submit(spec("a"), token="/spool/new/a2.toml"), 1.0)
    assert [r.kind for r in actions if isinstance(r, sch.Rejected)] == [ErrorKind.REFUSED]


# ---- Commands on a fake daemon, through the control socket -----------------------------------------
def spec(name: str) -> JobSpec:
    return JobSpec(name=name, pipeline_config="/srv/p.config", model_dir=f"/srv/models/{name}",
                   train=TrainOptions(), eval=EvalOptions(enabled=False))


class FakeSpool:
    def __init__(self):
        self.delivered: list[tuple[bytes, str]] = []

    def deliver(self, data: bytes, name: str) -> str:
        self.delivered.append((data, name))
        return f"/spool/new/{name}"


class FakeIntake:
    def verdict_within(self, path: str, timeout: float) -> Verdict | None:
        return None


class FakeDaemon:
    """``DaemonPort`` with the real scheduler: a finished job "done", a running job "busy"."""

    def __init__(self):
        self.config = Config(path=None)
        self.spool = FakeSpool()
        self.intake_ = FakeIntake()
        self.state = sch.State(inventory=())
        for name in ("done", "busy"):
            self.state, _ = sch.step(self.state, sch.Submit(spec(name), token=f"/spool/new/{name}.toml"), 0.0)
        self.state, _ = sch.step(self.state, sch.ProcessExited("done", 1, 0), 1.0)

    def intake(self, path: str) -> Verdict | None:
        return Verdict(False, "", f"Job file '{os.path.basename(path)}' was rejected: missing required key 'name'")

    def dispatch(self, event: sch.Event) -> list[sch.Action]:
        self.state, actions = sch.step(self.state, event, 2.0)
        return actions

    def views(self) -> list[dict]:
        return [self.view(name) for name in self.state.jobs]

    def view(self, name: str) -> dict:
        return {"name": name, "state": self.state.jobs[name].state.value}

    def gpu_holders(self) -> dict[int, tuple[str, str]]:
        return {}

    def heavy_modules_loaded(self) -> list[str]:
        return []

    def reload(self) -> None:
        raise RuntimeError("reload broke")


def test_the_daemon_has_every_method_commands_uses():
    from oddaemon.service.daemon import Daemon  # noqa: PLC0415 - the daemon itself, only here

    methods = [name for name, member in vars(DaemonPort).items()
               if callable(member) and not name.startswith("_") and not isinstance(member, property)]
    assert methods == ["intake", "dispatch", "views", "view", "gpu_holders", "heavy_modules_loaded", "reload"]
    assert [name for name in methods if not callable(getattr(Daemon, name, None))] == []
    assert isinstance(FakeDaemon(), DaemonPort)


def test_a_command_failure_reaches_the_control_socket_reply_with_its_kind(tmp_path):
    commands = Commands(FakeDaemon())
    requests = {
        "ghost": {"cmd": "cancel", "name": "ghost"},
        "finished": {"cmd": "cancel", "name": "done"},
        "running": {"cmd": "retry", "name": "busy"},
        "status": {"cmd": "status", "name": "ghost"},
        "nameless": {"cmd": "status"},
        "unknown": {"cmd": "frobnicate", "name": "done"},
        "submit": {"cmd": "submit", "text": "x = 1\n", "filename": "x.toml"},
        "reload": {"cmd": "reload"},
        "fine": {"cmd": "status", "name": "busy"},
    }
    replies = ask_control_socket(str(tmp_path / "control.sock"), commands, requests)
    assert replies["ghost"] == {"ok": False, "error": "no job named 'ghost'", "kind": "not_found"}
    assert replies["finished"] == {"ok": False, "error": "job 'done' is already succeeded", "kind": "refused"}
    assert replies["running"] == {"ok": False, "kind": "refused",
                                  "error": "job 'busy' is running; only failed or cancelled jobs can be retried"}
    assert replies["status"] == {"ok": False, "error": "no job named 'ghost'", "kind": "not_found"}
    assert replies["nameless"] == {"ok": False, "error": "'status' needs a job name", "kind": "invalid"}
    assert replies["unknown"] == {"ok": False, "error": "unknown command 'frobnicate'", "kind": "invalid"}
    assert replies["submit"]["kind"] == "invalid" and "missing required key 'name'" in replies["submit"]["error"]
    assert replies["reload"] == {"ok": False, "kind": "internal",
                                 "error": "internal error: RuntimeError: reload broke (details in the daemon log)"}
    assert replies["fine"] == {"ok": True, "job": {"name": "busy", "state": "running"}}
    assert replies["not json"] == {"ok": False, "kind": "invalid",
                                   "error": "bad request: Expecting value: line 1 column 1 (char 0)"}


def ask_control_socket(path: str, commands: Commands, requests: dict[str, dict]) -> dict[str, dict]:
    """Each request on its own connection to a real ``ControlServer``; the loop runs until every
    reply has come (or a generous deadline)."""
    loop = SelectLoop()
    server = ControlServer(path, loop, commands.handle_request)
    lines = {label: (json.dumps(r) + "\n").encode() for label, r in requests.items()}
    lines["not json"] = b"not json\n"
    pending: dict[int, tuple[str, socket.socket]] = {}
    replies: dict[str, dict] = {}
    for label, line in lines.items():
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.sendall(line)
        pending[client.fileno()] = (label, client)

    def make_reader(fd: int):
        def on_reply() -> None:
            label, client = pending[fd]
            client.settimeout(30)
            data = b""
            while not data.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            replies[label] = json.loads(data)
            loop.remove(handles.pop(fd))
            client.close()
            if not handles:
                loop.stop()
        return on_reply

    handles = {fd: loop.add_reader(fd, make_reader(fd)) for fd in list(pending)}
    deadline = loop.call_later(60, loop.stop)
    try:
        loop.run()
    finally:
        loop.remove(deadline)
        server.close()
        loop.close()
    assert set(replies) == set(lines), f"no reply to {set(lines) - set(replies)}"
    return replies


# ---- the CLI: exit status by the reply's kind ------------------------------------------------------
@pytest.mark.parametrize(("reply", "status"), [
    ({"ok": False, "error": "no job named 'ghost'", "kind": "not_found"}, EXIT_REFUSED),
    ({"ok": False, "error": "job 'a' is already succeeded", "kind": "refused"}, EXIT_REFUSED),
    ({"ok": False, "error": "Cancel is only for root", "kind": "denied"}, EXIT_REFUSED),
    ({"ok": False, "error": "the daemon went away", "kind": "unavailable"}, EXIT_UNREACHABLE),
    ({"ok": False, "error": "from an older daemon"}, EXIT_REFUSED),
])
def test_the_cli_prints_the_error_and_exits_by_its_kind(monkeypatch, capsys, reply, status):
    asked = []
    monkeypatch.setattr(cli_main, "ask_daemon", lambda config, payload: asked.append(payload) or reply)
    monkeypatch.setenv("ODDAEMON_CONFIG", os.devnull)
    monkeypatch.setattr(cli_main, "load_config", lambda path: Config(path=path))
    assert cli_main.main(["cancel", "ghost"]) == status
    assert asked == [{"cmd": "cancel", "name": "ghost"}]
    assert capsys.readouterr().err == f"oddaemon: {reply['error']}\n"
