"""Job dependencies (``after``): the key's validation and the pure scheduler's waiting state. No
processes, no clocks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from oddaemon.core import scheduler as sch
from oddaemon.core.dependencies import MAX_AFTER, awaited_missing, find_cycle
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobs import Job
from oddaemon.core.jobspec import EvalOptions, JobSpec, PipelineEdits, TrainOptions
from oddaemon.core.states import IllegalTransition, JobState, check_transition


def spec(name: str, after: tuple[str, ...] = (), gpus=None) -> JobSpec:
    return JobSpec(name=name, pipeline_config="/srv/p.config", model_dir=f"/srv/models/{name}", after=after,
                   train=TrainOptions(gpus=gpus), eval=EvalOptions(enabled=False))


def submit(state, s, now=0.0):
    return sch.step(state, sch.Submit(s, token=f"/spool/new/{s.name}.toml"), now)


def kinds(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def exited(state, name, returncode, now):
    return sch.step(state, sch.ProcessExited(name, state.jobs[name].attempt, returncode), now)


def cpu(jobs=4):
    return sch.State(inventory=(), policy=sch.Policy(max_cpu_jobs=jobs, max_restarts=0))


# ---- the pure scheduler -------------------------------------------------------------------------

def test_b_after_a_waits_and_is_queued_then_started_when_a_succeeds():
    state, _ = submit(cpu(), spec("a"))
    state, actions = submit(state, spec("b", after=("a",)), 1.0)
    b = state.jobs["b"]
    assert b.state is JobState.WAITING and b.waiting_for == ("a",)
    assert b.reason == "submitted; waiting for a (after)"
    assert kinds(actions, sch.Accepted) == [sch.Accepted("b", "/spool/new/b.toml")]
    assert not kinds(actions, sch.StartTrain)  # a CPU slot is free: only the dependency holds it back
    assert state.queue_position("b") is None
    state, actions = exited(state, "a", 0, 5.0)
    assert state.jobs["a"].state is JobState.SUCCEEDED
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (), 1)]
    assert [h[1] for h in state.jobs["b"].history] == ["waiting", "queued", "running"]
    assert state.jobs["b"].history[1][2] == "a succeeded (after)"
    assert state.jobs["b"].waiting_for == ()


def test_a_dependency_that_fails_cancels_the_dependent_with_its_reason_and_the_chain_too():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    state, _ = submit(state, spec("c", after=("b",)))
    state, actions = exited(state, "a", 1, 3.0)  # max_restarts 0: failed at once
    assert state.jobs["a"].state is JobState.FAILED
    b, c = state.jobs["b"], state.jobs["c"]
    assert b.state is JobState.CANCELLED and c.state is JobState.CANCELLED
    assert b.reason.startswith("job 'a' it waits for (after) failed: train process exit status 1; gave up")
    assert c.reason.startswith("job 'b' it waits for (after) cancelled: job 'a'")
    changes = [(a.name, a.new) for a in kinds(actions, sch.StateChanged)]
    assert changes == [("a", "failed"), ("b", "cancelled"), ("c", "cancelled")]
    assert not kinds(actions, sch.StartTrain)
    assert {a.job.name for a in kinds(actions, sch.SaveJob)} == {"a", "b", "c"}


def test_a_cancelled_dependency_cancels_the_dependent():
    state, _ = submit(cpu(jobs=1), spec("a"))
    state, _ = submit(state, spec("q"))  # queued (the one CPU slot is a's)
    state, _ = submit(state, spec("b", after=("q",)))
    state, _ = sch.step(state, sch.Cancel("q"), 2.0)
    assert state.jobs["b"].state is JobState.CANCELLED
    assert state.jobs["b"].reason == "job 'q' it waits for (after) cancelled: cancelled by request"


def test_waiting_for_several_counts_down_and_queues_after_the_last():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b"))
    state, _ = submit(state, spec("c", after=("a", "b")))
    assert state.jobs["c"].waiting_for == ("a", "b")
    state, actions = exited(state, "b", 0, 2.0)
    assert state.jobs["c"].state is JobState.WAITING
    assert state.jobs["c"].waiting_for == ("a",) and state.jobs["c"].reason == "waiting for a (after)"
    assert [a.job.waiting_for for a in kinds(actions, sch.SaveJob) if a.job.name == "c"] == [("a",)]
    state, actions = exited(state, "a", 0, 3.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("c", (), 1)]


def test_a_dependency_that_already_succeeded_queues_at_once():
    state, _ = submit(cpu(), spec("a"))
    state, _ = exited(state, "a", 0, 1.0)
    state, actions = submit(state, spec("b", after=("a",)), 2.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (), 1)]
    assert state.jobs["b"].history[0][1:] == ("queued", "submitted; a already succeeded")


def test_unknown_dependencies_are_rejected_with_their_names():
    state, _ = submit(cpu(), spec("a"))
    state, actions = submit(state, spec("b", after=("a", "nope", "gone")))
    [rejected] = kinds(actions, sch.Rejected)
    assert "'nope', 'gone'" in rejected.reason and "'a'" not in rejected.reason
    assert rejected.reason.startswith("job 'b' waits for (after) jobs the daemon does not know")
    assert "b" not in state.jobs and not kinds(actions, sch.Accepted)


def test_a_dependency_that_already_failed_or_was_cancelled_is_rejected():
    state, _ = submit(cpu(jobs=1), spec("a"))
    state, _ = exited(state, "a", 1, 1.0)
    state, _ = submit(state, spec("r"))  # holds the one CPU slot
    state, _ = submit(state, spec("w"))
    state, _ = sch.step(state, sch.Cancel("w"), 2.0)
    assert state.jobs["w"].state is JobState.CANCELLED
    state, actions = submit(state, spec("b", after=("w", "a")))
    [rejected] = kinds(actions, sch.Rejected)
    assert "'w' (cancelled), 'a' (failed)" in rejected.reason and "oddaemon retry w" in rejected.reason
    assert "b" not in state.jobs


def test_a_checkpoint_awaited_from_a_dependency_must_lie_in_one_of_their_model_dirs():
    """fine_tune_checkpoint that did not exist at submission (awaits_checkpoint): accepted when it is
    in the model_dir of a job in after, rejected (naming those model_dirs) when it is not."""
    state, _ = submit(cpu(), spec("pre"))
    state, _ = submit(state, spec("other"))
    wanted = "/srv/models/pre/exported/checkpoint/ckpt-0"
    fine = replace(spec("fine", after=("pre",)), awaits_checkpoint=wanted,
                   pipeline=PipelineEdits(fine_tune_checkpoint=wanted))
    state, actions = submit(state, fine)
    assert kinds(actions, sch.Accepted) and state.jobs["fine"].state is JobState.WAITING
    astray = "/srv/models/other/exported/checkpoint/ckpt-0"
    typo = replace(spec("typo", after=("pre",)), awaits_checkpoint=astray,
                   pipeline=PipelineEdits(fine_tune_checkpoint=astray))
    state, actions = submit(state, typo)
    [rejected] = kinds(actions, sch.Rejected)
    assert rejected.reason.startswith(f"job 'typo' has [pipeline] fine_tune_checkpoint {astray}, which does not "
                                      f"exist ({astray}.index) and is not in the model_dir of a job it waits for "
                                      "(after: 'pre' writes /srv/models/pre)"), rejected.reason
    assert "/srv/models/pre/exported/checkpoint/ckpt-0 with its [eval] export_best = true" in rejected.reason
    # a prefix of the directory's name is not inside it
    sibling = replace(spec("sib", after=("pre",)), awaits_checkpoint="/srv/models/pre2/ckpt-0",
                      pipeline=PipelineEdits(fine_tune_checkpoint="/srv/models/pre2/ckpt-0"))
    assert kinds(submit(state, sibling)[1], sch.Rejected)


def test_awaited_missing_names_the_dependencies_and_is_silent_when_the_checkpoint_is_there():
    state, _ = submit(cpu(), spec("pre"))
    state, _ = exited(state, "pre", 0, 1.0)
    wanted = "/srv/models/pre/exported/checkpoint/ckpt-0"
    fine = replace(spec("fine", after=("pre",)), awaits_checkpoint=wanted,
                   pipeline=PipelineEdits(fine_tune_checkpoint=wanted))
    why = awaited_missing(fine, state.jobs, exists=False)
    assert why.startswith(f"[pipeline] fine_tune_checkpoint {wanted} does not exist ({wanted}.index): the job(s) "
                          "it waits for (after: 'pre' (succeeded)) did not write it"), why
    assert awaited_missing(fine, state.jobs, exists=True) is None
    assert awaited_missing(spec("plain"), state.jobs, exists=False) is None


def _known(graph: dict[str, tuple[str, ...]]) -> dict[str, Job]:
    return {name: Job(name=name, seq=i, spec=spec(name, after=after), wants=0, state=JobState.WAITING)
            for i, (name, after) in enumerate(graph.items())}


def test_a_cycle_through_known_jobs_is_found_and_rejected_with_its_path():
    # Submissions cannot make one (a job only waits for jobs submitted before it, names are never
    # reused); restored records can (one that could not be read): the check does not assume either.
    jobs = _known({"x": ("y",), "y": ("z",), "z": ("n",), "other": ()})
    assert find_cycle("n", ("other", "x"), jobs) == ["n", "x", "y", "z", "n"]
    assert find_cycle("n", ("other",), jobs) is None
    assert find_cycle("n", ("n",), jobs) == ["n", "n"]
    state = sch.State(inventory=(), jobs=jobs, next_seq=10)
    _, actions = submit(state, spec("n", after=("other", "x")))
    [rejected] = kinds(actions, sch.Rejected)
    assert "would close a cycle of dependencies (after): n -> x -> y -> z -> n" in rejected.reason


def test_find_cycle_visits_each_job_once_on_a_wide_diamond():
    graph = {f"l{i}": tuple(f"l{i - 1}-{k}" for k in range(30)) if i else () for i in range(40)}
    jobs = _known({**{f"l{i}-{k}": (f"l{i}",) for i in range(40) for k in range(30)}, **graph})
    assert find_cycle("new", ("l39",), jobs) is None  # 2**40 paths if it walked each: finishes at once


def test_cancel_of_a_waiting_job_and_retry_back_to_waiting_then_queued():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    state, actions = sch.step(state, sch.Cancel("b"), 1.0)
    b = state.jobs["b"]
    assert b.state is JobState.CANCELLED and b.reason == "cancelled by request" and b.waiting_for == ()
    state, actions = sch.step(state, sch.Retry("b"), 2.0)
    assert state.jobs["b"].state is JobState.WAITING and state.jobs["b"].waiting_for == ("a",)
    assert state.jobs["b"].reason == "retry requested; waiting for a (after)"
    state, actions = exited(state, "a", 0, 3.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (), 1)]


def test_retry_of_a_job_cancelled_by_its_dependency_is_refused_until_the_dependency_is_retried():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    state, _ = exited(state, "a", 1, 1.0)
    assert state.jobs["b"].state is JobState.CANCELLED
    state, actions = sch.step(state, sch.Retry("b"), 2.0)
    [refused] = kinds(actions, sch.Refused)
    assert "'a', which is failed" in refused.reason and "oddaemon retry a" in refused.reason
    assert state.jobs["b"].state is JobState.CANCELLED
    state, _ = sch.step(state, sch.Retry("a"), 3.0)  # a runs again (the CPU slot is free)
    state, _ = sch.step(state, sch.Retry("b"), 4.0)
    assert state.jobs["b"].state is JobState.WAITING
    state, actions = exited(state, "a", 0, 5.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (), 1)]


def test_retry_when_the_dependency_has_succeeded_queues_directly():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    state, _ = sch.step(state, sch.Cancel("b"), 1.0)
    state, _ = exited(state, "a", 0, 2.0)
    state, actions = sch.step(state, sch.Retry("b"), 3.0)
    assert [(a.old, a.new) for a in kinds(actions, sch.StateChanged)] == [("cancelled", "queued"),
                                                                        ("queued", "running")]


def test_waiting_survives_a_restore_from_the_saved_record_and_is_released_after():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    saved = [Job.from_dict(json.loads(json.dumps(j.to_dict()))) for j in state.jobs.values()]
    assert saved[1].spec.after == ("a",) and saved[1].waiting_for == ("a",)
    restored, actions = sch.step(cpu(), sch.Restore(tuple(saved)), 10.0)
    assert restored.jobs["b"].state is JobState.WAITING
    assert restored.jobs["a"].state is JobState.RUNNING  # resumed (queued, then started)
    restored, actions = exited(restored, "a", 0, 12.0)
    assert kinds(actions, sch.StartTrain) == [sch.StartTrain("b", (), 1)]


def test_a_restored_waiting_job_whose_dependency_record_is_lost_is_cancelled():
    state, _ = submit(cpu(), spec("a"))
    state, _ = submit(state, spec("b", after=("a",)))
    restored, _ = sch.step(cpu(), sch.Restore((state.jobs["b"],)), 10.0)
    assert restored.jobs["b"].state is JobState.CANCELLED
    assert "job 'a' it waits for (after) is no longer known" in restored.jobs["b"].reason


def test_the_transition_table_for_waiting():
    for new in (JobState.QUEUED, JobState.CANCELLED):
        check_transition("b", JobState.WAITING, new)
    for new in (JobState.RUNNING, JobState.FAILED, JobState.SUCCEEDED, JobState.BACKOFF):
        with pytest.raises(IllegalTransition):
            check_transition("b", JobState.WAITING, new)
    with pytest.raises(IllegalTransition):
        check_transition("b", JobState.RUNNING, JobState.WAITING)


# ---- the key ------------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):
    (tmp_path / "p.config").write_text("model {}\n")
    return tmp_path


def job_file(root, after: str, name: str = "b") -> bytes:
    return (f'name = "{name}"\npipeline_config = "{root}/p.config"\nmodel_dir = "{root}/m"\n'
            f"after = {after}\n").encode()


def parsed(root, after: str, name: str = "b"):
    return parse_job(job_file(root, after, name), f"{name}.toml", ValidationContext(allowed_roots=(str(root),)))


def test_after_round_trips_through_the_spec_dict(root):
    result = parsed(root, '["a", "prep-1.x"]')
    assert isinstance(result, JobSpec) and result.after == ("a", "prep-1.x")
    assert JobSpec.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert parsed(root, "[]").after == ()


@pytest.mark.parametrize(("after", "expected"), [
    ('"a"', 'after: must be a list of job names such as ["prepare-data"], got \'a\''),
    ("[1]", "after: entry 1 must be a job name (a string), got 1"),
    ('["a", "../x"]', "after: entry 2 is not a valid job name: '../x' contains '/', which is not allowed"),
    ('["a", "a"]', "after: 'a' is listed twice"),
    ('["x", "b"]', "after: names this job itself ('b'): a job cannot wait for itself (a cycle: b -> b)"),
    (json.dumps([f"j{i}" for i in range(MAX_AFTER + 1)]), f"after: names {MAX_AFTER + 1} jobs; a job may wait "
                                                          f"for at most {MAX_AFTER}"),
])
def test_bad_after_values_are_rejected_with_the_key_named(root, after, expected):
    result = parsed(root, after)
    assert isinstance(result, list)
    assert [p.render() for p in result if p.key == "after"][0].startswith(expected)


def test_after_naming_itself_through_the_default_name(root):
    data = job_file(root, '["b"]').replace(b'name = "b"\n', b"")
    result = parse_job(data, "b.toml", ValidationContext(allowed_roots=(str(root),)))
    assert [p.key for p in result] == ["after"]
