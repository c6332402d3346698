"""How the CLI asks the daemon: over D-Bus when the daemon publishes its API there, else over the
control socket; every answer in the control socket's reply shape."""

from __future__ import annotations

import os
import sys

from oddaemon.adapters.control import request
from oddaemon.adapters.dbus_bus import BUS_ENV
from oddaemon.core import layout
from oddaemon.core.config import Config
from oddaemon.core.errors import error_reply


def socket_path(config: Config) -> str:
    return layout.control_socket(config.state_dir)


def configured_bus(config: Config) -> str:
    return os.environ.get(BUS_ENV) or config.dbus_bus


def ping(config: Config, timeout: float) -> dict:
    """The control socket only (a submit asks whether the daemon runs at all); raises ``DaemonUnreachable``."""
    return request(socket_path(config), {"cmd": "ping"}, timeout=timeout)


def ask_daemon(config: Config, payload: dict) -> dict:
    """One request, in the control socket's reply shape (an error reply carries its ``kind``): over
    D-Bus when the daemon publishes its API there, else (or when the bus is not reachable, with a
    note saying so) the control socket."""
    bus = configured_bus(config)
    if bus != "none":
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

                print(describe_fallback(str(exc), socket_path(config)), file=sys.stderr)
            except ClientError as exc:
                return error_reply(exc)
    return request(socket_path(config), payload)


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
    if cmd == "retry":
        return {"ok": True, "state": client.retry(name)}
    raise ValueError(f"unknown command {cmd!r}")
