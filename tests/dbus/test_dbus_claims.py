"""README, "When training fails": every failure of a training process ends up as one sentence a user
can act on, also "in the D-Bus job view and JobStateChanged signal". The real daemon on a private
bus (conftest.py), real stand-in workers: a failure that is restarted (backoff) and one that fails
the job at once, each read back from GetJob and from the signals, against the control socket's view."""

from __future__ import annotations

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
from tests.support.harness import DaemonEnv

# TF's own texts (the last line of the traceback the worker prints)
GPU_ERROR = "tensorflow.python.framework.errors_impl.InternalError: CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access"
CORRUPT_RECORD = "tensorflow.python.framework.errors_impl.DataLossError: corrupted record at 944 [Op:IteratorGetNext]"


class Signals:
    """JobStateChanged as a client on the bus receives it (its own connection and main context)."""

    def __init__(self, address: str):
        self.ctx = GLib.MainContext.new()
        self.ctx.push_thread_default()
        try:
            self.con = bus.open_connection(address)
            self.received: list[tuple] = []
            self.con.signal_subscribe(None, bus.INTERFACE, "JobStateChanged", bus.OBJECT_PATH, None,
                                      Gio.DBusSignalFlags.NONE, self._on)
        finally:
            self.ctx.pop_thread_default()
        # a round trip after AddMatch: the bus has the match rule when it returns
        self.con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId",
                           None, None, 0, 5000, None)

    def _on(self, _con, _sender, _path, _iface, _member, params):
        self.received.append(params.unpack())

    def changes(self, name: str) -> list[tuple[str, str, str]]:
        while self.ctx.iteration(False):
            pass
        return [(old, new, reason) for n, old, new, reason in self.received if n == name]

    def wait(self, name: str, new_state: str, timeout: float = 90) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.changes(name)
            if any(new == new_state for _old, new, _r in got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no JobStateChanged {name} -> {new_state} within {timeout}s: {got}")
            time.sleep(0.02)

    def close(self) -> None:
        self.con.close_sync(None)


def get_job_raw(address: str, name: str) -> dict:
    """GetJob as any D-Bus client sees it (no Client: a None is a missing key, listed in null_keys)."""
    con = bus.open_connection(address)
    try:
        return con.call_sync(bus.BUS_NAME, bus.OBJECT_PATH, bus.INTERFACE, "GetJob", GLib.Variant("(s)", (name,)),
                             None, 0, 10000, None).unpack()[0]
    finally:
        con.close_sync(None)


@pytest.fixture
def on_the_bus(bus_env, tmp_path):
    env = DaemonEnv(str(tmp_path))
    env.write_config(max_restarts=3, backoff_base=0.2, backoff_cap=0.5, max_cpu_jobs=2,
                     event_loop="glib")  # the D-Bus API is served by the GLib loop
    signals = Signals(bus_env)
    try:
        env.start()
        client = dc.Client.connect(bus_env)
        try:
            yield env, client, signals, bus_env
        finally:
            client.close()
    finally:
        signals.close()
        env.close()


def test_failure_reason_in_the_dbus_job_view_and_the_job_state_changed_signal(on_the_bus):
    env, client, signals, address = on_the_bus
    env.drop("flaky.toml", env.job_text("flaky", num_steps=10, every=5, step_seconds=0.02, crash_at_step=3,
                                        crash_times=1, crash_text=GPU_ERROR))
    env.drop("fatal.toml", env.job_text("fatal", num_steps=10, every=5, step_seconds=0.02, crash_at_step=3,
                                        crash_text=CORRUPT_RECORD))

    # restarted: the signal into backoff carries the failure sentence, as the job's history has it
    signals.wait("flaky", "succeeded")
    flaky = env.job("flaky")
    backoff = [h["reason"] for h in flaky["history"] if h["state"] == "backoff"]
    assert len(backoff) == 1, flaky["history"]
    assert "GPU error (CUDA_ERROR_ILLEGAL_ADDRESS): check nvidia-smi" in backoff[0] and "restart 1 of 3" in backoff[0]
    assert [(old, reason) for old, new, reason in signals.changes("flaky") if new == "backoff"] == \
        [("running", backoff[0])]
    assert client.get_job("flaky")["history"] == flaky["history"]

    # failed at once: the signal and the D-Bus view say what the control socket says
    signals.wait("fatal", "failed")
    fatal = env.job("fatal")
    assert fatal["state"] == "failed" and fatal["restarts"] == 0, fatal
    failure = fatal["failure"]
    assert failure["kind"] == "input" and failure["message"].startswith("corrupt input record"), failure
    assert failure["message"] in fatal["reason"] and "not restarted" in fatal["reason"]
    assert [(old, reason) for old, new, reason in signals.changes("fatal") if new == "failed"] == \
        [("running", fatal["reason"])]
    viewed = client.get_job("fatal")
    assert (viewed["state"], viewed["reason"], viewed["failure"]) == ("failed", fatal["reason"], failure)
    raw = get_job_raw(address, "fatal")  # typed, for busctl and every binding: no JSON inside
    assert raw["reason"] == fatal["reason"]
    assert raw["failure"]["kind"] == "input" and raw["failure"]["message"] == failure["message"]
    assert ["failure", "step"] in raw["null_keys"]  # (no step for an input failure)
    listed = {v["name"]: v for v in client.list_jobs()}
    assert listed["fatal"]["failure"] == failure and listed["fatal"]["reason"] == fatal["reason"]
