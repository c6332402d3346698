"""Job dependencies (``after = ["job-a", ...]``): the key's check, what a submission may name, and
what a waiting job becomes as its dependencies end. Pure; the scheduler calls these and makes the
state changes itself (``scheduler.transition``).

The rules (README "Job spec v1", ``after``):

* A job may only wait for jobs the daemon already knows (submitted before it, finished or not);
  an unknown name, or a chain of dependencies that leads back to the job, rejects the submission
  with the names. A job that names a dependency that already failed or was cancelled is rejected
  too (retry that one first): accepting it only to cancel it at once would help nobody.
* A job whose dependencies have all succeeded is queued at once; otherwise it is ``waiting`` until
  they have (then ``queued``), or until one of them fails or is cancelled (then it is ``cancelled``,
  the reason naming that dependency and why it ended).
* ``oddaemon retry`` of such a job queues it when its dependencies have succeeded, makes it wait
  again while some are still to finish, and is refused while one of them is failed or cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from oddaemon.core.checks import Invalid, show
from oddaemon.core.events import Action, SaveJob
from oddaemon.core.job_paths import under_roots
from oddaemon.core.jobspec import NAME_RULE, name_problem
from oddaemon.core.states import JobState

if TYPE_CHECKING:
    from oddaemon.core.jobs import Job
    from oddaemon.core.jobspec import JobSpec

MAX_AFTER = 64  # dependencies one job may name
REASON_CHARS = 300  # of a dependency's own reason, quoted in a cancelled dependent's reason
ENDED_BADLY = (JobState.FAILED, JobState.CANCELLED)


def parse_after(value: Any) -> tuple[str, ...]:
    """The ``after`` key's checker: a list of distinct valid job names (at most ``MAX_AFTER``)."""
    if not isinstance(value, list):
        raise Invalid(f'must be a list of job names such as ["prepare-data"], got {show(value)}')
    if len(value) > MAX_AFTER:
        raise Invalid(f"names {len(value)} jobs; a job may wait for at most {MAX_AFTER}")
    seen: set[str] = set()
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise Invalid(f"entry {i + 1} must be a job name (a string), got {show(name)}")
        reason = name_problem(name)
        if reason:
            raise Invalid(f"entry {i + 1} is not a valid job name: {reason}; {NAME_RULE}")
        if name in seen:
            raise Invalid(f"{show(name)} is listed twice")
        seen.add(name)
    return tuple(value)


def self_problem(name: str, after: tuple[str, ...]) -> str | None:
    """Why a job's ``after`` names the job itself (the shortest cycle), or None."""
    if name in after:
        return f"names this job itself ('{name}'): a job cannot wait for itself (a cycle: {name} -> {name})"
    return None


def find_cycle(name: str, after: tuple[str, ...], jobs: Mapping[str, Job]) -> list[str] | None:
    """The chain ``name -> ... -> name`` that ``after`` would close through the known jobs' own
    ``after``, or None. Iterative, each job visited once: O(jobs + dependencies)."""
    parent: dict[str, str] = {}
    stack = [(dep, name) for dep in reversed(after)]
    while stack:
        node, via = stack.pop()
        if node == name:
            chain = [via]
            while chain[-1] != name:
                chain.append(parent[chain[-1]])
            return [name, *reversed(chain[:-1]), name] if len(chain) > 1 else [name, name]
        if node in parent or node not in jobs:
            continue
        parent[node] = via
        stack += [(dep, node) for dep in reversed(jobs[node].spec.after)]
    return None


def submission_problem(spec: JobSpec, jobs: Mapping[str, Job]) -> str | None:
    """Why a job may not wait for its ``after`` (words after "job 'name' "), or None."""
    name, after = spec.name, spec.after
    unknown = [d for d in after if d not in jobs]
    if unknown:
        listed = ", ".join(f"'{d}'" for d in unknown)
        return (f"waits for (after) {'a job' if len(unknown) == 1 else 'jobs'} the daemon does not know: {listed}; "
                "a job can only wait for jobs submitted before it: submit those first, or fix the names")
    cycle = find_cycle(name, after, jobs)
    if cycle:
        return (f"would close a cycle of dependencies (after): {' -> '.join(cycle)}; no job of it could ever "
                "start: remove one of them from after")
    ended = [jobs[d] for d in after if jobs[d].state in ENDED_BADLY]
    if ended:
        listed = ", ".join(f"'{j.name}' ({j.state})" for j in ended)
        return (f"waits for (after) {listed}, which will not succeed as it is: `oddaemon retry "
                f"{ended[0].name}` first and submit this job again, or leave it out of after")
    return awaited_problem(spec, jobs)


def awaited_problem(spec: JobSpec, jobs: Mapping[str, Job]) -> str | None:
    """Why a fine_tune_checkpoint that did not exist at submission (``spec.awaits_checkpoint``) will
    not be written by a job in ``after`` (words after "job 'name' "), or None: it must lie in the
    model_dir of one of them."""
    awaited = spec.awaits_checkpoint
    if not awaited:
        return None
    dirs = [(d, jobs[d].spec.model_dir) for d in spec.after if d in jobs]
    if under_roots(awaited, tuple(model_dir for _, model_dir in dirs)):
        return None
    listed = ", ".join(f"'{d}' writes {model_dir}" for d, model_dir in dirs)
    return (f"has [pipeline] fine_tune_checkpoint {spec.pipeline.fine_tune_checkpoint}, which does not exist "
            f"({spec.pipeline.fine_tune_checkpoint}.index) and is not in the model_dir of a job it waits for "
            f"(after: {listed}): give an existing checkpoint prefix, or one that a job in after writes "
            f"(e.g. {dirs[0][1].rstrip('/')}/exported/checkpoint/ckpt-0 with its [eval] export_best = true)")


