"""The D-Bus API on a private bus: every method, property and signal, errors with their D-Bus
names and messages. A recording fake Commands serves most tests; the last one runs the real
daemon (needs the daemon glue that publishes the service)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pytest

try:
    import gi

    gi.require_version("Gio", "2.0")
    import pydbus  # noqa: F401
except (ImportError, ValueError):
    pytest.skip("PyGObject and pydbus are needed for the D-Bus tests", allow_module_level=True)

from gi.repository import Gio, GLib

from oddaemon.adapters import dbus_bus as bus
from oddaemon.cli import dbus_client as dc
from oddaemon.core.errors import CommandError, ErrorKind
from oddaemon.service import dbus_service as ds


def view(name, state, **extra):
    base = {"name": name, "state": state, "reason": "submitted", "priority": 0, "wants_gpus": "auto", "gpus": [],
            "queue_position": None, "attempt": 0, "restarts": 0, "last_exit": None, "submitted_at": 1700000000.5,
            "started_at": None, "finished_at": None, "retry_at": None, "model_dir": f"/srv/m/{name}",
            "pipeline_config": "/srv/p.config", "train_log": f"/var/log/oddaemon/jobs/{name}/train.log",
            "history": [{"time": 1700000000.5, "state": "queued", "reason": "submitted"}],
            "step": None, "target_steps": 100, "progress": None, "steps_per_second": None, "eta_seconds": None,
            "losses": {}, "learning_rate": None, "updated_at": None,
            "evaluation": {"enabled": True, "metric": "DetectionBoxes_Precision/mAP", "best": None,
                           "checkpoints": [{"n": 1, "metrics": {"DetectionBoxes_Precision/mAP@.50IOU": 0.5},
                                            "error": None}], "counts": {}},
            "sparse": [1, None, 3]}
    base.update(extra)
    return base


class FakeCommands:
    """Records every call; behaves like Commands (refusals raise CommandError with its messages)."""

    version = "9.8.7"

    def __init__(self):
        self.calls: list[tuple] = []
        self.jobs = {
            "effdet": view("effdet", "running", gpus=[0], wants_gpus=1, step=1200, progress=0.12,
                           losses={"loss/total": 0.75, "loss/cls": 0.25}, learning_rate=0.08, started_at=1700000100.0),
            "waiting": view("waiting", "queued", queue_position=1, wants_gpus=[1, 2]),
            "done": view("done", "succeeded", finished_at=1700000200.0, last_exit="exit 0"),
        }
        self.holders = {0: "effdet"}
        self.explode = False

    def _record(self, *call):
        self.calls.append(call)
        if self.explode:
            raise RuntimeError("the fake broke")

    def list_jobs(self):
        self._record("list_jobs")
        return [dict(v) for v in self.jobs.values()]

    def get_job(self, name):
        self._record("get_job", name)
        if name not in self.jobs:
            raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")
        return dict(self.jobs[name])

    def submit_text(self, text, filename="submitted.toml"):
        self._record("submit_text", text if isinstance(text, str) else text.decode(), filename)
        text = text if isinstance(text, str) else text.decode()
        if "num_clases" in text:
            raise CommandError(ErrorKind.INVALID,
                               f"Job file '{filename}' was rejected because it is not a valid oddaemon job spec; "
                               "nothing was queued.\n1 problem:\n  - unknown key 'num_clases' in [pipeline]; "
                               "did you mean 'num_classes'?")
        name = filename.removesuffix(".toml")
        self.jobs[name] = view(name, "queued", queue_position=2)
        return {"name": name, "state": "queued", "queue_position": 2}

    def submit_file(self, path):
        self._record("submit_file", path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CommandError(ErrorKind.INVALID, f"cannot read {path}: {exc.strerror}") from None
        return self.submit_text(data, os.path.basename(path))

    def cancel(self, name):
        self._record("cancel", name)
        if name not in self.jobs:
            raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")
        if self.jobs[name]["state"] == "succeeded":
            raise CommandError(ErrorKind.REFUSED, f"job '{name}' is already succeeded")
        self.jobs[name]["state"] = "stopping"
        return "stopping"

    def finish(self, name):
        self._record("finish", name)
        if name not in self.jobs:
            raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")
        if self.jobs[name]["state"] != "running":
            raise CommandError(ErrorKind.REFUSED, f"job '{name}' is already {self.jobs[name]['state']}")
        self.jobs[name]["state"] = "stopping"
        return "stopping"

    def set_priority(self, name, priority):
        self._record("set_priority", name, priority)
        if name not in self.jobs:
            raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")
        return {"state": self.jobs[name]["state"], "priority": priority, "queue_position": 1}

    def retry(self, name):
        self._record("retry", name)
        if name not in self.jobs:
            raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")
        raise CommandError(ErrorKind.REFUSED,
                           f"job '{name}' is {self.jobs[name]['state']}; only failed or cancelled jobs can be retried")

    def reload(self):
        self._record("reload")

    def queue_length(self):
        return sum(1 for v in self.jobs.values() if v["state"] == "queued")

    def gpus(self):
        return {"total": [0, 1], "free": [g for g in (0, 1) if g not in self.holders], "holders": dict(self.holders)}


class SignalRecorder:
    """Collects the service's signals on its own connection and main context."""

    def __init__(self, address: str):
        self.ctx = GLib.MainContext.new()
        self.ctx.push_thread_default()
        try:
            self.con = bus.open_connection(address)
            self.received: list[tuple[str, str, tuple]] = []
            self.con.signal_subscribe(None, None, None, bus.OBJECT_PATH, None, Gio.DBusSignalFlags.NONE, self._on)
        finally:
            self.ctx.pop_thread_default()
        # A round trip after AddMatch: the bus has installed the match rule when it returns.
        self.con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId",
                           None, None, 0, 5000, None)

    def _on(self, _con, _sender, _path, iface, member, params):
        self.received.append((iface, member, params.unpack()))

    def wait(self, member: str, count: int = 1, timeout: float = 10.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while True:
            while self.ctx.iteration(False):
                pass
            got = [args for _i, m, args in self.received if m == member]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def close(self):
        self.con.close_sync(None)


@pytest.fixture
def served(bus_address):
    """A Service for a FakeCommands, served by a GLib main loop on a thread."""
    fake = FakeCommands()
    service = ds.publish(fake, bus=bus_address)
    assert service is not None
    loop = GLib.MainLoop()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    client = dc.Client.connect(bus_address)
    yield fake, service, client
    client.close()
    loop.quit()
    thread.join(10)
    service.unpublish()


def raw_call(address, method, args=None, signature=None):
    """A call without the Client, to see the D-Bus error exactly as other clients do."""
    con = bus.open_connection(address)
    try:
        params = GLib.Variant(signature, args) if signature else None
        return con.call_sync(bus.BUS_NAME, bus.OBJECT_PATH, bus.INTERFACE, method, params, None, 0, 10000, None).unpack()
    finally:
        con.close_sync(None)


def dbus_error(address, method, args=None, signature=None) -> tuple[str, str]:
    with pytest.raises(GLib.Error) as info:
        raw_call(address, method, args, signature)
    name = Gio.DBusError.get_remote_error(info.value)
    prefix = f"GDBus.Error:{name}: "
    assert info.value.message.startswith(prefix), info.value.message
    return name, info.value.message[len(prefix):]


# ---- introspection ------------------------------------------------------------------------------
def test_busctl_introspect_shows_the_interface(served, bus_address):
    result = subprocess.run(["busctl", f"--address={bus_address}", "introspect", bus.BUS_NAME, bus.OBJECT_PATH,
                             bus.INTERFACE], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 and "Failed to" in result.stderr and "address" in result.stderr:
        pytest.skip(f"busctl cannot use --address here: {result.stderr}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for member, sig in [(".ListJobs", "aa{sv}"), (".GetJob", "a{sv}"), (".Submit", "s"), (".SubmitText", "ss"),
                        (".Cancel", "s"), (".Finish", "s"), (".SetPriority", "si"), (".Retry", "s"), (".Reload", "-"), (".Version", "s"),
                        (".QueueLength", "u"), (".GPUs", "a(us)"), (".JobStateChanged", "ssss"),
                        (".CheckpointEvaluated", "sxs")]:
        assert any(line.split()[:1] == [member] and sig in line for line in out.splitlines()), (member, out)


# ---- read-only methods and properties ------------------------------------------------------------
def test_list_jobs_is_typed_and_round_trips_to_the_views(served, bus_address):
    fake, _service, client = served
    raw = raw_call(bus_address, "ListJobs")[0]
    assert [v["name"] for v in raw] == ["effdet", "waiting", "done"]
    effdet = raw[0]
    assert effdet["gpus"] == [0] and effdet["step"] == 1200 and effdet["losses"] == {"loss/total": 0.75, "loss/cls": 0.25}
    assert "last_exit" not in effdet  # None has no D-Bus form: the key is left out ...
    assert ["last_exit"] in effdet["null_keys"]  # ... and its path listed
    assert ["evaluation", "checkpoints", "0", "error"] in effdet["null_keys"] and ["sparse", "1"] in effdet["null_keys"]
    assert effdet["evaluation"]["checkpoints"][0]["metrics"] == {"DetectionBoxes_Precision/mAP@.50IOU": 0.5}
    assert raw[1]["wants_gpus"] == [1, 2] and raw[0]["wants_gpus"] == 1
    assert raw[2]["history"] == [{"time": 1700000000.5, "state": "queued", "reason": "submitted"}]
    # The client puts the missing keys back: its views equal the Commands views.
    assert client.list_jobs() == list(fake.jobs.values())


def test_get_job_and_not_found(served, bus_address):
    fake, _service, client = served
    assert client.get_job("waiting") == fake.jobs["waiting"]
    name, message = dbus_error(bus_address, "GetJob", ("nope",), "(s)")
    assert (name, message) == ("io.github.oddaemon1.Error.NotFound", "no job named 'nope'")
    with pytest.raises(dc.ClientError) as info:
        client.get_job("nope")
    assert info.value.kind is ErrorKind.NOT_FOUND and str(info.value) == "no job named 'nope'"


def test_properties_and_get_all(served, bus_address):
    _fake, _service, client = served
    assert client.version() == "9.8.7"
    assert client.queue_length() == 1
    assert client.gpus() == {"total": [0, 1], "free": [1], "holders": {0: "effdet"}}
    con = bus.open_connection(bus_address)
    try:
        everything = con.call_sync(bus.BUS_NAME, bus.OBJECT_PATH, "org.freedesktop.DBus.Properties", "GetAll",
                                   GLib.Variant("(s)", (bus.INTERFACE,)), None, 0, 5000, None).unpack()[0]
    finally:
        con.close_sync(None)
    assert everything == {"Version": "9.8.7", "QueueLength": 1, "GPUs": [(0, "effdet"), (1, "")]}


# ---- mutating methods ---------------------------------------------------------------------------
def test_submit_text_accepted_and_rejected(served, bus_address):
    fake, _service, client = served
    assert raw_call(bus_address, "SubmitText", ('name = "a"\n', "a.toml"), "(ss)") == ("a", "queued", 2)
    assert fake.calls[-1] == ("submit_text", 'name = "a"\n', "a.toml")
    name, message = dbus_error(bus_address, "SubmitText", ("[pipeline]\nnum_clases = 3\n", "bad.toml"), "(ss)")
    assert name == "io.github.oddaemon1.Error.Invalid"
    assert message.startswith("Job file 'bad.toml' was rejected") and "did you mean 'num_classes'?" in message
    assert client.submit_text("x = 1\n", "b.toml") == {"name": "b", "state": "queued", "queue_position": 2}
    with pytest.raises(dc.ClientError) as info:
        client.submit_text("nul\0byte", "c.toml")
    assert info.value.kind is ErrorKind.INVALID and "NUL" in str(info.value)


def test_submit_path_and_client_side_file_reading(served, bus_address, tmp_path):
    fake, _service, client = served
    job = tmp_path / "fromfile.toml"
    job.write_text('name = "fromfile"\n')
    assert raw_call(bus_address, "Submit", (str(job),), "(s)") == ("fromfile", "queued", 2)
    assert ("submit_file", str(job)) in fake.calls
    name, message = dbus_error(bus_address, "Submit", (str(tmp_path / "missing.toml"),), "(s)")
    assert name == "io.github.oddaemon1.Error.Invalid"
    assert message == f"cannot read {tmp_path / 'missing.toml'}: No such file or directory"
    # Client.submit_file reads the file itself and sends the text.
    other = tmp_path / "other.toml"
    other.write_text('name = "other"\n')
    assert client.submit_file(str(other)) == {"name": "other", "state": "queued", "queue_position": 2}
    assert fake.calls[-1] == ("submit_text", 'name = "other"\n', "other.toml")
    with pytest.raises(dc.ClientError, match="cannot read .*missing.toml: No such file"):
        client.submit_file(str(tmp_path / "missing.toml"))


def test_cancel_retry_reload_and_their_errors(served, bus_address):
    fake, _service, client = served
    assert client.finish("effdet") == "stopping" and fake.calls[-1] == ("finish", "effdet")
    assert dbus_error(bus_address, "Finish", ("done",), "(s)") == \
        ("io.github.oddaemon1.Error.Refused", "job 'done' is already succeeded")
    fake.jobs["effdet"]["state"] = "running"
    assert client.set_priority("waiting", -7) == {"state": "queued", "priority": -7, "queue_position": 1}
    assert fake.calls[-1] == ("set_priority", "waiting", -7)
    assert dbus_error(bus_address, "SetPriority", ("ghost", 3), "(si)")[0] == "io.github.oddaemon1.Error.NotFound"
    assert client.cancel("effdet") == "stopping"
    assert dbus_error(bus_address, "Cancel", ("done",), "(s)") == \
        ("io.github.oddaemon1.Error.Refused", "job 'done' is already succeeded")
    assert dbus_error(bus_address, "Cancel", ("ghost",), "(s)") == \
        ("io.github.oddaemon1.Error.NotFound", "no job named 'ghost'")
    assert dbus_error(bus_address, "Retry", ("waiting",), "(s)") == \
        ("io.github.oddaemon1.Error.Refused", "job 'waiting' is queued; only failed or cancelled jobs can be retried")
    assert dbus_error(bus_address, "Retry", ("ghost",), "(s)")[0] == "io.github.oddaemon1.Error.NotFound"
    with pytest.raises(dc.ClientError) as info:
        client.retry("waiting")
    assert info.value.kind is ErrorKind.REFUSED
    client.reload()
    assert fake.calls[-1] == ("reload",)
    assert ("cancel", "effdet") in fake.calls


def test_unexpected_failure_is_an_internal_error_and_logged(served, bus_address, caplog):
    fake, _service, _client = served
    fake.explode = True
    with caplog.at_level(logging.ERROR, logger="oddaemon.dbus"):
        name, message = dbus_error(bus_address, "ListJobs")
    assert name == "io.github.oddaemon1.Error.Internal"
    assert message == "internal error: RuntimeError: the fake broke (details in the daemon log)"
    assert "the fake broke" in caplog.text


def test_wrong_argument_types_are_refused_by_the_bus_layer(served, bus_address):
    name, _message = dbus_error(bus_address, "GetJob", (5,), "(i)")
    assert name == "org.freedesktop.DBus.Error.InvalidArgs"


# ---- signals ------------------------------------------------------------------------------------
def test_job_state_and_checkpoint_signals(served, bus_address):
    _fake, service, _client = served
    recorder = SignalRecorder(bus_address)
    try:
        service.emit_job_state_changed("effdet", "queued", "running", "started on GPU 0")
        service.emit_job_state_changed("new", None, "queued", None)
        service.emit_checkpoint_evaluated("effdet", 12000, {"DetectionBoxes_Precision/mAP": 0.412})
        assert recorder.wait("JobStateChanged", 2) == [("effdet", "queued", "running", "started on GPU 0"),
                                                       ("new", "", "queued", "")]
        service.emit_checkpoint_evaluated("effdet", None, '{"loss": 1.5}')
        (name, step, metrics), unknown = recorder.wait("CheckpointEvaluated", 2)
        assert (name, step, json.loads(metrics)) == ("effdet", 12000, {"DetectionBoxes_Precision/mAP": 0.412})
        assert unknown == ("effdet", -1, '{"loss": 1.5}')  # step not known: -1
    finally:
        recorder.close()


def test_properties_changed_only_when_values_change(served, bus_address):
    fake, service, _client = served
    recorder = SignalRecorder(bus_address)
    try:
        service.refresh_properties()  # nothing changed since publish: no signal
        fake.jobs["waiting2"] = view("waiting2", "queued", queue_position=2)
        service.refresh_properties()
        fake.holders[1] = "waiting"
        service.refresh_properties()
        service.refresh_properties()
        recorder.wait("PropertiesChanged", 2)
        changes = recorder.wait("PropertiesChanged", 3, timeout=0.5)  # and no third one comes
        assert changes == [(bus.INTERFACE, {"QueueLength": 2}, []),
                           (bus.INTERFACE, {"GPUs": [(0, "effdet"), (1, "waiting")]}, [])]
    finally:
        recorder.close()


# ---- who may call -------------------------------------------------------------------------------
def test_caller_check_denies_non_members_of_the_submit_group(served, bus_address):
    fake, service, client = served
    service.caller_check = ds.CallerCheck("oddaemon-no-such-group", lambda sender: 65534)
    for method, args, sig in [("Cancel", ("effdet",), "(s)"), ("Finish", ("effdet",), "(s)"),
                              ("SetPriority", ("effdet", 1), "(si)"), ("Retry", ("done",), "(s)"), ("Reload", None, None),
                              ("SubmitText", ("x", "x.toml"), "(ss)"), ("Submit", ("/etc/hostname",), "(s)")]:
        name, message = dbus_error(bus_address, method, args, sig)
        assert name == "org.freedesktop.DBus.Error.AccessDenied", method
        assert message == (f"{method} is only for root and members of the group 'oddaemon-no-such-group' "
                           "(caller uid 65534); ask an administrator to add you to it")
    assert not [c for c in fake.calls if c[0] in ("cancel", "finish", "set_priority", "retry", "reload", "submit_text", "submit_file")]
    assert client.list_jobs()  # reading stays open to everyone


def test_submit_path_reads_only_files_the_caller_may_read(served, bus_address, tmp_path):
    fake, service, _client = served
    # uid 65534 (nobody) is a member of its primary group, so the group check lets it through.
    import grp  # noqa: PLC0415 - only this test looks up users and groups
    import pwd  # noqa: PLC0415 - only this test looks up users and groups

    nobody = pwd.getpwuid(65534)
    service.caller_check = ds.CallerCheck(grp.getgrgid(nobody.pw_gid).gr_name, lambda sender: 65534)
    secret = tmp_path / "secret.toml"
    secret.write_text("name = 'secret'\n")
    os.chmod(secret, 0o600)
    name, message = dbus_error(bus_address, "Submit", (str(secret),), "(s)")
    assert name == "org.freedesktop.DBus.Error.AccessDenied"
    assert message.startswith(f"Submit: {secret} belongs to uid {os.getuid()} and is not readable by everyone")
    os.chmod(secret, 0o644)
    assert raw_call(bus_address, "Submit", (str(secret),), "(s)") == ("secret", "queued", 2)
    assert fake.calls[-1] == ("submit_text", "name = 'secret'\n", "secret.toml")


def test_the_real_caller_uid_comes_from_the_bus(served, bus_address):
    _fake, service, client = served
    asked = []
    con = bus.open_connection(bus_address)
    try:
        def uid_of(sender):
            asked.append(sender)
            return ds._caller_uid(con, sender)

        service.caller_check = ds.CallerCheck("oddaemon-no-such-group", uid_of)
        assert client.cancel("effdet") == "stopping"  # allowed: we are root, or the daemon's own uid
    finally:
        con.close_sync(None)
    assert len(asked) == 1 and asked[0].startswith(":")  # the unique name of the client's connection


# ---- no bus, no daemon --------------------------------------------------------------------------
def test_publish_without_a_bus_returns_none_with_a_warning(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="oddaemon.dbus"):
        assert ds.publish(FakeCommands(), bus=f"unix:path={tmp_path}/no-bus") is None
    assert "D-Bus API disabled: cannot connect to the" in caplog.text and "keeps running" in caplog.text


def test_publish_with_the_select_loop_returns_none(caplog, bus_address):
    class SelectLoop:
        name = "select"

    with caplog.at_level(logging.WARNING, logger="oddaemon.dbus"):
        assert ds.publish(FakeCommands(), bus=bus_address, loop=SelectLoop()) is None
    assert "needs the GLib event loop" in caplog.text


def test_a_second_daemon_cannot_take_the_name(served, bus_address, caplog):
    with caplog.at_level(logging.WARNING, logger="oddaemon.dbus"):
        assert ds.publish(FakeCommands(), bus=bus_address) is None
    assert f"cannot own {bus.BUS_NAME}" in caplog.text


def test_client_says_clearly_when_unreachable(bus_address, tmp_path):
    with pytest.raises(dc.DBusUnavailable, match=r"the daemon is not on the D-Bus .* bus \(io.github.oddaemon1\)"):
        dc.Client.connect(bus_address)
    with pytest.raises(dc.DBusUnavailable, match="cannot connect to the D-Bus"):
        dc.Client.connect(f"unix:path={tmp_path}/no-bus")
    text = dc.describe_fallback("no system bus", "/var/lib/oddaemon/control.sock")
    assert "not reachable (no system bus)" in text and "/var/lib/oddaemon/control.sock" in text
    assert "you can still submit" in text and "read logs" in text


def test_resolve_bus(monkeypatch):
    monkeypatch.delenv(bus.BUS_ENV, raising=False)
    assert bus.resolve_bus(None) == "system"
    monkeypatch.setenv(bus.BUS_ENV, "session")
    assert bus.resolve_bus(None) == "session"
    assert bus.resolve_bus("unix:path=/x") == "unix:path=/x"


# ---- end to end: the real daemon ----------------------------------------------------------------
def test_end_to_end_with_the_real_daemon(bus_env, tmp_path):
    from tests.support.harness import DaemonEnv, wait_for  # noqa: PLC0415

    env = DaemonEnv(str(tmp_path))
    recorder = SignalRecorder(bus_env)
    try:
        env.start()
        client = dc.Client.connect(bus_env)
        assert client.version() and client.queue_length() == 0 and client.gpus()["total"] == []
        result = client.submit_text(env.job_text("e2e", num_steps=10, every=5), "e2e.toml")
        # its preflight runs first; the name is known once the parser has answered (within 50 ms, or
        # later on a busy machine: the verdict then lands in the spool, and the signals below tell it)
        assert result["state"] == "validating" and result["name"] in ("e2e", "")
        # a bad file: the reply is the error when its parser answers within the call's 50 ms, else
        # "validating" and the verdict lands in the spool (a busy machine)
        try:
            bad = client.submit_text("[pipeline]\nnum_clases = 3\n", "bad.toml")
        except dc.ClientError as exc:
            assert exc.kind is ErrorKind.INVALID and "did you mean 'num_classes'?" in str(exc)
        else:
            assert bad["state"] == "validating", bad
            wait_for(lambda: [n for n in env.rejected() if n.startswith("bad.") and n.endswith(".error")], 60,
                     what="the bad file's rejection")
            (error,) = [n for n in env.rejected() if n.startswith("bad.") and n.endswith(".error")]
            with open(os.path.join(env.spool, "rejected", error)) as f:
                assert "did you mean 'num_classes'?" in f.read()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            changes = recorder.wait("JobStateChanged", 99, timeout=0.5)
            if ("e2e", "succeeded") in [(n, new) for n, _old, new, _r in changes]:
                break
        transitions = [(old, new) for n, old, new, _r in changes if n == "e2e"]
        assert transitions[:2] == [("", "queued"), ("queued", "running")], changes
        assert transitions[-1][1] == "succeeded", changes
        assert client.get_job("e2e")["state"] == "succeeded"
        evaluated = recorder.wait("CheckpointEvaluated", 1, timeout=5)
        assert evaluated and all(name == "e2e" for name, _step, _m in evaluated), evaluated
        assert "DetectionBoxes_Precision/mAP" in json.loads(evaluated[-1][2])
        assert [v["name"] for v in client.list_jobs()] == ["e2e"]
        with pytest.raises(dc.ClientError) as info:
            client.cancel("ghost")
        assert info.value.kind is ErrorKind.NOT_FOUND and str(info.value) == "no job named 'ghost'"
        # Reload over D-Bus re-reads the configuration: with one CPU slot a second long job waits;
        # once the file says two and Reload is called, it starts (nothing else would start it)
        for name in ("r1", "r2"):
            env.drop(f"{name}.toml", env.job_text(name, num_steps=100000, step_seconds=0.05))
        def states() -> dict[str, str]:
            return {v["name"]: v["state"] for v in client.list_jobs() if v["name"] in ("r1", "r2")}

        # (either may pass its preflight first)
        wait_for(lambda: sorted(states().values()) == ["queued", "running"], 60, what="one running, one queued")
        waiting = next(name for name, state in states().items() if state == "queued")
        assert client.get_job(waiting)["queue_position"] == 1
        env.write_config(max_cpu_jobs=2)
        client.reload()
        wait_for(lambda: client.get_job(waiting)["state"] == "running", 60, what=f"{waiting} started by the reload")
        assert "reload: configuration re-read" in env.daemon_log()
        for name in ("r1", "r2"):
            client.cancel(name)
        for name in ("r1", "r2"):
            wait_for(lambda name=name: client.get_job(name)["state"] == "cancelled", 60, what=f"{name} cancelled")
        client.close()
    finally:
        recorder.close()
        env.close()


def test_cli_talks_over_dbus_and_falls_back_to_the_control_socket(bus_env, tmp_path):
    from tests.support.harness import DaemonEnv, train_marker, wait_for, worker_pids  # noqa: PLC0415

    env = DaemonEnv(str(tmp_path))
    try:
        env.start()
        env.drop("cli1.toml", env.job_text("cli1", num_steps=3000, step_seconds=0.05))
        env.wait_state("cli1", "running", 30)
        os.unlink(env.socket)  # only D-Bus is left: the CLI must use it
        out = env.cli("list")
        assert out.returncode == 0 and "cli1" in out.stdout and "running" in out.stdout, out.stderr
        out = env.cli("cancel", "cli1")
        assert out.returncode == 0 and "cli1: stopping" in out.stdout, out.stderr
        # the effect, seen where the CLI is not involved: the record on disk and the processes
        record = os.path.join(env.state, "jobs", "cli1.json")
        wait_for(lambda: json.load(open(record))["state"] == "cancelled", 60, what="cli1 cancelled on disk")
        wait_for(lambda: not worker_pids(train_marker(env, "cli1")), 60, what="cli1's trainer gone")
        out = env.cli("status", "ghost")
        assert out.returncode == 1 and "no job named 'ghost'" in out.stderr
    finally:
        env.close()
    # no daemon on the bus: the CLI says so, and what it can still do
    env2 = DaemonEnv(str(tmp_path / "nobody"))
    out = env2.cli("list")
    assert out.returncode == 3
    assert "the D-Bus API is not reachable" in out.stderr and "you can still submit" in out.stderr
