"""A cgroup per worker: create it with the job's limits, put the worker in it before it execs
TensorFlow, read its numbers (CPU, memory, peak, OOM kills, IO, pressure), remove it when the worker
has exited. Two backends behind one interface, chosen by ``detect``:

* ``v2``: the unified hierarchy, in the subtree systemd delegates to the service (``Delegate=yes``):
  the daemon moves itself into the leaf ``daemon`` (cgroup v2 allows processes only in leaves), enables
  the memory, cpu and io controllers for the subtree, and each worker gets ``job-NAME-ROLE`` beside it
  (``memory.max``, ``memory.swap.max`` 0, ``memory.oom.group`` 1, ``cpu.weight``);
* ``v1``: a root daemon on a host with the v1 memory (and cpu, cpuacct) hierarchies: below the daemon's
  own cgroup in each, ``oddaemon-PID/job-NAME-ROLE`` (``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``
  where swap is accounted, ``cpu.shares``); no daemon leaf;
* ``none``: neither can be used; ``reason`` says why (logged once) and workers run as they always did.

``read_usage(group)`` only reads files: the metrics thread calls it at scrape time.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass

from oddaemon.core import cgroup_text as text
from oddaemon.core.resources import Limits, cgroup_name

log = logging.getLogger("oddaemon.adapters.cgroups")
ROOT = "/sys/fs/cgroup"
V2_CONTROLLERS = ("memory", "cpu", "io")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct")  # memory is required; the others where mounted


@dataclass(frozen=True)
class Group:
    """One cgroup (in each v1 hierarchy: a directory per controller)."""

    kind: str  # "v2" | "v1"
    name: str  # job-NAME-ROLE | daemon
    dirs: tuple[tuple[str, str], ...]  # (controller, directory); v2: (("", directory),)

    def dir(self, controller: str = "") -> str | None:
        return next((d for c, d in self.dirs if c == controller or self.kind == "v2"), None)

    def unique_dirs(self) -> list[str]:
        seen: list[str] = []
        for _, d in self.dirs:
            if d not in seen:
                seen.append(d)
        return seen


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read_usage(group: Group) -> dict | None:
    """What the kernel counts for ``group`` now; None when it is gone (the worker exited)."""
    if group.kind == "v2":
        d = group.dir()
        current = _read(os.path.join(d, "memory.current"))
        if current is None:
            return None
        cpu = text.flat_keyed(_read(os.path.join(d, "cpu.stat")) or "")
        events = text.flat_keyed(_read(os.path.join(d, "memory.events")) or "")
        io = _read(os.path.join(d, "io.stat"))
        read, written = text.io_bytes(io) if io is not None else (None, None)
        psi = text.pressure(_read(os.path.join(d, "memory.pressure")) or "")
        peak = _read(os.path.join(d, "memory.peak"))  # Linux 5.19+
        weight = _read(os.path.join(d, "cpu.weight"))
        return {"cpu_seconds": cpu["usage_usec"] / 1e6 if "usage_usec" in cpu else None,
                "memory_bytes": text.single_value(current),
                "memory_peak_bytes": text.single_value(peak) if peak is not None else None,
                "memory_max_bytes": text.single_value(_read(os.path.join(d, "memory.max")) or "max"),
                "oom_kills": events.get("oom_kill", 0),
                "io_read_bytes": read, "io_write_bytes": written,
                "memory_pressure_seconds": psi["some"]["total"] / 1e6 if "total" in psi.get("some", {}) else None,
                "cpu_weight": text.single_value(weight) if weight is not None else None}
    memory = group.dir("memory")
    current = _read(os.path.join(memory, "memory.usage_in_bytes")) if memory else None
    if current is None:
        return None
    cpuacct, cpu = group.dir("cpuacct"), group.dir("cpu")
    usage = _read(os.path.join(cpuacct, "cpuacct.usage")) if cpuacct else None
    shares = _read(os.path.join(cpu, "cpu.shares")) if cpu else None
    nanoseconds = text.single_value(usage) if usage is not None else None
    return {"cpu_seconds": nanoseconds / 1e9 if nanoseconds is not None else None,
            "memory_bytes": text.single_value(current),
            "memory_peak_bytes": text.single_value(_read(os.path.join(memory, "memory.max_usage_in_bytes")) or ""),
            "memory_max_bytes": text.v1_limit(_read(os.path.join(memory, "memory.limit_in_bytes")) or ""),
            "oom_kills": text.flat_keyed(_read(os.path.join(memory, "memory.oom_control")) or "").get("oom_kill", 0),
            "io_read_bytes": None, "io_write_bytes": None, "memory_pressure_seconds": None,
            "cpu_weight": round(text.single_value(shares) * 100 / 1024) if shares and text.single_value(shares)
            else None}


class NoCgroups:
    """Workers run in the daemon's own cgroup (as before); ``reason`` says why."""

    kind = "none"

    def __init__(self, reason: str):
        self.reason = reason

    def create(self, name: str, role: str, limits: Limits) -> Group | None:
        return None

    def place(self, group: Group, pid: int) -> None:
        pass

    def remove(self, group: Group) -> bool:
        return True

    def daemon_group(self) -> Group | None:
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"per-job cgroups off: {self.reason}; workers run in the daemon's own cgroup"


