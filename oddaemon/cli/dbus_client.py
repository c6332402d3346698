"""The CLI's side of the D-Bus API (``dbus_service`` is the daemon's side)."""

from __future__ import annotations

import os

from oddaemon.adapters.dbus_bus import BUS_NAME, INTERFACE, OBJECT_PATH, glib_message, open_connection, resolve_bus
from oddaemon.adapters.dbus_variants import view_from_dict
from oddaemon.core.errors import CommandError, ErrorKind, dbus_error_name, kind_of_dbus_error


class DBusUnavailable(Exception):
    """The daemon's D-Bus API cannot be reached (no bus, or no daemon on it)."""


class ClientError(CommandError):
    """The daemon answered with an error (or the client refused to send a request): ``kind`` from
    the D-Bus error name (``oddaemon.core.errors.kind_of_dbus_error``), ``dbus_name`` the name itself."""

    def __init__(self, dbus_name: str, message: str):
        super().__init__(kind_of_dbus_error(dbus_name), message)
        self.dbus_name = dbus_name

    @classmethod
    def of_kind(cls, kind: ErrorKind, message: str) -> ClientError:
        return cls(dbus_error_name(kind), message)


class Client:
    def __init__(self, con, proxy, bus: str):
        self._con = con
        self._proxy = proxy
        self.bus = bus

    @classmethod
    def connect(cls, bus: str | None = None, timeout: float = 10.0) -> Client:
        bus = resolve_bus(bus)
        try:
            con = open_connection(bus)
        except ImportError as exc:
            raise DBusUnavailable(f"D-Bus support is not installed ({exc})") from None
        except Exception as exc:  # noqa: BLE001
            raise DBusUnavailable(f"cannot connect to the D-Bus {bus} bus: {glib_message(exc)}") from None
        try:
            proxy = con.pydbus.get(BUS_NAME, OBJECT_PATH, timeout=timeout)[INTERFACE]
        except Exception as exc:  # noqa: BLE001
            con.close_sync(None)
            raise DBusUnavailable(f"the daemon is not on the D-Bus {bus} bus ({BUS_NAME}): "
                                  f"{_remote_message(exc)}") from None
        return cls(con, proxy, bus)

    def close(self) -> None:
        self._con.close_sync(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, *args):
        try:
            return getattr(self._proxy, method)(*args)
        except Exception as exc:  # noqa: BLE001
            raise _client_error(exc) from None

    def list_jobs(self) -> list[dict]:
        return [view_from_dict(v) for v in self._call("ListJobs")]

    def get_job(self, name: str) -> dict:
        return view_from_dict(self._call("GetJob", name))

    def get_sweep(self, name: str) -> dict:
        return view_from_dict(self._call("GetSweep", name))

    def submit_file(self, path: str) -> dict:
        """Read the file here (with the caller's permissions) and send its text."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ClientError.of_kind(ErrorKind.INVALID, f"cannot read {path}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ClientError.of_kind(ErrorKind.INVALID,
                                      f"{path} is not UTF-8 text (byte offset {exc.start})") from None
        return self.submit_text(text, os.path.basename(path))

    def submit_text(self, text: str, filename: str = "submitted.toml") -> dict:
        if "\0" in text:
            raise ClientError.of_kind(ErrorKind.INVALID, f"{filename} contains a NUL byte; a job file is text")
        return _submit_result(self._call("SubmitText", text, filename))

    def cancel(self, name: str) -> str:
        return self._call("Cancel", name)

    def finish(self, name: str) -> str:
        return self._call("Finish", name)

    def retry(self, name: str) -> str:
        return self._call("Retry", name)

    def set_priority(self, name: str, priority: int) -> dict:
        state, position = self._call("SetPriority", name, priority)
        return {"state": state, "priority": priority, "queue_position": position or None}

    def reload(self) -> None:
        self._call("Reload")

    def version(self) -> str:
        return self._proxy.Version

    def queue_length(self) -> int:
        return int(self._proxy.QueueLength)

    def gpus(self) -> dict:
        pairs = list(self._proxy.GPUs)
        return {"total": [g for g, _ in pairs], "free": [g for g, h in pairs if not h],
                "holders": {g: h for g, h in pairs if h}}


def _submit_result(reply) -> dict:
    name, state, position = reply
    return {"name": name, "state": state, "queue_position": position or None}


def _remote_message(exc: BaseException) -> str:
    """The message without GDBus's "GDBus.Error:<error name>: " prefix."""
    message = glib_message(exc)
    if message.startswith("GDBus.Error:") and ": " in message:
        return message.split(": ", 1)[1]
    return message


def _client_error(exc: BaseException) -> Exception:
    try:
        from gi.repository import Gio  # noqa: PLC0415

        name = Gio.DBusError.get_remote_error(exc) if Gio.DBusError.is_remote_error(exc) else None
    except (ImportError, TypeError):
        name = None
    if name is None:
        return DBusUnavailable(f"the D-Bus call failed: {glib_message(exc)}")
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NoReply",
                "org.freedesktop.DBus.Error.Disconnected"):
        return DBusUnavailable(f"the daemon is not answering on D-Bus: {_remote_message(exc)}")
    return ClientError(name, _remote_message(exc))


def describe_fallback(reason: str, control_socket: str | None = None) -> str:
    """What the CLI prints when D-Bus is not usable: why, and what still works."""
    lines = [f"oddaemon: the D-Bus API is not reachable ({reason})."]
    if control_socket:
        lines.append(f"oddaemon: using the daemon's control socket {control_socket} instead: list, status, submit, "
                     "cancel, retry and reload work there if you may open it (root and the daemon's group).")
    lines.append("oddaemon: without the daemon you can still submit (the file waits in the spool's new/ folder "
                 "until the daemon runs) and read logs (oddaemon logs NAME).")
    return "\n".join(lines)
