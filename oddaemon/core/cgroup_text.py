"""The text of cgroup files, parsed (``adapters/cgroups.py`` reads them): ``/proc/PID/cgroup``, flat
keyed files (cgroup v2 ``memory.events``, ``cpu.stat``; v1 ``memory.oom_control``), ``io.stat``, PSI
``memory.pressure``, single values ("max" = no limit). Pure; a malformed line is skipped, never an error."""

from __future__ import annotations


def proc_cgroups(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as controller -> path. The unified (v2) hierarchy is ``""``; a co-mounted v1
    hierarchy ("cpu,cpuacct") is listed under each of its controllers; ``name=systemd`` as itself."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for controller in controllers.split(",") if controllers else ():
            found[controller] = path
    return found


def flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``oom_kill 2``, ``usage_usec 123``) as ints; other lines are skipped."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def single_value(text: str) -> int | None:
    """One number (``memory.current``, ``cpuacct.usage``); ``max`` and anything unreadable: None."""
    word = text.strip().split()[0] if text.strip() else ""
    try:
        return int(word)
    except ValueError:
        return None


# v1 memory.limit_in_bytes reads this (rounded down to the page size) when no limit is set
V1_UNLIMITED = 2**62


def v1_limit(text: str) -> int | None:
    value = single_value(text)
    return None if value is None or value >= V1_UNLIMITED else value


def io_bytes(text: str) -> tuple[int, int]:
    """``io.stat`` (``8:0 rbytes=1 wbytes=2 rios=...``): bytes read and written, over all devices."""
    read = written = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key in ("rbytes", "wbytes") and value.isdigit():
                if key == "rbytes":
                    read += int(value)
                else:
                    written += int(value)
    return read, written


def pressure(text: str) -> dict[str, dict[str, float]]:
    """PSI (``some avg10=0.00 avg60=0.00 avg300=0.00 total=123``): ``{"some": {"avg10": 0.0, ..., "total": 123}}``
    (``total``: microseconds stalled)."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        values = {}
        for field in fields:
            key, _, value = field.partition("=")
            try:
                values[key] = float(value)
            except ValueError:
                continue
        if kind in ("some", "full") and values:
            found[kind] = values
    return found


def controllers(text: str) -> set[str]:
    """``cgroup.controllers`` / ``cgroup.subtree_control``: the controller names."""
    return set(text.split())


def procs(text: str) -> list[int]:
    """``cgroup.procs``: the pids."""
    return [int(w) for w in text.split() if w.isdigit()]
