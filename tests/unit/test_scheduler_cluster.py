"""The scheduler when a workload manager (Slurm) allocates training's GPUs and CPUs
(``Policy.cluster_allocates``, ``[cluster] backend = "slurm"``): every queued job is handed over at
once, without this machine's GPUs or CPU slots; GPU ids mean nothing on a cluster; the machine's
own GPUs still serve evaluators."""

from __future__ import annotations

from oddaemon.core import scheduler as sch
from oddaemon.core.jobspec import EvalOptions, JobSpec, TrainOptions

CLUSTER = sch.Policy(max_cpu_jobs=1, cluster_allocates=True)


def spec(name: str, gpus=None) -> JobSpec:
    return JobSpec(name=name, pipeline_config=f"/m/{name}.config", model_dir=f"/m/{name}",
                   train=TrainOptions(gpus=gpus), eval=EvalOptions(enabled=False))


def submit(state, s, now=0.0):
    return sch.step(state, sch.Submit(s, token=f"/spool/{s.name}.toml"), now)


def starts(actions):
    return [(a.name, a.gpus) for a in actions if isinstance(a, sch.StartTrain)]


def test_every_queued_job_is_handed_to_the_cluster_at_once():
    state = sch.State(inventory=(), policy=CLUSTER)  # no GPU on the daemon's machine
    handed = []
    for name, gpus in (("a", 4), ("b", 2), ("c", 0), ("d", 0)):
        state, actions = submit(state, spec(name, gpus))
        handed += starts(actions)
    assert handed == [("a", ()), ("b", ()), ("c", ()), ("d", ())]  # none waits for a GPU or a CPU slot
    assert {n: (j.state.value, j.wants, j.gpus) for n, j in state.jobs.items()} == {
        "a": ("running", 4, ()), "b": ("running", 2, ()), "c": ("running", 0, ()), "d": ("running", 0, ())}


def test_auto_gpus_is_one_gpu_on_a_cluster_and_gpu_ids_are_refused():
    state, _ = submit(sch.State(inventory=(), policy=CLUSTER), spec("auto", None))
    assert state.jobs["auto"].wants == 1
    state, actions = submit(state, spec("ids", (0, 1)))
    (rejected,) = [a for a in actions if isinstance(a, sch.Rejected)]
    assert "names GPU ids" in rejected.reason and "ask for a count" in rejected.reason
    assert "ids" not in state.jobs


def test_the_same_jobs_locally_wait_for_gpus_and_slots():
    state = sch.State(inventory=(), policy=sch.Policy(max_cpu_jobs=1))
    state, actions = submit(state, spec("a", 4))
    assert not starts(actions) and "a" not in state.jobs  # can never run here: no GPUs
    state, actions = submit(state, spec("c", 0))
    state, more = submit(state, spec("d", 0))
    assert starts(actions) == [("c", ())] and starts(more) == []  # one CPU slot


def test_a_failed_cluster_job_restarts_without_local_gpus():
    state, _ = submit(sch.State(inventory=(0,), policy=CLUSTER), spec("a", 2))
    state, _ = sch.step(state, sch.ProcessExited("a", 1, 1, "node failed"), 10.0)
    assert state.jobs["a"].state.value == "backoff"
    state, actions = sch.step(state, sch.Tick(), state.jobs["a"].retry_at + 1)
    assert starts(actions) == [("a", ())] and state.jobs["a"].attempt == 2
    assert state.free_gpus() == (0,)  # the daemon's GPU stays free for evaluators
