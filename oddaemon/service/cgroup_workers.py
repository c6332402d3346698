"""The local executor's cgroups (``adapters/cgroups.py``): one per train, eval and export worker, made
with its limits before it starts, read when it exits (its peak memory, whether the OOM killer ended it:
failure kind ``host-oom``), removed after (retried while a straggler is still in it). The live groups
are what the metrics read at scrape time and ``oddaemon status`` shows."""

from __future__ import annotations

import atexit
import logging
import signal
from collections.abc import Callable

from oddaemon.adapters.cgroups import Group, NoCgroups, V1Cgroups, V2Cgroups, detect, read_usage
from oddaemon.adapters.loop import Loop
from oddaemon.core.failures import Failure
from oddaemon.core.resources import Limits, format_bytes, host_oom_failure

log = logging.getLogger("oddaemon")
REMOVE_RETRY_SECONDS = 1.0
REMOVE_TRIES = 30


def of(executor: object) -> WorkerCgroups | None:
    """The executor's cgroups: a local executor's, or that of the one a cluster executor runs its served
    workers with (``SlurmExecutor.local``); None for others (a test's fake)."""
    found = getattr(executor, "cgroups", None) or getattr(getattr(executor, "local", None), "cgroups", None)
    return found if isinstance(found, WorkerCgroups) else None


def cgroup_snapshot(executor: object) -> dict:
    """What the metrics snapshot holds of the cgroups (the files are read at scrape time)."""
    cgroups = of(executor)
    if cgroups is None:
        return {"backend": "none", "groups": [], "daemon": None}
    return {"backend": cgroups.kind, "groups": cgroups.groups(), "daemon": cgroups.daemon_group()}


class WorkerCgroups:
    def __init__(self, backend: NoCgroups | V1Cgroups | V2Cgroups, loop: Loop):
        self.backend = backend
        self.loop = loop
        self.live: dict[tuple[str, str], Group] = {}  # (job, role) -> its worker's group
        self.limits: dict[tuple[str, str], Limits] = {}
        self.last: dict[tuple[str, str], dict] = {}  # what the last exited worker of (job, role) used
        if backend.kind == "none":
            log.warning("%s", backend.describe())
        else:
            log.info("%s", backend.describe())
            atexit.register(self.close)

    @classmethod
    def detected(cls, mode: str, loop: Loop) -> WorkerCgroups:
        return cls(detect(mode), loop)

    @property
    def kind(self) -> str:
        return self.backend.kind

    def prepare(self, name: str, role: str, limits: Limits) -> Callable[[int], None] | None:
        """Make the worker's group; the ``place(pid)`` for ``spawn``, or None (no cgroups, or it failed: logged)."""
        try:
            group = self.backend.create(name, role, limits)
        except OSError as exc:
            log.warning("job %s: cannot create the cgroup of its %s worker: %s (%s); it runs without its limits",
                        name, role, exc.strerror, exc.filename)
            return None
        if group is None:
            return None
        self.live[(name, role)] = group
        self.limits[(name, role)] = limits
        return lambda pid: self.backend.place(group, pid)

    def not_started(self, name: str, role: str) -> None:
        group = self.live.pop((name, role), None)
        if group is not None:
            self._remove(group, REMOVE_TRIES)

    def ended(self, name: str, role: str, returncode: int, failure: Failure | None,
              imposed: bool) -> tuple[Failure | None, str]:
        """The worker of (name, role) exited: its failure (``host-oom`` when the OOM killer ended it in its
        group and the daemon did not stop it itself) and a note for its log; the group is removed."""
        group = self.live.pop((name, role), None)
        limits = self.limits.pop((name, role), Limits())
        if group is None:
            return failure, ""
        usage = read_usage(group) or {}
        self.last[(name, role)] = usage
        self._remove(group, REMOVE_TRIES)
        peak = usage.get("memory_peak_bytes")
        note = f", peak memory {format_bytes(peak)}" if peak else ""
        if usage.get("oom_kills") and returncode != 0 and not imposed:
            failure = host_oom_failure(name, role, peak or usage.get("memory_bytes"), limits.memory_max)
            log.warning("job %s: %s", name, failure.message)
        elif usage.get("oom_kills") and returncode == -signal.SIGKILL:
            note += f", {usage['oom_kills']} OOM kill(s) in its cgroup"
        return failure, note

    def groups(self) -> list[tuple[str, str, Group]]:
        """The live groups, for the metrics snapshot (read at scrape time)."""
        return [(name, role, group) for (name, role), group in sorted(self.live.items())]

    def usage(self, name: str) -> dict[str, dict]:
        """What each live worker of the job uses now, by role (``oddaemon status``)."""
        found = {}
        for (job, role), group in sorted(self.live.items()):
            if job == name:
                usage = read_usage(group)
                if usage is not None:
                    found[role] = {k: v for k, v in usage.items() if v is not None}
        return found

    def daemon_group(self) -> Group | None:
        return self.backend.daemon_group()

    def _remove(self, group: Group, tries: int) -> None:
        if self.backend.remove(group) or tries <= 1:
            if tries <= 1:
                log.warning("cgroup %s still holds processes; left in place", group.name)
            return
        self.loop.call_later(REMOVE_RETRY_SECONDS, lambda: self._remove(group, tries - 1))

    def close(self) -> None:
        """The daemon is exiting: remove what is left (its workers are gone by now)."""
        for group in self.live.values():
            self.backend.remove(group)
        self.live.clear()
        self.backend.close()
