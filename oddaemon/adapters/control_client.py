"""The control socket's client side: one request, one JSON line back. Kept apart from the server
(``adapters/control.py``) so that ``oddaemon list`` imports only ``socket`` and ``json`` before it
has its answer: no logging, no loop."""

from __future__ import annotations

import json
import os
import socket

from oddaemon.core.errors import ErrorKind, OddaemonError


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
