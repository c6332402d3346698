"""What a starting daemon finds of the one before it: leftover workers and saved job records."""

from __future__ import annotations

import logging
import time

from oddaemon.adapters.procs import kill_leftover, process_start_time
from oddaemon.adapters.store import Store
from oddaemon.core.jobs import Job

log = logging.getLogger("oddaemon")


def kill_leftover_workers(store: Store, wait: float = 10.0) -> None:
    """Kill every worker recorded in the runtime files that is still the same process (pid and
    start time match), and wait for it to go, so that no job ever runs twice."""
    for name, runtime in store.load_runtime():
        for record in runtime.values():
            if isinstance(record, dict) and kill_leftover(record.get("pid", -1), record.get("start_time")):
                log.warning("killed a leftover %s worker of %s (pid %s)", record.get("role"), name, record.get("pid"))
                deadline = time.monotonic() + wait
                while process_start_time(record["pid"]) == record.get("start_time") and time.monotonic() < deadline:
                    time.sleep(0.05)
        store.clear_runtime(name)


def load_saved_jobs(store: Store) -> list[Job]:
    """Every saved job record that can be read; an unreadable or invalid one is logged and left in
    place (never deleted: an administrator can repair it)."""
    jobs = []
    for path, record, error in store.load_jobs():
        if record is None:
            log.error("cannot read saved job record %s: %s (left in place)", path, error)
            continue
        try:
            jobs.append(Job.from_dict(record))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("saved job record %s is not valid: %s (left in place)", path, exc)
    return jobs
