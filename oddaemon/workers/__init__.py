"""The real TF workers (TF2 Object Detection API), run by the daemon as subprocesses:

    python -m oddaemon.workers train       --job JOB.json
    python -m oddaemon.workers eval        --job JOB.json --checkpoint PREFIX --result OUT.json
    python -m oddaemon.workers eval-serve  --job JOB.json --reply-fd N   (warm evaluator, oddaemon/service/warm.py)
    python -m oddaemon.workers export      --job JOB.json --checkpoint PREFIX --output DIR
    python -m oddaemon.workers preflight   --job JOB.json --result OUT.json
    python -m oddaemon.workers doctor      [--root PATH ...]
    python -m oddaemon.workers generate-demo --out DIR [--model effdet_d0|ssd_mobilenet_tiny]

This package is the only one that imports tensorflow / object_detection, and only inside the
worker modules' functions: importing ``oddaemon.workers`` itself costs nothing (the stdlib and
oddaemon's pure core), so the tests may import the helpers below. Of oddaemon, the workers may
import only core, formats and workers.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable

from oddaemon.core.jobspec import gpu_count

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad arguments, unreadable job file, missing/corrupt checkpoint
EXIT_TERMINATED = 143  # 128 + SIGTERM

_cleanups: list[Callable[[], None]] = []


class WorkerError(Exception):
    """A failure with a complete user message; the worker prints it and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_job(path: str) -> dict:
    """JOB.json: {"spec": JobSpec.to_dict(), "attempt": N, "gpus": [...], "log_path": "..."}."""
    try:
        with open(path, "rb") as f:
            job = json.loads(f.read())
    except OSError as exc:
        raise WorkerError(f"cannot read job file {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    except ValueError as exc:
        raise WorkerError(f"job file {path} is not valid JSON: {exc}", EXIT_USAGE) from None
    spec = job.get("spec") if isinstance(job, dict) else None
    if not isinstance(spec, dict):
        raise WorkerError(f"job file {path} has no \"spec\" object", EXIT_USAGE)
    for key in ("pipeline_config", "model_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise WorkerError(f"job file {path}: spec.{key} is missing", EXIT_USAGE)
    for table in ("pipeline", "train", "eval"):
        if not isinstance(spec.get(table) or {}, dict):
            raise WorkerError(f"job file {path}: spec.{table} must be an object", EXIT_USAGE)
        spec[table] = spec.get(table) or {}
    return job


def setting(table: dict, key: str, default):
    value = table.get(key)
    return default if value is None else value


def gpu_count_for(job: dict) -> int | None:
    """GPUs this job gets: the daemon's allocation ("gpus" in JOB.json), else [train] gpus, else
    None (auto: not known until the daemon allocates)."""
    allocated = job.get("gpus")
    if isinstance(allocated, list):
        return gpu_count(allocated)
    wanted = job["spec"]["train"].get("gpus")
    if isinstance(wanted, bool) or not isinstance(wanted, (int, list)):
        return None  # auto (or no gpus value at all)
    return gpu_count(wanted)


def write_json_atomic(path: str, data: dict) -> None:
    """tmp file in the same directory, fsync, rename: a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    on_cleanup(lambda: _remove(temp))
    with open(temp, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=1, sort_keys=False, allow_nan=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def on_cleanup(function: Callable[[], None]) -> None:
    """Run ``function`` (best effort) when SIGTERM ends the worker."""
    _cleanups.append(function)


def exit_on_sigterm() -> None:
    """Make SIGTERM end the process promptly (exit status 143), even while TF runs a long op.

    Python handlers only run between bytecodes of the main thread, which can be minutes inside one
    tf.function call. Instead SIGTERM is blocked in every thread (call this before tensorflow starts
    its threads, and before numpy is imported: OpenBLAS starts threads at import; threads inherit
    the mask) and one thread waits for it with sigwait, runs the cleanups,
    and leaves with os._exit. Checkpoints are safe: TF writes a checkpoint's files before it updates
    the ``checkpoint`` state file, so the latest recorded checkpoint is always complete."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        try:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            err(f"oddaemon.workers {command}: SIGTERM received, exiting")
            for cleanup in reversed(_cleanups):
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
        finally:
            os._exit(EXIT_TERMINATED)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()
