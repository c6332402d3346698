"""A private D-Bus daemon for the D-Bus tests (no system bus needed, nothing shared)."""

from __future__ import annotations

import gc
import shutil
import subprocess

import pytest


@pytest.fixture(scope="module")
def bus_address(tmp_path_factory):
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed (apt-get install dbus-daemon)")
    proc = subprocess.Popen(["dbus-daemon", "--session", "--print-address=1", "--nofork", "--nopidfile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path_factory.mktemp("bus")))
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        pytest.fail(f"dbus-daemon printed no address: {proc.stderr.read()}")
    yield address
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def bus_env(bus_address, monkeypatch):
    """Point ODDAEMON_DBUS_BUS (the daemon and the client) at the private bus."""
    monkeypatch.setenv("ODDAEMON_DBUS_BUS", bus_address)
    return bus_address


@pytest.fixture(autouse=True)
def collect_between_tests_only():
    """No garbage collection while D-Bus traffic is in flight. A collection in the main thread, which
    holds the GIL, can drop the last reference to a GObject whose lock GDBus's worker thread holds
    while that thread waits for the GIL (PyGObject's toggle references): both wait forever (seen
    here: the main thread in g_object_unref from gc_collect_main inside pydbus's EmitSignal, the
    gdbus thread in pyg_toggle_notify). Garbage is collected between tests, once the connections
    are closed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
