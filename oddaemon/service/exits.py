"""A train worker's exit as the scheduler's event: the failure, with the batch size for an
out-of-memory exit and, when the job asks for it, the smaller batch to restart with."""

from __future__ import annotations

from dataclasses import replace

from oddaemon.core.events import ProcessExited
from oddaemon.core.failures import Failure
from oddaemon.core.jobs import Job
from oddaemon.core.remedies import explain_oom
from oddaemon.formats.pipeline_numbers import read_pipeline_numbers
from oddaemon.service.executor import RunningWorker


def exit_event(job: Job | None, worker: RunningWorker, returncode: int, failure: Failure | None) -> ProcessExited:
    remedy = None
    if job is not None and failure is not None and failure.kind == "oom":
        from_file = read_pipeline_numbers(job.spec.pipeline_config)
        message, remedy = explain_oom(job.spec, failure.message, len(job.gpus), from_file)
        failure = replace(failure, message=message)
    return ProcessExited(worker.name, worker.attempt, returncode, failure=failure, remedy=remedy)
