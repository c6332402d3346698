"""The pure scheduler: ``step(state, event, now) -> (state, actions)``.

No I/O, no clock, no processes: the daemon feeds it events (a job submitted, a process
exited, a timer fired, a cancel) with the current time and executes the actions it returns.

Policy
------
* Rank: higher ``priority`` first, then submission order (``seq``).
* A job with ``after`` is ``waiting`` until those jobs succeeded, then queued; cancelled when one of
  them fails or is cancelled (``core/dependencies.py``).
* Two resource pools: GPUs (exclusive ids) and CPU slots (``max_cpu_jobs``). Within a pool the
  queue is strict: once a job at the head cannot fit, no lower-ranked job of that pool starts
  (no backfill), so a big high-priority job is never starved by a stream of small ones.
* A job that can never fit (more GPUs than exist, an id that does not exist) is rejected at
  submission, never queued forever.
* A failed train process that failed in a way a restart cannot fix (``Failure.retry`` false: a NaN
  loss, a corrupt or empty input, a bad fine-tune checkpoint) fails the job at once. Out of GPU
  memory with ``oom_retry_halve_batch``: restarted at once with the ``Remedy`` the daemon computed
  (half the batch), which counts as a restart but not as a consecutive failure.
* Any other failed train process is restarted after ``min(cap, base * 2**(n-1))`` seconds, where n
  counts consecutive failures (a run longer than ``reset_after`` starts the count again);
  after ``max_restarts`` consecutive failures the job is ``failed`` with the reason. GPUs stay
  held during backoff so the job resumes where it was.
"""

from __future__ import annotations

from dataclasses import replace

from oddaemon.core import dependencies, notifications, user_requests
from oddaemon.core.events import (
    Accepted,
    Action,
    Cancel,
    EarlyStop,
    EvalPlacement,
    EvaluationsDone,
    EvaluatorStopped,
    Event,
    Finish,
    NotificationRecorded,
    PlaceEvaluator,
    PolicyChanged,
    ProcessExited,
    Refused,
    Rejected,
    Restore,
    Retry,
    SaveJob,
    SetPriority,
    StartTrain,
    StateChanged,
    StopEvaluator,
    StopTrain,
    Submit,
    Tick,
    TrainingEnded,
    WakeAt,
    WorkerRefused,
)
from oddaemon.core.failures import describe_returncode
from oddaemon.core.jobs import HISTORY_LIMIT, Job, Policy, State
from oddaemon.core.placement import allocate, clash_detail, fits_ever, model_dir_clash, resolve_wants
from oddaemon.core.remedies import Remedy
from oddaemon.core.states import TERMINAL, JobState
from oddaemon.core.transitions import training_over, transition

__all__ = ["Accepted", "Action", "Cancel", "EarlyStop", "EvalPlacement", "EvaluationsDone", "EvaluatorStopped", "Event",
           "Finish", "Job", "NotificationRecorded", "PlaceEvaluator", "Policy", "PolicyChanged", "ProcessExited",
           "Refused", "Rejected", "Restore", "Retry", "SaveJob", "SetPriority", "StartTrain", "State", "StateChanged",
           "StopEvaluator", "StopTrain", "Submit", "Tick", "TrainingEnded", "WakeAt", "WorkerRefused", "step",
           "transition"]

# ---- step ---------------------------------------------------------------------------------