def awaited_missing(spec: JobSpec, jobs: Mapping[str, Job], exists: bool) -> str | None:
    """At a start: why the job cannot start because the checkpoint it awaited is still not there
    (``exists`` False), naming the jobs that were to write it; None when it exists or was never awaited."""
    if exists or not spec.awaits_checkpoint:
        return None
    done = [f"'{d}' ({jobs[d].state})" if d in jobs else f"'{d}'" for d in spec.after]
    return (f"[pipeline] fine_tune_checkpoint {spec.pipeline.fine_tune_checkpoint} does not exist "
            f"({spec.pipeline.fine_tune_checkpoint}.index): the job(s) it waits for (after: {', '.join(done)}) "
            "did not write it; a job writes exported/checkpoint/ckpt-0 in its model_dir with [eval] export_best = "
            "true. Fix the path (submit the job again) or run that job with export_best, then oddaemon retry")


@dataclass(frozen=True)
class Verdict:
    """What a job with dependencies is to become: ``state`` (None: stays as it is, or, for a retry,
    refused with ``reason``), why, and the dependencies that have not succeeded yet."""

    state: JobState | None
    reason: str
    pending: tuple[str, ...] = ()


def waiting_reason(pending: tuple[str, ...]) -> str:
    return f"waiting for {', '.join(pending)} (after)"


def pending_of(after: tuple[str, ...], jobs: Mapping[str, Job]) -> tuple[str, ...]:
    """The dependencies that have not succeeded (yet)."""
    return tuple(d for d in after if d not in jobs or jobs[d].state is not JobState.SUCCEEDED)


def on_submit(after: tuple[str, ...], jobs: Mapping[str, Job]) -> Verdict:
    """The first state of a job that passed ``submission_problem``: queued or waiting."""
    pending = pending_of(after, jobs)
    if not pending:
        return Verdict(JobState.QUEUED, "submitted" + (f"; {', '.join(after)} already succeeded" if after else ""))
    return Verdict(JobState.WAITING, f"submitted; {waiting_reason(pending)}", pending)


def on_change(job: Job, jobs: Mapping[str, Job]) -> Verdict:
    """A waiting job, after any change: queued (every dependency succeeded), cancelled (one failed,
    was cancelled or is no longer known), or still waiting (``state`` None) for ``pending``."""
    for dep in job.spec.after:
        other = jobs.get(dep)
        if other is None:
            return Verdict(JobState.CANCELLED, f"job '{dep}' it waits for (after) is no longer known to the daemon "
                                               "(its saved record could not be read)")
        if other.state in ENDED_BADLY:
            why = other.reason if len(other.reason) <= REASON_CHARS else other.reason[:REASON_CHARS] + "..."
            return Verdict(JobState.CANCELLED, f"job '{dep}' it waits for (after) {other.state}: {why}")
    pending = pending_of(job.spec.after, jobs)
    if not pending:
        return Verdict(JobState.QUEUED, f"{', '.join(job.spec.after)} succeeded (after)")
    return Verdict(None, waiting_reason(pending), pending)


def on_retry(job: Job, jobs: Mapping[str, Job]) -> Verdict:
    """``oddaemon retry`` of a failed or cancelled job: queued, waiting again, or refused (``state``
    None, ``reason`` for the user) while a dependency cannot succeed as it is."""
    unknown = [d for d in job.spec.after if d not in jobs]
    if unknown:
        return Verdict(None, f"job '{job.name}' waits for (after) '{unknown[0]}', which the daemon no longer knows")
    ended = [jobs[d] for d in job.spec.after if jobs[d].state in ENDED_BADLY]
    if ended:
        return Verdict(None, f"job '{job.name}' waits for (after) '{ended[0].name}', which is {ended[0].state}: "
                             f"`oddaemon retry {ended[0].name}` first, then this one")
    pending = pending_of(job.spec.after, jobs)
    if pending:
        return Verdict(JobState.WAITING, f"retry requested; {waiting_reason(pending)}", pending)
    return Verdict(JobState.QUEUED, "retry requested")


def release_waiting(jobs: dict[str, Job], now: float,
                    transition: Callable[..., tuple[Job, list[Action]]]) -> list[Action]:
    """Every waiting job after a scheduler step (``transition`` is the scheduler's one guarded state
    change): queued when all its dependencies succeeded, cancelled when one did not, else its
    ``waiting_for`` brought up to date. In submission order, so a chain (C after B after A) resolves
    in one pass: a job's dependencies were always submitted before it."""
    actions: list[Action] = []
    for job in sorted((j for j in jobs.values() if j.state is JobState.WAITING), key=lambda j: j.seq):
        verdict = on_change(job, jobs)
        if verdict.state is not None:
            jobs[job.name], acts = transition(job, verdict.state, now, verdict.reason)
            actions += acts
        elif verdict.pending != job.waiting_for:  # one of several succeeded: still waiting, for fewer
            jobs[job.name] = replace(job, waiting_for=verdict.pending, reason=verdict.reason)
            actions.append(SaveJob(jobs[job.name]))
    return actions
