"""A train worker's exit as the scheduler's event: the failure, with the batch size for an
out-of-memory exit and, when the job asks for it, the smaller batch to restart with; and the daemon's
log line for every worker's exit (``log_exit``)."""

from __future__ import annotations

import logging
from dataclasses import replace

from oddaemon.adapters.journal import job_fields
from oddaemon.core.events import ProcessExited
from oddaemon.core.failures import Failure, describe_returncode
from oddaemon.core.jobs import Job
from oddaemon.core.remedies import explain_oom
from oddaemon.formats.pipeline_numbers import read_pipeline_numbers
from oddaemon.service.executor import RunningWorker

log = logging.getLogger("oddaemon")


def log_exit(worker: RunningWorker, returncode: int, failure: Failure | None) -> None:
    """The daemon's line for a worker's end (its job, role and failure kind as journal fields)."""
    if worker.role == "preflight":
        return  # a shared warm preflight worker, not one job's
    how = describe_returncode(returncode) + (f": {failure.kind}: {failure.message}" if failure is not None else "")
    log.info("job %s: %s worker exited (pid %s, %s)", worker.name, worker.role, worker.pid, how,
             extra=job_fields(worker.name, role=worker.role, failure=failure.kind if failure is not None else None,
                              attempt=worker.attempt))


def exit_event(job: Job | None, worker: RunningWorker, returncode: int, failure: Failure | None) -> ProcessExited:
    remedy = None
    if job is not None and failure is not None and failure.kind == "oom":
        from_file = read_pipeline_numbers(job.spec.pipeline_config)
        message, remedy = explain_oom(job.spec, failure.message, len(job.gpus), from_file)
        failure = replace(failure, message=message)
    return ProcessExited(worker.name, worker.attempt, returncode, failure=failure, remedy=remedy)
