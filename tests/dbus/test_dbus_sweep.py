"""A sweep over D-Bus, with the real daemon on a private bus: GetSweep is the control socket's sweep
view, a variant's GetJob carries its sweep, an unknown sweep is NotFound."""

from __future__ import annotations

import pytest

try:
    import gi
    gi.require_version("Gio", "2.0")
    import pydbus  # noqa: F401
except (ImportError, ValueError):
    pytest.skip("PyGObject/pydbus are not installed", allow_module_level=True)

from oddaemon.cli import dbus_client as dc
from oddaemon.core.errors import ErrorKind
from tests.support.harness import DaemonEnv, wait_for


def test_get_sweep_is_the_sweep_view_and_a_variant_names_its_sweep(bus_env, tmp_path):
    env = DaemonEnv(str(tmp_path))
    try:
        env.start()
        text = env.job_text("dsw", num_steps=10, every=5) + "\n[sweep]\nvalues = { learning_rate_base = [0.01, 0.02] }\n"
        env.drop("dsw.toml", text)
        for name in ("dsw-1", "dsw-2"):
            env.wait_state(name, "succeeded", 90)
        with dc.Client.connect(bus_env) as client:
            wait_for(lambda: client.get_sweep("dsw")["state"] == "succeeded", 30, what="the sweep over D-Bus")
            over_dbus = client.get_sweep("dsw")
            assert over_dbus == env.ask("sweep", name="dsw")["sweep"]
            assert [r["values"] for r in over_dbus["rows"]] == [{"learning_rate_base": 0.01},
                                                                {"learning_rate_base": 0.02}]
            assert client.get_job("dsw-2")["sweep"]["name"] == "dsw"
            assert client.get_job("dsw-2")["sweep"]["index"] == 2
            with pytest.raises(dc.ClientError) as info:
                client.get_sweep("nope")
            assert info.value.kind is ErrorKind.NOT_FOUND and str(info.value) == "no sweep named 'nope'"
    finally:
        env.close()
