"""The control socket: JSON lines over a Unix stream socket, served on the event loop.

Request:  {"cmd": "list"} | {"cmd": "status", "name": N} | {"cmd": "cancel", "name": N} | {"cmd": "finish", "name": N}
          | {"cmd": "retry", "name": N} | {"cmd": "priority", "name": N, "priority": P} | {"cmd": "ping"}
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

from oddaemon.adapters.control_client import DaemonForbidden, DaemonUnreachable, request
from oddaemon.core.errors import CommandError, ErrorKind, error_reply

if TYPE_CHECKING:  # the CLI's side (request) needs no loop
    from oddaemon.adapters.loop import Loop

log = logging.getLogger("oddaemon.adapters.control")

__all__ = ["ControlServer", "DaemonForbidden", "DaemonUnreachable", "request"]

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
