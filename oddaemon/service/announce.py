"""What the daemon tells the outside world about itself: the Prometheus snapshot, D-Bus signals
and properties, and systemd's READY/STATUS/RELOADING/STOPPING/WATCHDOG notifications.

Everything here runs on the main-loop thread, except the metrics HTTP thread, which only reads
``snapshot`` (a dict that is replaced, never mutated).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from oddaemon.adapters import dbus_bus
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.metrics import SnapshotCollector, build_snapshot, serve
from oddaemon.adapters.sdnotify import Notifier, format_status, start_heartbeat
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config
from oddaemon.core.states import TERMINAL, JobState
from oddaemon.service import dbus_service
from oddaemon.service.cgroup_workers import cgroup_snapshot

log = logging.getLogger("oddaemon")

SNAPSHOT_DELAY = 1.0  # a burst of changes becomes one snapshot


class Announced(Protocol):
    """What the announcer reads of the daemon (``service/daemon.py``'s ``Daemon`` is one)."""

    config: Config
    loop: Loop
    clock: Callable[[], float]
    started_at: float
    rejected_total: int
    executor: object  # its workers' cgroups, when it has them (service/cgroup_workers.of)

    def views(self, shown: int = ...) -> list[dict]: ...

    def gpus(self) -> dict: ...

    def serving(self) -> bool: ...


class Announcer:
    """Subscribe ``state_changed`` to job state changes and ``checkpoint_evaluated`` to evaluations."""

    def __init__(self, daemon: Announced):
        self.daemon = daemon
        self.counters = {"rejected_files": 0, "worker_restarts": 0, "checkpoints_evaluated": 0}
        self.snapshot: dict | None = None
        self.metrics_server: object | None = None
        self._snapshot_timer: object | None = None
        self._expiry_timer: object | None = None
        # systemd: read NOTIFY_SOCKET/WATCHDOG_* and remove them from our environment (workers never see them)
        self.notifier = Notifier.from_env(unset=True)
        self.dbus: dbus_service.Service | None = None
        self._heartbeat = False

    # ---- start and stop
    def start_metrics(self) -> None:
        config = self.daemon.config
        address = config.metrics_address()
        if address is None:
            return
        try:
            self.metrics_server = serve(address, SnapshotCollector(lambda: self.snapshot))
        except OSError as exc:
            log.error("metrics endpoint %s unavailable: %s (the daemon runs on without it)",
                      config.metrics_listen, exc.strerror)
            return
        self.publish_snapshot()
        log.info("metrics on http://%s/metrics", config.metrics_listen)

    def start_dbus(self, commands: object) -> None:
        """Publish ``commands`` (``service/commands.py``) on the configured bus, unless it is "none"."""
        config = self.daemon.config
        bus = dbus_bus.resolve_bus(os.environ.get(dbus_bus.BUS_ENV) or config.dbus_bus)
        if bus != "none":
            self.dbus = dbus_service.publish(commands, bus=bus, submit_group=config.submit_group,
                                             loop=self.daemon.loop)

    def ready(self) -> None:
        if self.notifier.enabled:
            self.notifier.ready(self.status_line())
            if not self._heartbeat:
                self._heartbeat = start_heartbeat(self.daemon.loop, self.notifier, self.status_line)

    def reloading(self) -> None:
        self.notifier.reloading()

    def stop(self, status: str) -> None:
        self.notifier.stopping(status)
        if self.dbus is not None:
            self.dbus.unpublish()
            self.dbus = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None

    # ---- systemd
    def status_line(self) -> str:
        """The short STATUS= line systemctl status shows."""
        return format_status({"jobs": self.daemon.views(shown=0), "gpus": self.daemon.gpus()})

    # ---- events
    def state_changed(self, change: sch.StateChanged) -> None:
        if change.new == "backoff":
            self.counters["worker_restarts"] += 1
        if self.dbus is not None:
            self.dbus.emit_job_state_changed(change.name, change.old, change.new, change.reason)
        if self.notifier.enabled and self.daemon.serving():
            self.notifier.status(self.status_line())

    def checkpoint_evaluated(self, name: str, record: object) -> None:
        self.counters["checkpoints_evaluated"] += 1
        self.snapshot_soon()
        if self.dbus is not None:
            self.dbus.emit_checkpoint_evaluated(name, getattr(record, "step", None), getattr(record, "metrics", {}))

    # ---- the metrics snapshot
    def snapshot_soon(self) -> None:
        """Publish a fresh snapshot within a second (coalesces bursts of changes)."""
        if self._snapshot_timer is None and self.metrics_server is not None:
            self._snapshot_timer = self.daemon.loop.call_later(SNAPSHOT_DELAY, self.publish_snapshot)

    def publish_snapshot(self) -> None:
        d = self.daemon
        self._snapshot_timer = None
        self.counters["rejected_files"] = d.rejected_total
        self.snapshot = build_snapshot(d.views(shown=0), d.gpus(), dict(self.counters), d.started_at, d.clock(),
                                       d.config.metrics_max_finished_jobs, d.config.metrics_finished_max_age_seconds,
                                       cgroups=cgroup_snapshot(d.executor))
        # Finished jobs leave the export when they age out, even if nothing else happens by then.
        ends = [v["finished_at"] for v in self.snapshot["jobs"]
                if JobState(v["state"]) in TERMINAL and v["finished_at"] is not None]
        if ends and self._expiry_timer is None and self.metrics_server is not None:
            due = min(ends) + d.config.metrics_finished_max_age_seconds - d.clock()
            self._expiry_timer = d.loop.call_later(max(0.0, due) + 1.0, self._expire_finished)

    def _expire_finished(self) -> None:
        self._expiry_timer = None
        self.snapshot_soon()