def step(state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    jobs = dict(state.jobs)
    actions: list[Action] = []
    next_seq = state.next_seq
    if isinstance(event, Submit):
        next_seq = _submit(state, jobs, event, now, actions)
    elif isinstance(event, ProcessExited):
        _exited(state.policy, jobs, event, now, actions)
    elif isinstance(event, Cancel):
        user_requests.cancel(jobs, event.name, now, actions)
    elif isinstance(event, Finish):
        user_requests.finish(jobs, event.name, now, actions)
    elif isinstance(event, Retry):
        user_requests.retry(state, jobs, event.name, now, actions)
    elif isinstance(event, SetPriority):
        user_requests.set_priority(jobs, event.name, event.priority, now, actions)
    elif isinstance(event, Restore):
        next_seq = _restore(state, jobs, event, now, actions)
    elif isinstance(event, EarlyStop):
        _early_stop(jobs, event, now, actions)
    elif isinstance(event, EvaluationsDone):
        _evaluations_done(jobs, event.name, now, actions)
    elif isinstance(event, PlaceEvaluator):
        _place_evaluator(state, jobs, event.name, actions)
    elif isinstance(event, EvaluatorStopped):
        if event.name in jobs and jobs[event.name].eval_gpus:
            jobs[event.name] = replace(jobs[event.name], eval_gpus=())
            actions.append(SaveJob(jobs[event.name]))
    elif isinstance(event, WorkerRefused):
        _worker_refused(jobs, event, now, actions)
    elif isinstance(event, PolicyChanged):
        state = replace(state, policy=event.policy)
    elif isinstance(event, NotificationRecorded) and event.name in jobs:
        job = jobs[event.name]
        jobs[event.name] = replace(job, history=notifications.record(job.history, now, event.text, HISTORY_LIMIT))
        actions.append(SaveJob(jobs[event.name]))
    actions += dependencies.release_waiting(jobs, now, transition)  # queued or cancelled as dependencies end
    new_state = replace(state, jobs=jobs, next_seq=next_seq)
    new_state, more = _schedule(new_state, now)
    return new_state, actions + more


def _submit(state: State, jobs: dict[str, Job], ev: Submit, now: float, actions: list[Action]) -> int:
    name = ev.spec.name
    existing = jobs.get(name)
    if existing is not None and existing.state not in TERMINAL:
        actions.append(Rejected(ev.token, f"a job named '{name}' already exists and is {existing.state}; "
                                          "cancel it first or choose another name"))
        return state.next_seq
    if existing is not None:  # finished: its record, history and evaluations are kept, never replaced
        again = (f", or `oddaemon retry {name}` to run it again" if existing.state is not JobState.SUCCEEDED
                 else "")
        actions.append(Rejected(ev.token, f"a job named '{name}' already ran and is {existing.state}; its record, "
                                          f"history and evaluations are kept: choose another name{again}"))
        return state.next_seq
    for other in jobs.values():
        if other.name == name or other.state in TERMINAL:
            continue
        clash = model_dir_clash(ev.spec.model_dir, other.spec.model_dir)
        if clash:
            actions.append(Rejected(ev.token, f"model_dir {ev.spec.model_dir} {clash} job '{other.name}' "
                                              f"({other.state}){clash_detail(clash, other.spec.model_dir)}"))
            return state.next_seq
    wants = resolve_wants(ev.spec, state.inventory, state.policy.cluster_allocates)
    why_not = fits_ever(wants, state.inventory, state.policy.cluster_allocates)
    if why_not:
        actions.append(Rejected(ev.token, f"job '{name}' can never run here: it {why_not}"))
        return state.next_seq
    waits_badly = dependencies.submission_problem(ev.spec, jobs)  # unknown, a cycle, failed
    if waits_badly:
        actions.append(Rejected(ev.token, f"job '{name}' {waits_badly}"))
        return state.next_seq
    first = dependencies.on_submit(ev.spec.after, jobs)  # queued, or waiting for its dependencies
    job = Job(name=name, seq=state.next_seq, spec=ev.spec, wants=wants, submitted_at=now, state=first.state,
              reason=first.reason, waiting_for=first.pending, history=((now, first.state.value, first.reason),))
    jobs[name] = job
    actions += [SaveJob(job), Accepted(name, ev.token), StateChanged(name, "", first.state.value, first.reason)]
    return state.next_seq + 1


def _exited(policy: Policy, jobs: dict[str, Job], ev: ProcessExited, now: float, actions: list[Action]) -> None:
    job = jobs.get(ev.name)
    if job is None or job.attempt != ev.attempt or job.state not in (JobState.RUNNING, JobState.STOPPING):
        return  # a stale exit (an earlier attempt): nothing to do
    exit_text = describe_returncode(ev.returncode)
    failure = ev.failure
    if job.state is JobState.STOPPING and job.stop_reason:
        jobs[job.name], acts = training_over(job, now, job.stop_reason, last_exit=exit_text)
    elif job.state is JobState.STOPPING:
        jobs[job.name], acts = transition(job, JobState.CANCELLED, now, "cancelled by request", last_exit=exit_text)
    elif ev.returncode == 0 and failure is None:
        jobs[job.name], acts = training_over(job, now, "training finished", last_exit=exit_text)
    else:
        acts = _failed(policy, jobs, job, ev, now, exit_text)
    actions += acts


def _failed(policy: Policy, jobs: dict[str, Job], job: Job, ev: ProcessExited, now: float,
            exit_text: str) -> list[Action]:
    """A train process failed: fail the job, restart it with a remedy, or restart it after a backoff."""
    failure = ev.failure
    if failure is not None and failure.kind == "refused":
        why = failure.message  # which worker was not started, and why
    elif failure is not None and failure.kind in ("signal", "exit"):
        why = f"train process {failure.message}"
    elif failure is not None:
        why = f"train process {exit_text}: {failure.message}"
    else:
        why = f"train process {exit_text}" + (f": {ev.detail}" if ev.detail else "")
    common = {"last_exit": exit_text, "failure": failure or job.failure}
    if failure is not None and not failure.retry:
        jobs[job.name], acts = transition(job, JobState.FAILED, now, f"{why}; not restarted: it would fail the "
                                          "same way", **common)
        return acts
    if failure is not None and failure.kind == "oom" and job.spec.train.oom_retry_halve_batch:
        if isinstance(ev.remedy, Remedy):
            reason = f"{why}; oom_retry_halve_batch: restarting with {ev.remedy.note}"
            jobs[job.name], acts = transition(job, JobState.BACKOFF, now, reason, spec=ev.remedy.spec,
                                              adjustments=job.adjustments + (f"out of GPU memory: {ev.remedy.note}",),
                                              retry_at=now, restarts=job.restarts + 1, **common)
            return acts
        if ev.remedy:
            why = f"{why}; oom_retry_halve_batch: {ev.remedy}"
    if failure is not None and failure.kind == "requeued":  # not a failure: it saved its work on the warning
        jobs[job.name], acts = transition(job, JobState.BACKOFF, now, f"{failure.message}; resubmitting now (not "
                                          "counted against max_restarts)", retry_at=now, restarts=job.restarts + 1,
                                          **common)
        return acts
    ran = now - job.started_at if job.started_at is not None else 0.0
    consecutive = 1 if ran >= policy.reset_after else job.consecutive_failures + 1
    limit = job.spec.train.max_restarts if job.spec.train.max_restarts is not None else policy.max_restarts
    if consecutive > limit:
        reason = f"{why}; gave up after {consecutive} consecutive failure(s) (max_restarts = {limit})"
        jobs[job.name], acts = transition(job, JobState.FAILED, now, reason, consecutive_failures=consecutive,
                                          **common)
    else:
        delay = policy.backoff(consecutive)
        reason = f"{why}; restart {consecutive} of {limit} in {delay:g}s"
        jobs[job.name], acts = transition(job, JobState.BACKOFF, now, reason, consecutive_failures=consecutive,
                                          retry_at=now + delay, restarts=job.restarts + 1, **common)
    return acts


def _worker_refused(jobs: dict[str, Job], ev: WorkerRefused, now: float, actions: list[Action]) -> None:
    """An evaluator or export the daemon would not start, with no train process running (backoff, or
    training over): the job fails at once, like a refused train worker (a running one is stopped by
    the daemon instead; its exit reports the refusal)."""
    job = jobs.get(ev.name)
    if job is None or job.state not in (JobState.BACKOFF, JobState.EVALUATING):
        return
    jobs[job.name], acts = transition(job, JobState.FAILED, now, f"{ev.failure.message}; not restarted: it would "
                                      "fail the same way", failure=ev.failure, retry_at=None)
    actions += acts


def _early_stop(jobs: dict[str, Job], ev: EarlyStop, now: float, actions: list[Action]) -> None:
    job = jobs.get(ev.name)
    if job is None or not job.spec.eval.enabled:
        return  # early stopping is a verdict of evaluation
    if job.state is JobState.RUNNING:
        jobs[job.name], acts = transition(job, JobState.STOPPING, now, ev.reason, stop_reason=ev.reason)
        actions += acts + [StopTrain(job.name, ev.reason)]
    elif job.state is JobState.BACKOFF:
        jobs[job.name], acts = training_over(replace(job, stop_reason=ev.reason), now, ev.reason)
        actions += acts


def _evaluations_done(jobs: dict[str, Job], name: str, now: float, actions: list[Action]) -> None:
    job = jobs.get(name)
    if job is not None and job.state is JobState.EVALUATING:
        reason = job.stop_reason or "training finished"
        jobs[name], acts = transition(job, JobState.SUCCEEDED, now, f"{reason}; every checkpoint evaluated")
        actions += acts


def _place_evaluator(state: State, jobs: dict[str, Job], name: str, actions: list[Action]) -> None:
    """cpu: the CPU, as the manual workflow does; gpu: a free GPU (wait for one); auto: an idle GPU
    when no queued training is waiting for GPUs, else the CPU."""
    job = jobs.get(name)
    if job is None or job.state in TERMINAL:
        return
    if job.eval_gpus:
        actions.append(EvalPlacement(name, job.eval_gpus))
        return
    device = job.spec.eval.device
    free = replace(state, jobs=jobs).free_gpus()
    training_waits = any(j.uses_gpus for j in replace(state, jobs=jobs).queue())
    if device == "cpu" or (device == "auto" and (not free or training_waits)):
        actions.append(EvalPlacement(name, ()))
    elif not free:
        actions.append(EvalPlacement(name, None))
    else:
        jobs[name] = replace(job, eval_gpus=(free[0],))
        actions += [SaveJob(jobs[name]), EvalPlacement(name, (free[0],))]


def _restore(state: State, jobs: dict[str, Job], ev: Restore, now: float, actions: list[Action]) -> int:
    next_seq = state.next_seq
    for job in sorted(ev.jobs, key=lambda j: j.seq):
        next_seq = max(next_seq, job.seq + 1)
        job = replace(job, eval_gpus=())  # no evaluator survives a daemon restart
        if job.state is JobState.STOPPING and job.stop_reason:
            job, acts = training_over(job, now, job.stop_reason)
            actions += acts
        elif job.state is JobState.STOPPING:
            job, acts = transition(job, JobState.CANCELLED, now, "cancelled by request (daemon restarted)")
            actions += acts
        elif job.state is JobState.EVALUATING:
            actions.append(TrainingEnded(job.name))
        elif job.state in (JobState.RUNNING, JobState.BACKOFF):
            job, acts = transition(job, JobState.QUEUED, now, "resuming after daemon restart", retry_at=None)
            actions += acts
        if job.state is JobState.QUEUED:
            why_not = fits_ever(job.wants, state.inventory, state.policy.cluster_allocates)
            if why_not:
                job, acts = transition(job, JobState.FAILED, now, f"can no longer run here: it {why_not}")
                actions += acts
        jobs[job.name] = job
    return next_seq


def _schedule(state: State, now: float) -> tuple[State, list[Action]]:
    jobs = dict(state.jobs)
    actions: list[Action] = []
    # 1. restarts that are due (they still hold their GPUs)
    for job in sorted(jobs.values(), key=Job.rank):
        if job.state is JobState.BACKOFF and job.retry_at is not None and job.retry_at <= now:
            jobs[job.name], acts = _start(job, job.gpus, now, f"restarting (attempt {job.attempt + 1})")
            actions += acts
    # 2. the queue, strict per pool
    free = list(replace(state, jobs=jobs).free_gpus())
    cpu_free = state.policy.max_cpu_jobs - replace(state, jobs=jobs).cpu_jobs_active()
    gpu_blocked = cpu_blocked = False
    for job in replace(state, jobs=jobs).queue():
        if state.policy.cluster_allocates:  # the cluster's queue decides when it runs, and where
            grant = ()
        elif job.uses_gpus:
            if gpu_blocked:
                continue
            grant = allocate(job.wants, free)
            if grant is None:
                gpu_blocked = True
                continue
            free = [g for g in free if g not in grant]
        else:
            if cpu_blocked:
                continue
            if cpu_free <= 0:
                cpu_blocked = True
                continue
            cpu_free -= 1
            grant = ()
        jobs[job.name], acts = _start(job, grant, now, "started")
        actions += acts
    wake = [j.retry_at for j in jobs.values() if j.state is JobState.BACKOFF and j.retry_at is not None]
    if wake:
        actions.append(WakeAt(min(wake)))
    return replace(state, jobs=jobs), actions


def _start(job: Job, gpus: tuple[int, ...], now: float, reason: str) -> tuple[Job, list[Action]]:
    attempt = job.attempt + 1
    updated, acts = transition(job, JobState.RUNNING, now, reason, gpus=gpus, attempt=attempt,
                               started_at=now, retry_at=None)
    return updated, acts + [StartTrain(job.name, gpus, attempt)]
