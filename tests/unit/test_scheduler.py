"""The pure scheduler: examples plus hypothesis properties. No processes, no clocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oddaemon.core import scheduler as sch
from oddaemon.core.jobspec import EvalOptions, JobSpec, TrainOptions
from oddaemon.core.states import HOLDS_RESOURCES, IllegalTransition, JobState, check_transition


def spec(name: str, gpus=None, priority: int = 0, max_restarts=None, model_dir: str | None = None,
         evaluate: bool = False, eval_device: str = "cpu") -> JobSpec:
    return JobSpec(name=name, pipeline_config="/srv/p.config", model_dir=model_dir or f"/srv/models/{name}",
                   priority=priority, train=TrainOptions(gpus=gpus, max_restarts=max_restarts),
                   eval=EvalOptions(enabled=evaluate, device=eval_device))


def submit(state, s, now=0.0):
    return sch.step(state, sch.Submit(s, token=f"/spool/new/{s.name}.toml"), now)


def kinds(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_job_runs_on_a_free_gpu_and_succeeds():
    state = sch.State(inventory=(0, 1))
    state, actions = submit(state, spec("a", gpus=1))
    assert kinds(actions, sch.Accepted) == [sch.Accepted("a", "/spool/new/a.toml")]
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("a", (0,), 1)]
    assert state.jobs["a"].state is JobState.RUNNING
    state, actions = sch.step(state, sch.ProcessExited("a", 1, 0), 5.0)
    assert state.jobs["a"].state is JobState.SUCCEEDED
    assert state.jobs["a"].gpus == ()
    assert state.free_gpus() == (0, 1)


def test_two_jobs_one_gpu_run_one_after_the_other():
    state = sch.State(inventory=(0,))
    state, _ = submit(state, spec("a"))
    state, actions = submit(state, spec("b"))
    assert not kinds(actions, sch.StartTrain)
    assert state.jobs["b"].state is JobState.QUEUED
    assert state.queue_position("b") == 1
    state, actions = sch.step(state, sch.ProcessExited("a", 1, 0), 1.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (0,), 1)]


def test_auto_gpus_means_cpu_without_gpus_and_cpu_slots_are_limited():
    state = sch.State(inventory=(), policy=sch.Policy(max_cpu_jobs=1))
    state, actions = submit(state, spec("a"))
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("a", (), 1)]
    state, actions = submit(state, spec("b"))
    assert state.jobs["b"].state is JobState.QUEUED


@pytest.mark.parametrize("gpus, inventory, fragment", [
    (2, (0,), "asks for 2 GPU(s) but this machine has 1"),
    (1, (), "asks for 1 GPU(s) but this machine has 0"),
    ((3,), (0, 1), "asks for GPU id(s) 3 ([train] gpus), which this machine does not have (GPUs: 0, 1)"),
])
def test_a_job_that_can_never_fit_is_rejected(gpus, inventory, fragment):
    state, actions = submit(sch.State(inventory=inventory), spec("big", gpus=gpus))
    rejected = kinds(actions, sch.Rejected)
    assert len(rejected) == 1 and fragment in rejected[0].reason
    assert "big" not in state.jobs


def test_duplicate_active_name_and_shared_model_dir_are_rejected():
    state, _ = submit(sch.State(inventory=(0,)), spec("a"))
    state, actions = submit(state, spec("a"))
    assert "already exists and is running" in kinds(actions, sch.Rejected)[0].reason
    state, actions = submit(state, spec("b", model_dir="/srv/models/a"))
    assert "already used by job 'a'" in kinds(actions, sch.Rejected)[0].reason


def test_a_finished_name_is_refused_and_its_record_kept():
    state, _ = submit(sch.State(inventory=(0,)), spec("a"))
    state, _ = sch.step(state, sch.ProcessExited("a", 1, 0), 1.0)
    before = state.jobs["a"]
    state, actions = submit(state, spec("a", model_dir="/srv/models/a2"), now=2.0)
    assert not kinds(actions, sch.Accepted) and state.jobs["a"] == before
    assert kinds(actions, sch.Rejected)[0].reason == (
        "a job named 'a' already ran and is succeeded; its record, history and evaluations are kept: choose "
        "another name")
    state, _ = submit(state, spec("c"), now=3.0)  # runs on the one GPU
    state, _ = submit(state, spec("b"), now=3.0)  # queued behind it
    state, _ = sch.step(state, sch.Cancel("b"), 3.5)
    assert state.jobs["b"].state is JobState.CANCELLED
    state, actions = submit(state, spec("b"), now=4.0)
    assert "already ran and is cancelled" in kinds(actions, sch.Rejected)[0].reason
    assert "`oddaemon retry b` to run it again" in kinds(actions, sch.Rejected)[0].reason


def test_crash_restarts_with_growing_capped_backoff_then_fails():
    policy = sch.Policy(max_restarts=3, backoff_base=10, backoff_cap=25, reset_after=1000)
    state, _ = submit(sch.State(inventory=(0,), policy=policy), spec("a"))
    now, delays = 0.0, []
    for attempt in range(1, 4):
        state, actions = sch.step(state, sch.ProcessExited("a", attempt, 1, "boom"), now)
        job = state.jobs["a"]
        assert job.state is JobState.BACKOFF and job.gpus == (0,)  # keeps its GPU
        delays.append(job.retry_at - now)
        assert kinds(actions, sch.WakeAt) == [sch.WakeAt(job.retry_at)]
        now = job.retry_at
        state, actions = sch.step(state, sch.Tick(), now)
        assert kinds(actions, sch.StartTrain) == [sch.StartTrain("a", (0,), attempt + 1)]
    assert delays == [10, 20, 25]
    state, _ = sch.step(state, sch.ProcessExited("a", 4, 1, "boom"), now)
    job = state.jobs["a"]
    assert job.state is JobState.FAILED
    assert "gave up after 4 consecutive failure(s) (max_restarts = 3)" in job.reason and "boom" in job.reason
    assert state.free_gpus() == (0,)


def test_a_long_run_resets_the_consecutive_failure_count():
    policy = sch.Policy(max_restarts=1, backoff_base=1, backoff_cap=1, reset_after=100)
    state, _ = submit(sch.State(inventory=(0,), policy=policy), spec("a"))
    state, _ = sch.step(state, sch.ProcessExited("a", 1, 1), 500.0)  # ran 500 s
    state, _ = sch.step(state, sch.Tick(), 501.0)
    state, _ = sch.step(state, sch.ProcessExited("a", 2, 1), 700.0)  # ran 199 s
    assert state.jobs["a"].state is JobState.BACKOFF
    assert state.jobs["a"].restarts == 2


def test_job_max_restarts_overrides_the_daemon_default():
    state, _ = submit(sch.State(inventory=(0,)), spec("a", max_restarts=0))
    state, _ = sch.step(state, sch.ProcessExited("a", 1, -9), 1.0)
    assert state.jobs["a"].state is JobState.FAILED
    assert "killed by signal SIGKILL" in state.jobs["a"].reason


def test_cancel_from_every_state():
    state = sch.State(inventory=(0,), policy=sch.Policy(backoff_base=5, backoff_cap=5))
    state, _ = submit(state, spec("run"))
    state, _ = submit(state, spec("queued"))
    state, actions = sch.step(state, sch.Cancel("queued"), 1.0)
    assert state.jobs["queued"].state is JobState.CANCELLED
    state, actions = sch.step(state, sch.Cancel("run"), 1.0)
    assert state.jobs["run"].state is JobState.STOPPING
    assert kinds(actions, sch.StopTrain) == [sch.StopTrain("run", "cancel requested")]
    state, actions = sch.step(state, sch.Cancel("run"), 1.5)
    assert kinds(actions, sch.Refused)
    state, _ = sch.step(state, sch.ProcessExited("run", 1, -15), 2.0)
    assert state.jobs["run"].state is JobState.CANCELLED
    state, _ = submit(state, spec("crash"), now=3.0)
    state, _ = sch.step(state, sch.ProcessExited("crash", 1, 1), 4.0)
    assert state.jobs["crash"].state is JobState.BACKOFF
    state, _ = sch.step(state, sch.Cancel("crash"), 4.5)
    assert state.jobs["crash"].state is JobState.CANCELLED and state.free_gpus() == (0,)
    state, actions = sch.step(state, sch.Cancel("crash"), 5.0)
    assert kinds(actions, sch.Refused)[0].reason == "job 'crash' is already cancelled"
    _, actions = sch.step(state, sch.Cancel("nope"), 5.0)
    assert kinds(actions, sch.Refused)[0].reason == "no job named 'nope'"


def test_retry_requeues_a_failed_job():
    state, _ = submit(sch.State(inventory=(0,)), spec("a", max_restarts=0))
    state, _ = sch.step(state, sch.ProcessExited("a", 1, 1), 1.0)
    state, actions = sch.step(state, sch.Retry("a"), 2.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("a", (0,), 2)]
    _, actions = sch.step(state, sch.Retry("a"), 3.0)
    assert "only failed or cancelled jobs can be retried" in kinds(actions, sch.Refused)[0].reason


def test_restore_requeues_running_jobs_in_their_original_order():
    state, _ = submit(sch.State(inventory=(0,)), spec("a"))
    state, _ = submit(state, spec("b"))
    state, _ = submit(state, spec("c"))
    state, _ = sch.step(state, sch.Cancel("c"), 1.0)
    saved = tuple(sch.Job.from_dict(j.to_dict()) for j in state.jobs.values())
    restored, actions = sch.step(sch.State(inventory=(0,)), sch.Restore(saved), 10.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("a", (0,), 2)]
    assert restored.jobs["b"].state is JobState.QUEUED
    assert restored.jobs["c"].state is JobState.CANCELLED
    assert restored.next_seq == 4


def test_restore_fails_a_job_whose_gpu_is_gone():
    state, _ = submit(sch.State(inventory=(0, 1)), spec("a", gpus=(1,)))
    saved = tuple(state.jobs.values())
    restored, _ = sch.step(sch.State(inventory=(0,)), sch.Restore(saved), 1.0)
    assert restored.jobs["a"].state is JobState.FAILED
    assert "GPU id(s) 1" in restored.jobs["a"].reason


def test_stale_exit_of_an_earlier_attempt_is_ignored():
    state, _ = submit(sch.State(inventory=(0,)), spec("a"))
    state, actions = sch.step(state, sch.ProcessExited("a", 7, 1), 1.0)
    assert actions == [] and state.jobs["a"].state is JobState.RUNNING


def test_transition_table_is_enforced():
    with pytest.raises(IllegalTransition):
        check_transition("x", JobState.SUCCEEDED, JobState.RUNNING)
    job = sch.Job(name="x", seq=1, spec=spec("x"), wants=0, state=JobState.QUEUED)
    with pytest.raises(IllegalTransition):
        sch.transition(job, JobState.SUCCEEDED, 0.0, "no")


def test_training_end_with_evaluation_goes_through_evaluating():
    state, _ = submit(sch.State(inventory=(0,)), spec("a", evaluate=True))
    state, actions = sch.step(state, sch.ProcessExited("a", 1, 0), 1.0)
    job = state.jobs["a"]
    assert job.state is JobState.EVALUATING and job.gpus == () and state.free_gpus() == (0,)
    assert sch.TrainingEnded("a") in actions
    state, actions = sch.step(state, sch.EvaluationsDone("a"), 2.0)
    assert state.jobs["a"].state is JobState.SUCCEEDED
    assert state.jobs["a"].reason == "training finished; every checkpoint evaluated"
    assert sch.StopEvaluator("a", "job succeeded") in actions


def test_early_stop_stops_training_then_evaluates_then_succeeds_with_the_reason():
    state, _ = submit(sch.State(inventory=(0,)), spec("a", evaluate=True))
    state, actions = sch.step(state, sch.EarlyStop("a", "stopped early: no improvement"), 1.0)
    assert state.jobs["a"].state is JobState.STOPPING
    assert kinds(actions, sch.StopTrain) == [sch.StopTrain("a", "stopped early: no improvement")]
    state, actions = sch.step(state, sch.ProcessExited("a", 1, -15), 2.0)
    assert state.jobs["a"].state is JobState.EVALUATING and sch.TrainingEnded("a") in actions
    state, _ = sch.step(state, sch.EvaluationsDone("a"), 3.0)
    assert state.jobs["a"].state is JobState.SUCCEEDED
    assert state.jobs["a"].reason == "stopped early: no improvement; every checkpoint evaluated"


def test_cancel_during_early_stop_or_evaluating_cancels():
    state, _ = submit(sch.State(inventory=(0, 1)), spec("a", evaluate=True))
    state, _ = sch.step(state, sch.EarlyStop("a", "stopped early"), 1.0)
    state, actions = sch.step(state, sch.Cancel("a"), 1.5)
    assert not kinds(actions, sch.Refused)
    state, _ = sch.step(state, sch.ProcessExited("a", 1, -15), 2.0)
    assert state.jobs["a"].state is JobState.CANCELLED
    state, _ = submit(state, spec("b", evaluate=True), 3.0)
    state, _ = sch.step(state, sch.ProcessExited("b", 1, 0), 4.0)
    state, actions = sch.step(state, sch.Cancel("b"), 5.0)
    assert state.jobs["b"].state is JobState.CANCELLED and sch.StopEvaluator("b", "job cancelled") in actions


def test_finish_saves_then_evaluates_the_rest_and_succeeds_and_is_refused_where_nothing_trains():
    """oddaemon finish: a running job stops with a save (StopTrain save=True), whatever its exit
    (the worker exits 75 after the save) it goes on as at the end of training: evaluating, then
    succeeded; a job in backoff goes straight to evaluating; the GPU is free again."""
    state = sch.State(inventory=(0,), policy=sch.Policy(backoff_base=5, backoff_cap=5))
    state, _ = submit(state, spec("a", evaluate=True))
    state, _ = submit(state, spec("queued"))
    state, actions = sch.step(state, sch.Finish("a"), 1.0)
    assert state.jobs["a"].state is JobState.STOPPING and state.jobs["a"].reason == "finished by request: saving a " \
        "checkpoint"
    assert kinds(actions, sch.StopTrain) == [sch.StopTrain("a", "finished by request", save=True)]
    state, actions = sch.step(state, sch.Finish("a"), 1.5)
    assert kinds(actions, sch.Refused)[0].reason == "job 'a' is already stopping (finished by request)"
    state, actions = sch.step(state, sch.ProcessExited("a", 1, 75), 2.0)
    a = state.jobs["a"]
    assert a.state is JobState.EVALUATING and a.reason == "finished by request; evaluating the remaining checkpoints"
    assert sch.TrainingEnded("a") in actions and a.restarts == 0 and a.failure is None
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("queued", (0,), 1)]  # its GPU went to the next
    state, actions = sch.step(state, sch.Finish("a"), 2.5)
    assert kinds(actions, sch.Refused)[0].reason == ("job 'a' has finished training; its last checkpoints are "
                                                     "being evaluated")
    state, _ = sch.step(state, sch.EvaluationsDone("a"), 3.0)
    assert state.jobs["a"].state is JobState.SUCCEEDED
    assert state.jobs["a"].reason == "finished by request; every checkpoint evaluated"
    # backoff: nothing runs; the checkpoints it has are evaluated
    state, _ = sch.step(state, sch.ProcessExited("queued", 1, 1), 4.0)
    assert state.jobs["queued"].state is JobState.BACKOFF
    state, actions = sch.step(state, sch.Finish("queued"), 4.5)
    assert state.jobs["queued"].state is JobState.SUCCEEDED and not kinds(actions, sch.StopTrain)  # (eval off)
    assert state.jobs["queued"].reason == "finished by request" and state.free_gpus() == (0,)
    # nothing to finish
    state, _ = submit(state, spec("busy"), 5.0)
    state, _ = submit(state, spec("later"), 5.0)
    for name, why in (("later", "has not started training: `oddaemon cancel` it instead"),
                      ("a", "is already succeeded")):
        _, actions = sch.step(state, sch.Finish(name), 6.0)
        assert kinds(actions, sch.Refused)[0].reason == f"job '{name}' {why}"
    _, actions = sch.step(state, sch.Finish("nope"), 6.0)
    assert kinds(actions, sch.Refused)[0].reason == "no job named 'nope'"
    # a cancel in progress is not turned into a finish
    state, _ = sch.step(state, sch.Cancel("busy"), 7.0)
    _, actions = sch.step(state, sch.Finish("busy"), 7.5)
    assert kinds(actions, sch.Refused)[0].reason == "job 'busy' is already stopping (cancel requested)"
    # without evaluation: succeeded once the worker has saved and exited
    state, _ = sch.step(state, sch.ProcessExited("busy", 1, -15), 8.0)
    state, _ = sch.step(state, sch.Finish("later"), 8.5)
    state, _ = sch.step(state, sch.ProcessExited("later", 1, 75), 9.0)
    assert state.jobs["later"].state is JobState.SUCCEEDED and state.jobs["later"].reason == "finished by request"


def test_set_priority_reranks_the_queue_and_is_kept_in_the_history():
    state = sch.State(inventory=(0,))
    state, _ = submit(state, spec("run"))
    for name in ("a", "b", "c"):
        state, _ = submit(state, spec(name))
    assert [j.name for j in state.queue()] == ["a", "b", "c"]
    state, actions = sch.step(state, sch.SetPriority("c", 10), 1.0)
    assert [j.name for j in state.queue()] == ["c", "a", "b"] and state.jobs["c"].spec.priority == 10
    assert state.jobs["c"].history[-1] == (1.0, "queued", "priority 0 -> 10 by request")
    assert kinds(actions, sch.SaveJob) and not kinds(actions, sch.Refused)
    state, actions = sch.step(state, sch.SetPriority("c", 10), 1.5)  # no change: nothing written
    assert not kinds(actions, sch.SaveJob) and len(state.jobs["c"].history) == 2
    state, actions = sch.step(state, sch.ProcessExited("run", 1, 0), 2.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("c", (0,), 1)]  # the GPU goes to the new head
    for bad in (1001, -1001, True, "5", 2.5):
        _, actions = sch.step(state, sch.SetPriority("a", bad), 3.0)
        assert kinds(actions, sch.Refused)[0].reason.startswith("priority must be a whole number from -1000 to "
                                                                "1000, got "), bad
    _, actions = sch.step(state, sch.SetPriority("run", 5), 3.0)
    assert kinds(actions, sch.Refused)[0].reason == "job 'run' is succeeded; its priority no longer matters"
    _, actions = sch.step(state, sch.SetPriority("ghost", 5), 3.0)
    assert kinds(actions, sch.Refused)[0].kind.value == "not_found"


@pytest.mark.parametrize("device, busy, expected", [
    ("cpu", False, ()), ("gpu", False, (1,)), ("gpu", True, None), ("auto", False, (1,)), ("auto", True, ()),
])
def test_evaluator_placement(device, busy, expected):
    state, _ = submit(sch.State(inventory=(0, 1)), spec("a", gpus=1, evaluate=True, eval_device=device))
    if busy:
        state, _ = submit(state, spec("other", gpus=1))
    state, actions = sch.step(state, sch.PlaceEvaluator("a"), 1.0)
    assert kinds(actions, sch.EvalPlacement) == [sch.EvalPlacement("a", expected)]
    assert state.jobs["a"].eval_gpus == (expected or ())
    if expected:
        state, _ = submit(state, spec("late", gpus=1), 2.0)
        assert state.jobs["late"].state is JobState.QUEUED  # the evaluator's GPU is not handed out
        state, actions = sch.step(state, sch.EvaluatorStopped("a"), 3.0)
        assert kinds(actions, sch.StartTrain) == [sch.StartTrain("late", (1,), 1)]


def test_restore_keeps_evaluating_jobs_evaluating_and_drops_evaluator_gpus():
    state, _ = submit(sch.State(inventory=(0, 1)), spec("a", evaluate=True, eval_device="gpu"))
    state, _ = sch.step(state, sch.PlaceEvaluator("a"), 0.5)
    state, _ = sch.step(state, sch.ProcessExited("a", 1, 0), 1.0)
    restored, actions = sch.step(sch.State(inventory=(0, 1)), sch.Restore(tuple(state.jobs.values())), 2.0)
    assert restored.jobs["a"].state is JobState.EVALUATING and restored.jobs["a"].eval_gpus == ()
    assert sch.TrainingEnded("a") in actions


def test_strict_priority_blocks_lower_jobs_of_the_same_pool():
    state = sch.State(inventory=(0, 1))
    state, _ = submit(state, spec("small", gpus=1))
    state, _ = submit(state, spec("big", gpus=2, priority=5))
    state, actions = submit(state, spec("later", gpus=1))
    assert state.jobs["big"].state is JobState.QUEUED
    assert state.jobs["later"].state is JobState.QUEUED  # does not take GPU 1 ahead of "big"
    state, actions = sch.step(state, sch.ProcessExited("small", 1, 0), 1.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("big", (0, 1), 1)]


# ---- properties ---------------------------------------------------------------------------

gpu_request = st.one_of(st.none(), st.integers(0, 5),
                        st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True).map(tuple))


def check_invariants(state: sch.State) -> None:
    holders = [j for j in state.jobs.values() if j.state in HOLDS_RESOURCES]
    all_gpus = [g for j in holders for g in j.gpus] + [g for j in state.jobs.values() for g in j.eval_gpus]
    assert len(all_gpus) == len(set(all_gpus)), "a GPU is held by two jobs"
    assert set(all_gpus) <= set(state.inventory), "allocated a GPU that does not exist"
    assert len(all_gpus) <= len(state.inventory)
    for j in state.jobs.values():
        if j.state in HOLDS_RESOURCES and j.uses_gpus:
            want = len(j.wants) if isinstance(j.wants, tuple) else j.wants
            assert len(j.gpus) == want
            if isinstance(j.wants, tuple):
                assert set(j.gpus) == set(j.wants)
        if j.state not in HOLDS_RESOURCES:
            assert j.gpus == ()
    assert state.cpu_jobs_active() <= state.policy.max_cpu_jobs
    # strict priority: a queued job that fits now would have been started unless a
    # higher-ranked queued job of its pool is blocked
    free = set(state.free_gpus())
    queue = state.queue()
    for i, q in enumerate(queue):
        ahead = [o for o in queue[:i] if o.uses_gpus == q.uses_gpus]
        if q.uses_gpus:
            want = set(q.wants) if isinstance(q.wants, tuple) else None
            fits = want <= free if want is not None else q.wants <= len(free)
        else:
            fits = state.cpu_jobs_active() < state.policy.max_cpu_jobs
        assert not fits or ahead, f"{q.name} fits but waits with nobody ahead of it"


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.state = sch.State(inventory=(0, 1, 2, 3), policy=sch.Policy(max_restarts=2, backoff_base=1,
                                                                         backoff_cap=4, max_cpu_jobs=2))
        self.now = 0.0
        self.counter = 0

    def _step(self, event):
        before = self.state
        self.state, actions = sch.step(self.state, event, self.now)
        started = {a.name for a in actions if isinstance(a, sch.StartTrain)}
        for name in started:
            job = self.state.jobs[name]
            # a lower-ranked job never starts while a higher-ranked job of its pool stays queued
            for q in self.state.queue():
                if q.uses_gpus == job.uses_gpus and before.jobs.get(name) and before.jobs[name].state is JobState.QUEUED:
                    assert q.rank() > job.rank(), f"{job.name} started ahead of higher-ranked {q.name}"

    @rule(gpus=gpu_request, priority=st.integers(-3, 3), evaluate=st.booleans(),
          device=st.sampled_from(["cpu", "gpu", "auto"]))
    def submit(self, gpus, priority, evaluate, device):
        self.counter += 1
        self._step(sch.Submit(spec(f"j{self.counter}", gpus=gpus, priority=priority, evaluate=evaluate,
                                   eval_device=device)))

    @precondition(lambda self: self.state.jobs)
    @rule(data=st.data(), code=st.sampled_from([0, 1, -9]))
    def exit(self, data, code):
        running = [j for j in self.state.jobs.values() if j.state in (JobState.RUNNING, JobState.STOPPING)]
        if running:
            job = data.draw(st.sampled_from(running))
            self._step(sch.ProcessExited(job.name, job.attempt, code))

    @precondition(lambda self: self.state.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        self._step(sch.Cancel(data.draw(st.sampled_from(sorted(self.state.jobs)))))

    @precondition(lambda self: self.state.jobs)
    @rule(data=st.data())
    def retry(self, data):
        self._step(sch.Retry(data.draw(st.sampled_from(sorted(self.state.jobs)))))

    @precondition(lambda self: self.state.jobs)
    @rule(data=st.data(), kind=st.sampled_from(["early", "done", "place", "evaluator_stopped"]))
    def evaluation_event(self, data, kind):
        name = data.draw(st.sampled_from(sorted(self.state.jobs)))
        event = {"early": sch.EarlyStop(name, "no improvement"), "done": sch.EvaluationsDone(name),
                 "place": sch.PlaceEvaluator(name), "evaluator_stopped": sch.EvaluatorStopped(name)}[kind]
        self._step(event)

    @rule(dt=st.floats(0, 5))
    def tick(self, dt):
        self.now += dt
        self._step(sch.Tick())

    @rule()
    def restart_daemon(self):
        saved = tuple(sch.Job.from_dict(j.to_dict()) for j in self.state.jobs.values())
        fresh = sch.State(inventory=self.state.inventory, policy=self.state.policy)
        self.state, _ = sch.step(fresh, sch.Restore(saved), self.now)

    @invariant()
    def invariants(self):
        check_invariants(self.state)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(st.integers(1, 40))
def test_backoff_grows_and_caps(n):
    policy = sch.Policy(backoff_base=3, backoff_cap=100)
    assert policy.backoff(n) <= 100
    assert policy.backoff(n + 1) >= policy.backoff(n)
    if policy.backoff(n) < 100:
        assert policy.backoff(n + 1) == min(100, 2 * policy.backoff(n))


@pytest.mark.parametrize("mine, words", [
    ("/srv/models/a/sub", "is inside the model_dir of job 'a' (running): /srv/models/a; a job's model_dir must "
                          "not be inside another's, nor contain one"),
    ("/srv/models", "contains the model_dir of job 'a' (running): /srv/models/a"),
])
def test_nested_model_dirs_are_refused_either_way_round_with_the_other_job_named(mine, words):
    state, _ = submit(sch.State(inventory=(0, 1)), spec("a", model_dir="/srv/models/a"))
    state, actions = submit(state, spec("b", model_dir=mine))
    assert words in kinds(actions, sch.Rejected)[0].reason and "b" not in state.jobs
    state, actions = submit(state, spec("c", model_dir="/srv/models/ab"))  # a shared prefix is no nesting
    assert kinds(actions, sch.Accepted)
