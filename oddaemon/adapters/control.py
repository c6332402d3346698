"""The control socket: JSON lines over a Unix stream socket, served on the event loop.

Request:  {"cmd": "list"} | {"cmd": "status", "name": N} | {"cmd": "cancel", "name": N}
          | {"cmd": "retry", "name": N} | {"cmd": "ping"}
Response: {"ok": true, ...} or {"ok": false, "error": "message for the user", "kind": "not_found" | ...}
          (``oddaemon.core.errors.error_reply``: the kind is an ``ErrorKind`` value)

The CLI uses it for list/status/cancel/retry; the D-Bus API (systemd issue) calls the same
``Commands`` object.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from oddaemon.core.errors import CommandError, ErrorKind, OddaemonError, error_reply

if TYPE_CHECKING:  # the CLI's side (request) needs no loop
    from oddaemon.adapters.loop import Loop

log = logging.getLogger("oddaemon.adapters.control")

MAX_REQUEST = 1 << 20
Handler = Callable[[dict], dict]


class ControlServer:
    def __init__(self, path: str, loop: Loop, handler: Handler, mode: int = 0o660):
        self.path = path
        self.loop = loop
        self.handler = handler
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, mode)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self._handle = loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        buffer = bytearray()
        handle: list[Any] = [None]

        def readable() -> None:
            try:
                chunk = conn.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            buffer.extend(chunk)
            if chunk and b"\n" not in buffer and len(buffer) < MAX_REQUEST:
                return
            self.loop.remove(handle[0])
            reply = self._answer(bytes(buffer)) if chunk or buffer else None
            if reply is not None:
                try:
                    conn.setblocking(True)
                    conn.settimeout(5)
                    conn.sendall(reply)
                except OSError:
                    pass
            conn.close()

        handle[0] = self.loop.add_reader(conn.fileno(), readable)

    def _answer(self, raw: bytes) -> bytes:
        try:
            request = json.loads(raw.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            response = self.handler(request)
        except ValueError as exc:
            response = error_reply(CommandError(ErrorKind.INVALID, f"bad request: {exc}"))
        except Exception as exc:
            log.exception("control request failed")
            response = error_reply(exc, logged=True)
        try:
            return (json.dumps(response) + "\n").encode()
        except (TypeError, ValueError) as exc:  # a reply that cannot be encoded is an error reply too
            log.exception("control reply cannot be encoded")
            return (json.dumps(error_reply(exc, logged=True)) + "\n").encode()

    def close(self) -> None:
        self.loop.remove(self._handle)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class DaemonUnreachable(OddaemonError):
    """No answer on the control socket."""

    kind = ErrorKind.UNAVAILABLE


class DaemonForbidden(DaemonUnreachable):
    """The socket is there but this user may not use it: whether the daemon runs is not known."""

    kind = ErrorKind.DENIED


def _who_may(path: str) -> str:
    """Who may use the socket: its group (the daemon's own group, not the submit group)."""
    import grp  # noqa: PLC0415

    try:
        st = os.stat(path)
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "the socket is for the daemon's group"
    return (f"the socket is mode {st.st_mode & 0o777:04o} for group {group!r} (usermod -aG {group} $USER); "
            "members of the submit group use the D-Bus API instead")


def request(path: str, payload: dict, timeout: float = 10.0) -> dict:
    """Client side: one request, one response."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnreachable(f"the daemon is not running (no answer on {path}: {exc.strerror})") from None
    except PermissionError:
        raise DaemonForbidden(f"permission denied on {path}: {_who_may(path)}") from None
    try:
        sock.sendall((json.dumps(payload) + "\n").encode())
        chunks: list[bytes] = []  # joined once: a reply can be megabytes (list --json)
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise DaemonUnreachable(f"the daemon did not answer on {path}: {exc}") from None
    finally:
        sock.close()
    if not data:
        raise DaemonUnreachable(f"the daemon closed {path} without answering")
    return json.loads(data)