class _Tree:
    """What both backends share: a base directory per controller, job groups below it."""

    kind = ""
    reason = ""

    def __init__(self, bases: dict[str, str]):
        self.bases = bases  # controller -> directory ("" for v2)

    def _group(self, name: str) -> Group:
        return Group(self.kind, name, tuple((c, os.path.join(b, name)) for c, b in self.bases.items()))

    def create(self, name: str, role: str, limits: Limits) -> Group:
        """Make ``job-NAME-ROLE`` with ``limits`` (a leftover one of that name, empty, is replaced).
        Raises OSError."""
        group = self._group(cgroup_name(name, role))
        for d in group.unique_dirs():
            if os.path.isdir(d):
                self._rmdir(d)
            os.mkdir(d)
        try:
            self._limit(group, limits)
        except OSError:
            self.remove(group)
            raise
        return group

    def place(self, group: Group, pid: int) -> None:
        """Move ``pid`` (the worker, not yet exec'd) into ``group``. Raises OSError."""
        for d in group.unique_dirs():
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def remove(self, group: Group) -> bool:
        """Remove ``group``; False while processes are left in it (they are sent SIGKILL: try again)."""
        done = True
        for d in group.unique_dirs():
            try:
                self._rmdir(d)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove the cgroup %s: %s", d, exc.strerror)
                    continue
                done = False
                self._kill(d)
        return done

    @staticmethod
    def _rmdir(d: str) -> None:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass

    @staticmethod
    def _kill(d: str) -> None:
        for pid in text.procs(_read(os.path.join(d, "cgroup.procs")) or ""):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _limit(self, group: Group, limits: Limits) -> None:
        raise NotImplementedError

    def daemon_group(self) -> Group | None:
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        where = ", ".join(sorted(set(self.bases.values())))
        return f"per-job cgroups: cgroup {self.kind} under {where}"


