"""How the CLI asks the daemon: over its control socket when this user may open it (root and the
daemon's group: no D-Bus library is loaded, so ``oddaemon list`` answers in tens of milliseconds),
else over D-Bus when the daemon publishes its API there (members of the submit group), else the
control socket's own error; every answer in the control socket's reply shape. Both reach the same
``Commands`` in the daemon."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from oddaemon.adapters.control_client import request
from oddaemon.adapters.dbus_bus import BUS_ENV
from oddaemon.core import layout

if TYPE_CHECKING:
    from oddaemon.cli.control_settings import ControlSettings
    from oddaemon.core.config import Config


def socket_path(config: Config | ControlSettings) -> str:
    return layout.control_socket(config.state_dir)


def configured_bus(config: Config | ControlSettings) -> str:
    return os.environ.get(BUS_ENV) or config.dbus_bus


def ping(config: Config | ControlSettings, timeout: float) -> dict:
    """The control socket only (a submit asks whether the daemon runs at all); raises ``DaemonUnreachable``."""
    return request(socket_path(config), {"cmd": "ping"}, timeout=timeout)


def ask_daemon(config: Config | ControlSettings, payload: dict) -> dict:
    """One request, in the control socket's reply shape (an error reply carries its ``kind``): over the
    control socket when this user may open it; else over D-Bus when the daemon publishes its API
    there; else (or when the bus is not reachable, with a note saying so) the control socket's error."""
    path = socket_path(config)
    bus = configured_bus(config)
    if bus == "none" or os.access(path, os.R_OK | os.W_OK):
        return request(path, payload)
    from oddaemon.core.errors import error_reply  # noqa: PLC0415

    try:
        from oddaemon.cli.dbus_client import Client, ClientError, DBusUnavailable  # noqa: PLC0415
    except ImportError as exc:
        print(f"oddaemon: D-Bus client unavailable ({exc}); using the control socket", file=sys.stderr)
    else:
        try:
            with Client.connect(bus) as client:
                return _ask_dbus(client, payload)
        except DBusUnavailable as exc:
            from oddaemon.cli.dbus_client import describe_fallback  # noqa: PLC0415

            print(describe_fallback(str(exc), path), file=sys.stderr)
        except ClientError as exc:
            return error_reply(exc)
    return request(path, payload)


def _ask_dbus(client, payload: dict) -> dict:
    cmd, name = payload["cmd"], payload.get("name")
    if cmd == "list":
        gpus = client.gpus()
        jobs = client.list_jobs()
        queue = [j["name"] for j in sorted((j for j in jobs if j["queue_position"]), key=lambda j: j["queue_position"])]
        return {"ok": True, "jobs": jobs, "gpus": gpus["total"], "free_gpus": gpus["free"], "queue": queue}
    if cmd == "status":
        return {"ok": True, "job": client.get_job(name)}
    if cmd == "cancel":
        return {"ok": True, "state": client.cancel(name)}
    if cmd == "finish":
        return {"ok": True, "state": client.finish(name)}
    if cmd == "priority":
        return {"ok": True, **client.set_priority(name, payload["priority"])}
    if cmd == "retry":
        return {"ok": True, "state": client.retry(name)}
    if cmd == "sweep" and name:
        return {"ok": True, "sweep": client.get_sweep(name)}
    if cmd == "sweep":  # every sweep, from the job views (as the daemon makes them from its own)
        from oddaemon.core.sweep import group_by_sweep, sweep_summary, sweep_view  # noqa: PLC0415

        groups = group_by_sweep(client.list_jobs())
        return {"ok": True, "sweeps": [sweep_summary(sweep_view(n, views)) for n, views in groups.items()]}
    raise ValueError(f"unknown command {cmd!r}")
