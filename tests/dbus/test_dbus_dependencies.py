"""A job that waits for another (``after``), over the D-Bus API on the private bus of
tests/dbus/conftest.py: its view shows ``waiting`` and what it waits for, and it can be cancelled."""

from __future__ import annotations

from tests.support.harness import wait_for


def test_dbus_job_views_show_waiting_and_what_it_waits_for(daemon_env, bus_address):
    from oddaemon.cli import dbus_client  # noqa: PLC0415 (needs PyGObject)

    daemon_env.write_config(dbus=bus_address, max_cpu_jobs=2)
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=400, every=100, step_seconds=0.05))
    env.drop("b.toml", env.job_text("b", num_steps=4, extra='after = ["a"]'))
    env.wait_state("b", "waiting", 30)
    client = wait_for(lambda: _connect(dbus_client, bus_address), 30, what="the daemon on the private bus")
    try:
        b = client.get_job("b")
        assert (b["state"], b["after"], b["waiting_for"]) == ("waiting", ["a"], ["a"])
        assert b["reason"] == "submitted; waiting for a (after)"
        assert [v["state"] for v in client.list_jobs() if v["name"] == "b"] == ["waiting"]
        client.cancel("b")
        assert client.get_job("b")["state"] == "cancelled" and client.get_job("b")["waiting_for"] == []
        client.cancel("a")
    finally:
        client.close()


def _connect(dbus_client, address: str):
    try:
        return dbus_client.Client.connect(address, timeout=2)
    except dbus_client.DBusUnavailable:
        return None
