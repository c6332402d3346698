"""Every path rule the daemon and the CLI share, under ``state_dir`` and ``log_dir``: pure functions.

Under ``state_dir``::

    control.sock            the control socket (JSON lines; the CLI's way in)
    jobs/<name>.json        saved job record (survives daemon restarts; the truth about a job)
    work/<name>/job.json    what the worker is handed (spec + attempt)
    runtime/<name>.json     pids of live workers (only meaningful while the daemon that wrote it runs)
    evals/<name>.json       a job's evaluation book; evals/<name>/ the evaluator's result files
    preflight/              the warm preflight workers' working directory
    progress/<name>.json    how far a job's event files were read, and what was read (a restart goes on)

Under ``log_dir``: ``<name>/<role>.log`` (train, eval, export, preflight).
"""

from __future__ import annotations

import os

CONTROL_SOCKET = "control.sock"
WORKER_JOB = "job.json"
LOG_ROLES = ("train", "eval", "export", "preflight")


def control_socket(state_dir: str) -> str:
    return os.path.join(state_dir, CONTROL_SOCKET)


def jobs_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "jobs")


def saved_job(state_dir: str, name: str) -> str:
    return os.path.join(jobs_dir(state_dir), f"{name}.json")


def work_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "work")


def job_dir(state_dir: str, name: str) -> str:
    """A job's own directory, handed to its workers."""
    return os.path.join(work_dir(state_dir), name)


def worker_job(state_dir: str, name: str) -> str:
    """The ``job.json`` a job's workers are started with."""
    return os.path.join(job_dir(state_dir, name), WORKER_JOB)


def runtime_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "runtime")


def runtime_file(state_dir: str, name: str) -> str:
    return os.path.join(runtime_dir(state_dir), f"{name}.json")


def evals_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "evals")


def eval_book(state_dir: str, name: str) -> str:
    return os.path.join(evals_dir(state_dir), f"{name}.json")


def eval_results_dir(state_dir: str, name: str) -> str:
    return os.path.join(evals_dir(state_dir), name)


def preflight_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "preflight")


def waiting_notifications(state_dir: str) -> str:
    """Notifications a stopping daemon had not sent yet, for the next one (``core/notify_waiting``)."""
    return os.path.join(state_dir, "notifications-waiting.json")


def progress_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "progress")


def progress_file(state_dir: str, name: str) -> str:
    """A job's event file offsets and what was read before them (``service.progress``)."""
    return os.path.join(progress_dir(state_dir), f"{name}.json")


def log_name(role: str) -> str:
    """train.log, eval.log (the warm evaluator and one-shot evaluations), export.log, preflight.log."""
    return role if role in ("train", "preflight", "export") else "eval"


def log_file(log_dir: str, name: str, role: str) -> str:
    return os.path.join(log_dir, name, f"{log_name(role)}.log")
