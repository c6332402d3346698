"""systemd's notification protocol (sd_notify), spoken directly: no libsystemd, no extra package.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) to a
``Type=notify`` service; each notification is one datagram of ``KEY=VALUE`` lines sent to it.
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) tell the service it must send ``WATCHDOG=1`` at least
that often. Outside systemd there is no ``NOTIFY_SOCKET`` and every call here does nothing.

A failed send never raises (the daemon must keep running); the first failure is logged, later
ones only at debug level.

``format_status`` builds the short ``STATUS=`` line that ``systemctl status`` shows, e.g.
``2 training, 1 evaluating, 3 queued; GPUs 3/4; effdet_d0 step 12000 mAP 0.412``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("oddaemon.adapters.sdnotify")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_MAX = 120


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a NOTIFY_SOCKET value: a path, or an abstract name
    ('@' becomes a leading NUL byte). None for what this module cannot speak (e.g. vsock:)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC in seconds (systemd's advice), or None when the watchdog is off,
    malformed, or meant for another process (WATCHDOG_PID)."""
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to the service manager. ``Notifier()`` (no address) does nothing."""

    def __init__(self, address: str | bytes | None = None, watchdog_interval: float | None = None,
                 label: str = ""):
        self._address = address
        self._watchdog_interval = watchdog_interval if address is not None else None
        self._label = label  # the NOTIFY_SOCKET text, for messages
        self._sock: socket.socket | None = None
        self._failed_once = False
        self._last_status: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, unset: bool = False) -> Notifier:
        """A Notifier for the socket in ``environ`` (default ``os.environ``); a no-op one when
        NOTIFY_SOCKET is absent. ``unset=True`` removes the variables from ``environ`` (when it is
        mutable) so nothing started later can inherit them."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; systemd notifications are off", raw)
        interval = watchdog_seconds(env, os.getpid())
        if unset and hasattr(env, "pop"):
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)  # type: ignore[attr-defined]
        return cls(address, interval, raw)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None if not enabled."""
        return self._watchdog_interval

    # ---- the messages --------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """READY=1 (after start-up, and after a reload), with the status line if given."""
        return self._send_with_status("READY=1", status)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 wants it for Type=notify-reload;
        older versions ignore it). Send ``ready()`` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self._send_with_status("STOPPING=1", status)

    def _send_with_status(self, message: str, status: str | None) -> bool:
        if status is None:
            return self.send(message)
        line = _one_line(status)
        sent = self.send(f"{message}\nSTATUS={line}")
        if sent:
            self._last_status = line
        return sent

    def status(self, text: str) -> bool:
        """Send STATUS= only when the text differs from the last one sent. True if sent."""
        text = _one_line(text)
        if text == self._last_status or not self.enabled:
            return False
        if self.send(f"STATUS={text}"):
            self._last_status = text
            return True
        return False

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, message: str) -> bool:
        """Send one datagram; False (never an exception) if disabled or the send failed."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
            return True
        except OSError as exc:
            level = logging.DEBUG if self._failed_once else logging.WARNING
            self._failed_once = True
            log.log(level, "cannot send %r to the systemd notification socket %s: %s (later failures are "
                    "logged at debug level)", message.split("\n", 1)[0], self._label or self._address,
                    exc.strerror or exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


HEARTBEAT_SECONDS = 10.0


def start_heartbeat(loop, notifier: Notifier, status: Callable[[], str], every: float = HEARTBEAT_SECONDS) -> bool:
    """A repeating timer on the daemon's event loop: WATCHDOG=1 (when the watchdog is on) and a
    fresh STATUS= line (training steps advance without state changes). It runs on the loop, so a
    hung loop stops the pings and systemd's watchdog restarts the service. Returns False (and
    starts nothing) outside systemd."""
    if not notifier.enabled:
        return False
    interval = min(every, notifier.watchdog_interval() or every)

    def tick() -> None:
        try:
            if notifier.watchdog_interval():
                notifier.watchdog()
            notifier.status(status())
        except Exception:
            log.exception("cannot build the status line")
        finally:
            loop.call_later(interval, tick)

    tick()
    return True


# ---- the STATUS= line --------------------------------------------------------------------------
ACTIVE_ORDER = (("running", "training"), ("evaluating", "evaluating"), ("backoff", "restarting"),
                ("stopping", "stopping"), ("queued", "queued"), ("waiting", "waiting"))


def format_status(snapshot: dict) -> str:
    """The short status line for ``systemctl status``, from
    ``{"jobs": Commands.list_jobs(), "gpus": Commands.gpus()}``. Pure; at most STATUS_MAX chars.

    ``"{counts}; GPUs {used}/{total}; {job} step {step} {metric} {value}"`` where counts lists
    only the states that have jobs (``idle`` when none is active), and the last part names the
    training job that started first (with its best evaluation metric when the view has one).
    """
    jobs = list(snapshot.get("jobs") or [])
    counts: dict[str, int] = {}
    for view in jobs:
        counts[view.get("state", "")] = counts.get(view.get("state", ""), 0) + 1
    parts = [f"{counts[state]} {label}" for state, label in ACTIVE_ORDER if counts.get(state)]
    line = ", ".join(parts) if parts else "idle"
    gpus = snapshot.get("gpus") or {}
    total = list(gpus.get("total") or [])
    if total:
        used = len(total) - len([g for g in gpus.get("free") or [] if g in total])
        line += f"; GPUs {used}/{len(total)}"
    else:
        line += "; no GPUs"
    headline = _headline(jobs)
    if headline:
        room = STATUS_MAX - len(line) - 2
        if room >= 12:
            line += "; " + (headline if len(headline) <= room else headline[:room - 1] + "…")
    return line[:STATUS_MAX]


def _headline(jobs: list[dict]) -> str:
    active = [v for v in jobs if v.get("state") in ("running", "evaluating")]
    if not active:
        return ""
    view = min(active, key=lambda v: (v.get("started_at") is None, v.get("started_at") or 0.0))
    name = str(view.get("name", "?"))
    if len(name) > 40:
        name = name[:39] + "…"
    text = name
    if view.get("step") is not None:
        text += f" step {view['step']}"
    metric, value = _best(view)
    if value is not None:
        text += f" {str(metric or 'metric').rsplit('/', 1)[-1][:24]} {value:.3f}"
    return text


def _best(view: dict) -> tuple[str | None, float | None]:
    """The best evaluation so far: ``view["best"]`` = {"metric", "value"}, or the evaluation view's
    ``{"metric": ..., "best": {"value": ...}}``."""
    candidates = []
    if isinstance(view.get("best"), dict):
        candidates.append((view["best"].get("metric"), view["best"].get("value")))
    evaluation = view.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("best"), dict):
        candidates.append((evaluation.get("metric"), evaluation["best"].get("value")))
    for metric, value in candidates:
        try:
            if value is not None:
                return metric, float(value)
        except (TypeError, ValueError):
            continue
    return None, None
