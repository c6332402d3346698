"""The daemon's end of a served worker's pipes: requests as JSON lines on the worker's stdin,
replies as JSON lines on a second pipe (``--reply-fd N``), read on the event loop. Used by the warm
evaluator (``warm.py``) and the warm preflight (``preflight.py``).

``Channel.open()`` makes both pipes and returns the child's ends (its stdin, the fd it writes
replies to); after the worker started, ``attach()`` closes those in the daemon and listens. Each
reply is handed to ``on_reply(dict)``; EOF, or a reply line over ``MAX_REPLY_LINE``, to
``on_broken(why)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from oddaemon.adapters.loop import Loop

log = logging.getLogger("oddaemon.adapters.served")
MAX_REPLY_LINE = 1 << 20


class Channel:
    def __init__(self, loop: Loop, on_reply: Callable[[dict], None], on_broken: Callable[[str], None], what: str):
        self.loop = loop
        self.on_reply = on_reply
        self.on_broken = on_broken
        self.what = what  # for messages, e.g. "job x: evaluator"
        self.request_fd: int | None = None
        self.reply_fd: int | None = None
        self._child_ends: tuple[int, int] | None = None
        self._handle: object | None = None
        self._buffer = b""

    def open(self) -> tuple[int, int]:
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        self.request_fd, self.reply_fd, self._child_ends = req_w, rep_r, (req_r, rep_w)
        return req_r, rep_w

    def attach(self, started: bool) -> None:
        """The worker started (or not): close its ends here; listen, or close everything."""
        for fd in self._child_ends or ():
            os.close(fd)
        self._child_ends = None
        if not started:
            self.finish()
            self._close_reply()
            return
        os.set_blocking(self.reply_fd, False)
        self._handle = self.loop.add_reader(self.reply_fd, self.read)

    def send(self, message: dict) -> bool:
        line = (json.dumps(message) + "\n").encode()
        try:
            os.write(self.request_fd, line)  # a few hundred bytes: fits the pipe buffer
            return True
        except (OSError, TypeError) as exc:
            log.warning("%s: cannot send a request: %s", self.what, getattr(exc, "strerror", None) or exc)
            return False

    def read(self) -> None:
        if self.reply_fd is None:
            return
        try:
            chunk = os.read(self.reply_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_reply()
            return
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise TypeError
            except (ValueError, TypeError):
                log.warning("%s sent an unreadable reply: %r", self.what, line[:200])
                continue
            self.on_reply(reply)
        if len(self._buffer) > MAX_REPLY_LINE:
            self._buffer = b""
            self.on_broken("protocol error: an over-long reply")

    def finish(self) -> None:
        """No more requests: close the worker's stdin (it exits by itself)."""
        if self.request_fd is not None:
            os.close(self.request_fd)
            self.request_fd = None

    def _close_reply(self) -> None:
        if self._handle is not None:
            self.loop.remove(self._handle)
            self._handle = None
        if self.reply_fd is not None:
            os.close(self.reply_fd)
            self.reply_fd = None

    def close(self) -> None:
        """After the worker exited: take the replies it sent before dying, then release our ends."""
        self.read()
        self._close_reply()
        self.finish()
