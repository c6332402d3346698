"""Configuration at start and on reload: the scheduler policy it gives, and what a reload may change."""

from __future__ import annotations

import dataclasses
import logging

from oddaemon.core.config import Config, load_config
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.jobs import Policy
from oddaemon.core.pinbudget import PinBudget

log = logging.getLogger("oddaemon")

# Settings a running daemon cannot change on reload (it warns and keeps the old value).
RESTART_ONLY = ("spool_dir", "state_dir", "log_dir", "gpus", "metrics_listen", "event_loop", "dbus_bus",
                "worker_preflight", "worker_user", "worker_allow_root")


def policy_of(config: Config) -> Policy:
    return Policy(max_restarts=config.max_restarts, backoff_base=config.backoff_base_seconds,
                  backoff_cap=config.backoff_cap_seconds, reset_after=config.restart_reset_after_seconds,
                  max_cpu_jobs=config.max_cpu_jobs, cluster_allocates=config.cluster_backend != "local")


def pin_budget_of(config: Config) -> PinBudget:
    return PinBudget(min_free_bytes=config.pins_min_free_bytes, min_free_percent=config.pins_min_free_percent,
                     max_bytes_per_job=config.pins_max_bytes_per_job)


def reread_config(current: Config) -> Config | None:
    """The configuration file read again, with the restart-only settings kept as they are; None
    (and an error in the log) when it cannot be read or is not valid."""
    if current.path is None:
        return None
    try:
        new = load_config(current.path)
    except OddaemonError as exc:
        log.error("reload: %s; keeping the running configuration", user_message(exc))
        return None
    fixed = [f for f in RESTART_ONLY if getattr(new, f) != getattr(current, f)]
    if fixed:
        log.warning("reload: %s changed; that takes a restart (systemctl restart oddaemon)", ", ".join(fixed))
        new = dataclasses.replace(new, **{f: getattr(current, f) for f in fixed})
    return new
