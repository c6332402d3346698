"""Failure reasons (classifier), remedies (oom_retry_halve_batch), the train guard (hung, NaN) and
how the pure scheduler acts on each. No processes, no clocks."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest

from oddaemon.adapters.gpus import Discovery, check_listed, discover
from oddaemon.core import scheduler as sch
from oddaemon.core.failures import Failure, classify_failure, marker_line, parse_marker
from oddaemon.core.jobspec import JobSpec, PipelineEdits, TrainOptions
from oddaemon.core.remedies import explain_oom, halve_batch
from oddaemon.core.states import JobState
from oddaemon.formats.pipeline_numbers import read_pipeline_numbers
from oddaemon.service.trainguard import TrainGuard, first_bad_loss, overdue

# What TF 2.15 and the Object Detection API print for each failure (from real logs and TF's source).
TF_LINES = {
    "oom": "tensorflow.python.framework.errors_impl.ResourceExhaustedError: {{function_node __wrapped__Conv2D}} "
           "OOM when allocating tensor with shape[16,64,256,256] and type float on /job:localhost/replica:0/task:0/"
           "device:GPU:0 by allocator GPU_0_bfc [Op:Conv2D]",
    "nan": "tensorflow.python.framework.errors_impl.InvalidArgumentError: Loss is NaN at step 1200 : Tensor had NaN "
           "values [Op:CheckNumerics]",
    # TF 2.15's own words, kept by tests/fixtures/tf/make.py: no file name (the real worker's
    # oddaemon-failure line names it; this is what is left without one)
    "input": open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tf", "corrupt_record.txt"),
                  encoding="utf-8").read().strip(),
    "checkpoint": "tensorflow.python.framework.errors_impl.NotFoundError: Unsuccessful TensorSliceReader constructor: "
                  "Failed to find any matching files for /srv/oddaemon/zoo/ckpt-0",
    "gpu": "2026-11-26 07:00:00.000 E external/local_xla/xla/stream_executor/cuda/cuda_driver.cc:274] failed call "
           "to cuInit: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected",
}


@pytest.mark.parametrize("kind", sorted(TF_LINES))
def test_tensorflow_errors_are_classified_with_advice(kind):
    failure = classify_failure(1, ["INFO:tensorflow:Step 100 per-step time 0.5s", "Traceback (most recent call last):",
                                   TF_LINES[kind]])
    assert failure is not None and failure.kind == kind
    assert failure.retry is (kind in ("oom", "gpu"))
    advice = {"oom": "batch_size", "nan": "learning_rate_base", "input": "train_input_path",
              "checkpoint": "fine_tune_checkpoint", "gpu": "nvidia-smi"}[kind]
    assert advice in failure.message
    if kind == "nan":
        assert failure.step == 1200 and "at step 1200" in failure.message


@pytest.mark.parametrize("line, what, path", [
    ("OSError: [Errno 30] Read-only file system: '/srv/m/ckpt-3.index'", "Read-only file system", "/srv/m/ckpt-3.index"),
    ("tensorflow.python.framework.errors_impl.ResourceExhaustedError: /srv/m/ckpt-3.data-00000-of-00001.tmp; "
     "No space left on device", "No space left on device", "/srv/m/ckpt-3.data-00000-of-00001.tmp"),
    ("PermissionError: [Errno 13] Permission denied: '/srv/m/train'", "Permission denied", "/srv/m/train"),
])
def test_file_system_errors_name_the_path_and_are_not_mistaken_for_gpu_memory(line, what, path):
    failure = classify_failure(1, ["Traceback (most recent call last):", line])
    assert failure.kind == "storage" and failure.retry
    assert failure.message.startswith(f"{what} on {path}: free disk space")


def test_signals_exit_codes_and_success():
    assert classify_failure(-9, ["Step 5"]) == Failure("signal", "killed by SIGKILL (the kernel's OOM killer? see "
                                                                 "`journalctl -k`)")
    assert classify_failure(-15, []).message == "killed by SIGTERM"
    assert classify_failure(3, ["whatever"]) == Failure("exit", "exit status 3")
    assert classify_failure(0, ["all good"]) is None


def test_a_worker_marker_line_wins_over_pattern_matching():
    line = marker_line("input", "corrupt input record in /d/a.tfrecord at record 7")
    failure = classify_failure(1, [TF_LINES["oom"], line, "some shutdown noise"])
    assert failure == Failure("input", "corrupt input record in /d/a.tfrecord at record 7")
    assert parse_marker("oddaemon-failure: bogus: x") is None
    assert parse_marker("oddaemon-failure: hung:") is None
    assert Failure.from_dict(failure.to_dict()) == failure


def pipeline_file(tmp_path, text):
    path = tmp_path / "pipeline.config"
    path.write_text(text)
    return str(path)


PIPELINE = """model { ssd { num_classes: 3 } }
train_config {
  batch_size: 16
  optimizer { momentum_optimizer { learning_rate { cosine_decay_learning_rate {
    learning_rate_base: 0.08
    warmup_learning_rate: 0.002
  } } } }
}
eval_config { batch_size: 1 }
"""


def spec(**train) -> JobSpec:
    return JobSpec(name="j", pipeline_config="/srv/p.config", model_dir="/srv/m", train=TrainOptions(**train))


def test_pipeline_numbers_come_from_train_config(tmp_path):
    numbers = read_pipeline_numbers(pipeline_file(tmp_path, "eval_config { batch_size: 1 }\n" + PIPELINE))
    assert numbers == {"batch_size": 16, "learning_rate_base": 0.08, "warmup_learning_rate": 0.002}
    assert read_pipeline_numbers(str(tmp_path / "missing")) == {}


def test_halving_scales_the_learning_rate_and_stops_at_the_floor():
    numbers = {"batch_size": 16, "learning_rate_base": 0.08, "warmup_learning_rate": 0.002}
    remedy = halve_batch(spec(oom_retry_halve_batch=True), numbers, gpu_count=1)
    assert remedy.batch_size == 8 and remedy.spec.pipeline.batch_size == 8
    assert math.isclose(remedy.spec.pipeline.learning_rate_base, 0.04)
    assert math.isclose(remedy.spec.pipeline.warmup_learning_rate, 0.001)
    assert remedy.note == "batch_size 16 -> 8, learning_rate_base 0.08 -> 0.04, warmup_learning_rate 0.002 -> 0.001"
    # a job override wins over the file; the batch stays divisible by the GPUs
    job = replace(spec(oom_retry_halve_batch=True, min_batch_size=2),
                  pipeline=PipelineEdits(batch_size=12, learning_rate_base=0.3))
    assert halve_batch(job, numbers, gpu_count=4).batch_size == 4
    assert "already at the floor" in halve_batch(replace(job, pipeline=PipelineEdits(batch_size=4)), numbers, 4)
    assert "already at the floor" in halve_batch(spec(min_batch_size=8), {"batch_size": 8}, 1)
    assert "unknown" in halve_batch(spec(), {}, 1)


def test_explain_oom_names_the_batch_and_offers_the_remedy_only_when_asked():
    message = classify_failure(1, [TF_LINES["oom"]]).message
    text, remedy = explain_oom(spec(), message, 1, {"batch_size": 16})
    assert text.startswith("out of GPU memory at batch_size 16") and "oom_retry_halve_batch = true" in text
    assert remedy is None
    text, remedy = explain_oom(spec(oom_retry_halve_batch=True), message, 1, {"batch_size": 16})
    assert "oom_retry_halve_batch" not in text and remedy.batch_size == 8


# ---- the scheduler's side --------------------------------------------------------------------

def running(job_spec: JobSpec):
    state, _ = sch.step(sch.State(inventory=(0,)), sch.Submit(job_spec, "t"), 0.0)
    assert state.jobs["j"].state is JobState.RUNNING
    return state


def test_fatal_failures_fail_at_once_without_burning_restarts():
    state = running(spec(max_restarts=5))
    failure = classify_failure(1, [TF_LINES["input"]])
    state, actions = sch.step(state, sch.ProcessExited("j", 1, 1, failure=failure), 10.0)
    job = state.jobs["j"]
    assert job.state is JobState.FAILED and job.restarts == 0 and job.failure == failure
    assert "not restarted: it would fail the same way" in job.reason and "corrupt input record" in job.reason
    assert job.gpus == ()


def test_oom_with_halving_restarts_at_once_with_the_smaller_batch_and_records_it():
    state = running(spec(oom_retry_halve_batch=True, max_restarts=0))
    job_spec = state.jobs["j"].spec
    remedy = halve_batch(job_spec, {"batch_size": 16, "learning_rate_base": 0.08}, 1)
    failure = Failure("oom", "out of GPU memory at batch_size 16")
    state, actions = sch.step(state, sch.ProcessExited("j", 1, 1, failure=failure, remedy=remedy), 10.0)
    job = state.jobs["j"]
    # restarted in the same step (no backoff), on the same GPU, with the new spec; max_restarts = 0 still allows it
    assert job.state is JobState.RUNNING and job.attempt == 2 and job.gpus == (0,)
    assert job.spec.pipeline.batch_size == 8 and job.consecutive_failures == 0 and job.restarts == 1
    assert job.adjustments == ("out of GPU memory: batch_size 16 -> 8, learning_rate_base 0.08 -> 0.04",)
    assert sch.StartTrain("j", (0,), 2) in actions
    assert any("oom_retry_halve_batch: restarting with batch_size 16 -> 8" in h[2] for h in job.history)
    # at the floor: an ordinary failure, counted against max_restarts (0 here: failed)
    state, _ = sch.step(state, sch.ProcessExited("j", 2, 1, failure=failure, remedy="batch_size 1 is already at the "
                                                                                 "floor"), 20.0)
    assert state.jobs["j"].state is JobState.FAILED
    assert "already at the floor" in state.jobs["j"].reason
    assert sch.Job.from_dict(state.jobs["j"].to_dict()) == state.jobs["j"]


def test_hung_and_signal_failures_back_off_and_restart():
    state = running(spec(max_restarts=2))
    hung = Failure("hung", "hung: no new step, checkpoint or log line for 60s")
    state, _ = sch.step(state, sch.ProcessExited("j", 1, -15, failure=hung), 100.0)
    job = state.jobs["j"]
    assert job.state is JobState.BACKOFF and job.failure == hung
    assert job.reason.startswith("train process killed by signal SIGTERM: hung: no new step")
    state, _ = sch.step(state, sch.Tick(), 200.0)
    state, _ = sch.step(state, sch.ProcessExited("j", 2, -9, failure=classify_failure(-9, [])), 201.0)
    assert state.jobs["j"].reason.startswith("train process killed by SIGKILL (the kernel's OOM killer?")


# ---- the train guard ---------------------------------------------------------------------------

class FakeLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))
        return len(self.timers)


class FakeProgress:
    def __init__(self, history, scalars, step, updated_at):
        self.loss_history, self.scalars, self.step, self.updated_at = history, scalars, step, updated_at


def test_guard_declares_a_silent_worker_hung_once_and_activity_defers_it():
    now = [1000.0]
    seen = []
    loop = FakeLoop()
    guard = TrainGuard(loop, lambda: now[0], lambda name, failure: seen.append((name, failure.kind)))
    guard.begin("a", 60.0)
    guard.begin("off", 0.0)
    assert loop.timers[0][0] == 15.0  # a quarter of the shortest timeout
    now[0] += 50
    guard.activity("a")
    now[0] += 50
    guard.check()
    assert seen == []
    now[0] += 11
    guard.check()
    guard.check()
    assert seen == [("a", "hung")]  # once; "off" (timeout 0) never
    assert overdue(0, 10, 10) and not overdue(0, 9, 10) and not overdue(0, 1e9, 0)


def test_guard_stops_on_the_first_nan_loss_of_this_run_only():
    now = [1000.0]
    seen = []
    guard = TrainGuard(FakeLoop(), lambda: now[0], lambda name, failure: seen.append(failure))
    guard.begin("a", 0.0)
    old_run = FakeProgress([(5, math.nan)], {"Loss/total_loss": math.nan}, 5, updated_at=900.0)
    guard.progress("a", old_run)
    assert seen == []  # NaN events of an earlier run in the same model_dir
    fine = FakeProgress([(1, 1.0), (2, 0.9)], {"Loss/total_loss": 0.9}, 2, updated_at=1001.0)
    guard.progress("a", fine)
    assert seen == []
    bad = FakeProgress([(1, 1.0), (2, 0.9), (3, math.nan), (4, math.nan)],
                       {"Loss/total_loss": math.nan, "Loss/localization_loss": math.inf}, 4, updated_at=1002.0)
    guard.progress("a", bad)
    assert [(f.kind, f.step) for f in seen] == [("nan", 3)]
    assert "loss became NaN at step 3 (Loss/total_loss)" in seen[0].message and not seen[0].retry
    assert first_bad_loss([], {"Loss/x": math.inf}, 9) == (9, "Loss/x")


# ---- GPUs listed in the configuration but gone --------------------------------------------------

def test_listed_gpus_missing_from_the_driver_are_left_out():
    nvml = Discovery((0, 2), "nvml", "2 GPU(s) via NVML")
    gone = check_listed((0, 1, 2), nvml)
    assert gone.ids == (0, 2) and "GPU(s) 1 are gone" in gone.detail
    assert check_listed((0, 1), None).ids == (0, 1)  # no driver to ask: trusted, and said so
    assert "not verified" in check_listed((0, 1), None).detail
    assert check_listed((0, 1), Discovery((), "none", "NVML unavailable: driver not loaded")).ids == (0, 1)
    assert discover((0, 1, 2), probe_gpus=lambda: nvml).ids == (0, 2)
    assert discover("auto", probe_gpus=lambda: nvml).ids == (0, 2)
    assert discover("auto", probe_gpus=lambda: None).ids == ()


def test_only_new_train_events_count_as_activity_not_the_evaluators():
    now = [1000.0]
    seen = []
    guard = TrainGuard(FakeLoop(), lambda: now[0], lambda name, failure: seen.append(failure.kind))
    guard.begin("a", 60.0)
    progress = FakeProgress([(1, 1.0)], {"Loss/total_loss": 1.0}, 1, updated_at=1001.0)
    now[0] += 30
    guard.progress("a", progress)  # a new train event: activity at 1030
    now[0] += 40
    guard.progress("a", progress)  # the same train event again (an eval event woke the reader): no activity
    guard.check()
    assert seen == []  # 40 s since the last train event
    now[0] += 25
    guard.check()
    assert seen == ["hung"]


# ---- each role in its own words ----------------------------------------------------------------
EXPORT_TAIL = ["Traceback (most recent call last):",
               '  File "/x/object_detection/exporter_lib_v2.py", line 270, in export_inference_graph',
               "    status.assert_existing_objects_matched()",
               TF_LINES["checkpoint"],
               "oddaemon.workers export: cannot export checkpoint /m/.oddaemon/export/ckpt-4: NotFoundError: "
               "Unsuccessful TensorSliceReader constructor: Failed to find any matching files for /m/ckpt-4"]


@pytest.mark.parametrize("role, subject", [("export", "the export"), ("eval", "the evaluation"),
                                           ("preflight", "the preflight check")])
def test_other_roles_fail_in_their_own_words_with_the_workers_last_error_line(role, subject):
    failure = classify_failure(2, EXPORT_TAIL, role)
    assert failure == Failure("exit", f"{subject} failed (exit status 2): cannot export checkpoint "
                                      "/m/.oddaemon/export/ckpt-4: NotFoundError: Unsuccessful TensorSliceReader "
                                      "constructor: Failed to find any matching files for /m/ckpt-4")
    assert "fine" not in failure.message and "batch_size" not in failure.message
    # the same lines from a training process are about the fine-tune checkpoint
    assert classify_failure(2, EXPORT_TAIL).kind == "checkpoint"


def test_other_roles_take_tf_s_exception_line_when_the_worker_said_nothing_itself():
    tail = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
            "tensorflow.python.framework.errors_impl.InvalidArgumentError: Incompatible shapes: [1,3] vs. [1,4]",
            "", "some shutdown noise"]
    assert classify_failure(1, tail, "eval").message == (
        "the evaluation failed (exit status 1): InvalidArgumentError: Incompatible shapes: [1,3] vs. [1,4]")


def test_other_roles_signals_storage_and_memory():
    assert classify_failure(-9, ["Evaluating ckpt-3"], "export") == Failure(
        "signal", "the export was killed by SIGKILL (the kernel's OOM killer? see `journalctl -k`)")
    storage = classify_failure(1, ["OSError: [Errno 28] No space left on device: '/m/exported.tmp/variables'"],
                               "export")
    assert storage.kind == "storage" and storage.message.startswith("the export failed: No space left on device: ")
    assert "/m/exported.tmp/variables" in storage.message
    oom = classify_failure(1, [TF_LINES["oom"]], "eval")
    assert oom.kind == "oom" and oom.message.startswith("the evaluation ran out of memory: ResourceExhaustedError")
    assert "batch_size" not in oom.message
    assert classify_failure(0, ["all good"], "export") is None
    assert classify_failure(3, [], "export").message == (
        "the export failed (exit status 3) (see `oddaemon logs --role export NAME`)")


def test_a_marker_from_another_role_keeps_its_kind_and_gets_the_role_s_subject():
    tail = [marker_line("storage", "Read-only file system on /m/exported.tmp"), "Traceback ..."]
    assert classify_failure(1, tail, "export") == Failure("storage", "the export failed: Read-only file system on "
                                                                     "/m/exported.tmp")


# ---- a fine-tune checkpoint: a config problem or a checkpoint that does not fit -------------------
def _raised_in_load_fine_tune_checkpoint(exc: Exception) -> Exception:
    def load_fine_tune_checkpoint():  # the name model_lib_v2 gives the function that restores it
        raise exc

    try:
        load_fine_tune_checkpoint()
    except Exception as caught:  # noqa: BLE001
        return caught
    raise AssertionError("unreachable")


def test_a_fine_tune_failure_is_told_apart_config_or_checkpoint():
    from oddaemon.workers.diagnose import fine_tune_failure  # noqa: PLC0415 - the workers' package, only here

    job = {"spec": {"pipeline": {"fine_tune_checkpoint": "/zoo/ckpt-0"}}}
    version = fine_tune_failure(job, _raised_in_load_fine_tune_checkpoint(ValueError("Checkpoint version should be V2")))
    assert parse_marker(version).kind == "checkpoint" and "pipeline.config problem" in version
    assert "`fine_tune_checkpoint_version: V2`" in version
    misfit = fine_tune_failure(job, _raised_in_load_fine_tune_checkpoint(
        AssertionError("Some objects had attributes which were not restored: model/_box_predictor/...")))
    assert parse_marker(misfit).kind == "checkpoint" and "/zoo/ckpt-0 does not fit the model" in misfit
    assert "the config itself is fine" in misfit and "pipeline.config problem" not in misfit
    assert fine_tune_failure(job, ValueError("Checkpoint version should be V2")) is None  # raised elsewhere
