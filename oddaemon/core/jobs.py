"""The scheduler's data: jobs, the policy, the state. Pure values (frozen dataclasses)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from oddaemon.core.failures import Failure
from oddaemon.core.jobspec import JobSpec
from oddaemon.core.states import HOLDS_RESOURCES, JobState

HISTORY_LIMIT = 50


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 3
    backoff_base: float = 10.0
    backoff_cap: float = 600.0
    reset_after: float = 1800.0
    max_cpu_jobs: int = 1
    # A workload manager (Slurm) allocates training's GPUs and CPUs: every queued job is handed to it at
    # once, and the daemon's own GPUs serve only its evaluators.
    cluster_allocates: bool = False

    def backoff(self, consecutive_failures: int) -> float:
        exponent = max(0, consecutive_failures - 1)
        if exponent > 60:
            return self.backoff_cap
        return min(self.backoff_cap, self.backoff_base * (2 ** exponent))


@dataclass(frozen=True)
class Job:
    name: str
    seq: int
    spec: JobSpec
    wants: int | tuple[int, ...]  # GPU count, or explicit GPU ids; 0 = CPU slot
    state: JobState = JobState.QUEUED
    reason: str = ""
    submitted_at: float = 0.0
    gpus: tuple[int, ...] = ()
    attempt: int = 0  # train processes started so far
    restarts: int = 0  # total restarts after failures
    consecutive_failures: int = 0
    started_at: float | None = None
    retry_at: float | None = None
    finished_at: float | None = None
    last_exit: str = ""
    stop_reason: str = ""  # why training is being stopped early (empty: a cancel)
    eval_gpus: tuple[int, ...] = ()  # GPU held by the job's evaluator ("gpu"/"auto" placement)
    failure: Failure | None = None  # the latest failure of its training (kind + message for the user)
    adjustments: tuple[str, ...] = ()  # changes the daemon made to the spec (oom_retry_halve_batch)
    waiting_for: tuple[str, ...] = ()  # while waiting: the jobs of spec.after that have not succeeded yet
    history: tuple[tuple[float, str, str], ...] = ()

    @property
    def uses_gpus(self) -> bool:
        return self.wants != 0 and self.wants != ()

    def rank(self) -> tuple[int, int]:
        return (-self.spec.priority, self.seq)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        d["state"] = self.state.value
        d["wants"] = list(self.wants) if isinstance(self.wants, tuple) else self.wants
        d["gpus"] = list(self.gpus)
        d["eval_gpus"] = list(self.eval_gpus)
        d["history"] = [list(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["spec"] = JobSpec.from_dict(d["spec"])
        d["state"] = JobState(d["state"])
        d["wants"] = tuple(d["wants"]) if isinstance(d["wants"], list) else d["wants"]
        d["gpus"] = tuple(d.get("gpus", ()))
        d["eval_gpus"] = tuple(d.get("eval_gpus", ()))
        d["history"] = tuple(tuple(h) for h in d.get("history", ()))
        d["failure"] = Failure.from_dict(d.get("failure"))
        d["adjustments"] = tuple(d.get("adjustments", ()))
        d["waiting_for"] = tuple(d.get("waiting_for", ()))
        return cls(**d)


@dataclass(frozen=True)
class State:
    inventory: tuple[int, ...] = ()
    policy: Policy = Policy()
    jobs: dict[str, Job] = field(default_factory=dict)
    next_seq: int = 1

    def free_gpus(self) -> tuple[int, ...]:
        held = {g for j in self.jobs.values() if j.state in HOLDS_RESOURCES for g in j.gpus}
        held |= {g for j in self.jobs.values() for g in j.eval_gpus}
        return tuple(g for g in self.inventory if g not in held)

    def cpu_jobs_active(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state in HOLDS_RESOURCES and not j.uses_gpus)

    def queue(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state is JobState.QUEUED), key=Job.rank)

    def queue_position(self, name: str) -> int | None:
        for i, job in enumerate(self.queue(), start=1):
            if job.name == name:
                return i
        return None
