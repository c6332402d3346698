"""The D-Bus names of the oddaemon API and how to reach a bus, shared by the daemon's service and the CLI's client."""

from __future__ import annotations

import os

BUS_NAME = "io.github.oddaemon1"
OBJECT_PATH = "/io/github/oddaemon1"
INTERFACE = "io.github.oddaemon1.Manager"
BUS_ENV = "ODDAEMON_DBUS_BUS"


def resolve_bus(bus: str | None = None) -> str:
    """'system', 'session' or a D-Bus address; None means $ODDAEMON_DBUS_BUS, else 'system'."""
    return bus or os.environ.get(BUS_ENV) or "system"


def open_connection(bus: str | None = None):
    """A private connection (never the shared singleton: that one kills the process when the
    bus goes away). Raises ``GLib.Error`` when the bus is not reachable."""
    import pydbus  # noqa: F401, PLC0415 - gives Gio.DBusConnection its .pydbus
    from gi.repository import Gio  # noqa: PLC0415

    bus = resolve_bus(bus)
    if bus in ("system", "session"):
        kind = Gio.BusType.SYSTEM if bus == "system" else Gio.BusType.SESSION
        address = Gio.dbus_address_get_for_bus_sync(kind, None)
    else:
        address = bus
    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    con = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
    con.set_exit_on_close(False)
    return con


def glib_message(exc: BaseException) -> str:
    """A GLib.Error's own message (``str()`` of one adds the domain and code)."""
    return getattr(exc, "message", None) or str(exc)