class V2Cgroups(_Tree):
    kind = "v2"

    def __init__(self, base: str):
        super().__init__({"": base})
        self.base = base

    def setup(self) -> None:
        """The daemon into its leaf ``daemon``, the controllers enabled for the subtree. Raises OSError."""
        leaf = os.path.join(self.base, "daemon")
        os.makedirs(leaf, exist_ok=True)
        for pid in text.procs(_read(os.path.join(self.base, "cgroup.procs")) or ""):
            try:
                _write(os.path.join(leaf, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                pass
        available = text.controllers(_read(os.path.join(self.base, "cgroup.controllers")) or "")
        wanted = [c for c in V2_CONTROLLERS if c in available]
        _write(os.path.join(self.base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
        for entry in os.listdir(self.base):  # a previous daemon's, left empty
            if entry.startswith("job-") and os.path.isdir(os.path.join(self.base, entry)):
                try:
                    os.rmdir(os.path.join(self.base, entry))
                except OSError:
                    pass

    def _limit(self, group: Group, limits: Limits) -> None:
        d = group.dir()
        if limits.memory_max is not None:
            _write(os.path.join(d, "memory.max"), str(limits.memory_max))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")  # at its limit a worker is killed, not swapped
        if os.path.exists(os.path.join(d, "memory.oom.group")):
            _write(os.path.join(d, "memory.oom.group"), "1")  # the OOM killer takes the worker whole
        if limits.cpu_weight is not None and os.path.exists(os.path.join(d, "cpu.weight")):
            _write(os.path.join(d, "cpu.weight"), str(limits.cpu_weight))

    def daemon_group(self) -> Group:
        return self._group("daemon")


class V1Cgroups(_Tree):
    kind = "v1"

    def _limit(self, group: Group, limits: Limits) -> None:
        memory = group.dir("memory")
        if limits.memory_max is not None:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory_max))
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(limits.memory_max))
        cpu = group.dir("cpu")
        if limits.cpu_weight is not None and cpu is not None:
            _write(os.path.join(cpu, "cpu.shares"), str(max(2, limits.cpu_weight * 1024 // 100)))

    def close(self) -> None:
        """Remove the daemon's ``oddaemon-PID`` directories (each empty once its workers were removed)."""
        for d in sorted(set(self.bases.values())):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _delegated(path: str, euid: int) -> bool:
    """systemd marks a delegated cgroup with the extended attribute ``trusted.delegate`` (and, newer,
    ``user.delegate``) = 1; for a ``User=`` service it also hands the directory to that user, and nothing
    else gives an unprivileged process its own cgroup to write."""
    if euid != 0 and os.access(path, os.W_OK):
        return True
    for attr in ("user.delegate", "trusted.delegate"):
        try:
            if os.getxattr(path, attr) == b"1":
                return True
        except OSError:
            continue
    return False


def detect(mode: str = "auto", root: str = ROOT, proc_cgroup: str | None = None, euid: int | None = None,
           pid: int | None = None) -> NoCgroups | V1Cgroups | V2Cgroups:
    """The backend this daemon can use (``mode``: ``[cgroups] mode``), set up: v2 has moved the daemon into
    its leaf; v1 has made its ``oddaemon-PID`` directories."""
    if mode == "off":
        return NoCgroups('[cgroups] mode = "off"')
    own = text.proc_cgroups(proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup") or "")
    euid = os.geteuid() if euid is None else euid
    pid = os.getpid() if pid is None else pid
    unified = os.path.exists(os.path.join(root, "cgroup.controllers"))
    if unified and mode in ("auto", "v2"):
        return _v2(root, own, euid, forced=mode == "v2")
    if not unified and os.path.isdir(os.path.join(root, "memory")) and mode in ("auto", "v1"):
        return _v1(root, own, euid, pid)
    if mode != "auto":
        return NoCgroups(f'[cgroups] mode = "{mode}", but {root} is not a cgroup {mode} hierarchy')
    return NoCgroups(f"no cgroup v2 hierarchy and no cgroup v1 memory hierarchy at {root}")


def _v2(root: str, own: dict[str, str], euid: int, forced: bool) -> NoCgroups | V2Cgroups:
    path = own.get("")
    if path is None:
        return NoCgroups("/proc/self/cgroup names no cgroup v2 path")
    base = os.path.normpath(os.path.join(root, path.lstrip("/")))
    if path.rstrip("/").endswith("/daemon") and os.path.isdir(os.path.dirname(base)):
        base = os.path.dirname(base)  # already in its leaf (set up before, by this process)
    if not forced and not _delegated(base, euid):
        return NoCgroups(f"the cgroup v2 subtree {path} is not delegated to this daemon: run it as a systemd "
                         'service with Delegate=yes (or set [cgroups] mode = "v2" if it is delegated otherwise)')
    if not (os.access(base, os.W_OK) and os.access(os.path.join(base, "cgroup.subtree_control"), os.W_OK)):
        return NoCgroups(f"the cgroup v2 subtree {path} is not writable by this daemon (uid {euid}): "
                         "add Delegate=yes to its unit")
    available = text.controllers(_read(os.path.join(base, "cgroup.controllers")) or "")
    if "memory" not in available:
        return NoCgroups(f"the memory controller is not available in the cgroup v2 subtree {path} "
                         "(its parent's cgroup.subtree_control): Delegate=yes enables it")
    backend = V2Cgroups(base)
    try:
        backend.setup()
    except OSError as exc:
        return NoCgroups(f"cannot set up the cgroup v2 subtree {path}: {exc.strerror} ({exc.filename})")
    return backend


def _v1(root: str, own: dict[str, str], euid: int, pid: int) -> NoCgroups | V1Cgroups:
    if euid != 0:
        return NoCgroups(f"cgroup v1 hierarchies are written by root only (this daemon runs as uid {euid}); "
                         "per-job limits need cgroup v2 with Delegate=yes, or a root daemon")
    bases: dict[str, str] = {}
    for controller in V1_CONTROLLERS:
        mount = os.path.realpath(os.path.join(root, controller))  # "cpu" -> "cpu,cpuacct" where co-mounted
        if controller not in own or not os.path.isdir(mount):
            continue
        parent = os.path.normpath(os.path.join(mount, own[controller].lstrip("/")))
        _sweep_stale(parent)
        base = os.path.join(parent, f"oddaemon-{pid}")
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as exc:
            if controller == "memory":
                return NoCgroups(f"cannot create {base}: {exc.strerror} (the cgroup v1 memory hierarchy is not "
                                 "writable here, e.g. a container)")
            continue
        bases[controller] = base
    if "memory" not in bases:
        return NoCgroups(f"this process is in no cgroup v1 memory hierarchy under {root}")
    return V1Cgroups(bases)


def _sweep_stale(parent: str) -> None:
    """Remove ``oddaemon-PID`` directories of daemons that are gone (a SIGKILLed daemon leaves them)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        number = entry.removeprefix("oddaemon-")
        if entry.startswith("oddaemon-") and number.isdigit() and not os.path.exists(f"/proc/{number}"):
            stale = os.path.join(parent, entry)
            for child in os.listdir(stale) if os.path.isdir(stale) else ():
                if os.path.isdir(os.path.join(stale, child)):
                    try:
                        os.rmdir(os.path.join(stale, child))
                    except OSError:
                        pass
            try:
                os.rmdir(stale)
            except OSError:
                pass
