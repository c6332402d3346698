"""The stand-in worker, run as a real subprocess the way the daemon starts it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oddaemon.formats.tfevents import EventDirReader
from oddaemon.formats.tfrecord import encode_record
from oddaemon.testing import standin_core
from oddaemon.testing.standin_files import SummaryWriter
from tests.support.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
model {
  ssd { num_classes: 3 }
}
train_config {
  batch_size: 4
  num_steps: %(num_steps)d
  optimizer { momentum_optimizer { learning_rate { cosine_decay_learning_rate {
    learning_rate_base: 0.04
    total_steps: 20
    warmup_learning_rate: 0.01
    warmup_steps: 3
  } } } }
}
eval_config { metrics_set: "coco_detection_metrics" }
# standin: step_seconds = 0.001
"""
STEP_SECONDS = 0.001


def make_job(tmp_path, directives="", num_steps=12, every_n=5, max_to_keep=3, pipeline=None):
    config = tmp_path / "pipeline.config"
    config.write_text(CONFIG % {"num_steps": num_steps} + directives)
    spec = {"name": "demo", "pipeline_config": str(config), "model_dir": str(tmp_path / "model"),
            "pipeline": pipeline or {"num_steps": None, "batch_size": None},
            "train": {"checkpoint_every_n": every_n, "checkpoint_max_to_keep": max_to_keep}, "eval": {}}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"spec": spec, "attempt": 1}))
    return job


def command(*args):
    return [sys.executable, "-m", "oddaemon.testing.standin", *map(str, args)]


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=30, env=env)


def start(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        return subprocess.Popen(command(*args), stdout=out, stderr=err, env=env)


def steps_of(model_dir):
    return {name: standin_core.checkpoint_step(prefix) for prefix in standin_core.read_checkpoint_state(model_dir)
            for name in [os.path.basename(prefix)]}


def train_events(model_dir):
    by_step = {}
    for event in EventDirReader(os.path.join(model_dir, "train")).read_new():
        by_step.setdefault(event.step, {}).update(event.values)
    return by_step


# ------------------------------------------------------------------------------------ pure helpers

def test_parse_directives():
    text = "num_steps: 5\n# standin: crash_at_step = 7\n  #standin:step_seconds=0.5\n# plain comment\n"
    directives = standin_core.parse_directives(text)
    assert directives["crash_at_step"] == 7 and directives["step_seconds"] == 0.5
    assert directives["log_lines_per_step"] == 0 and directives["hang_at_step"] is None
    assert directives["summary_max_queue"] == 10 and directives["summary_flush_seconds"] == 120  # TF's writer
    assert directives["log_every_n"] == 100 and directives["summary_every_n"] is None
    assert set(directives) == set(standin_core.DIRECTIVE_DEFAULTS)
    with pytest.raises(ValueError, match="crash_at_sep"):
        standin_core.parse_directives("# standin: crash_at_sep = 7")
    with pytest.raises(ValueError, match="is not int"):
        standin_core.parse_directives("# standin: crash_at_step = soon")


def test_effective_pipeline():
    text = CONFIG % {"num_steps": 12} + "# num_steps: 999\n"
    assert standin_core.effective_pipeline(text, {"batch_size": 16, "num_steps": None}) == {
        "num_steps": 12, "batch_size": 16, "learning_rate_base": 0.04, "warmup_learning_rate": 0.01,
        "warmup_steps": 3, "total_steps": 20}


def test_learning_rate_warms_up_then_decays():
    pipeline = {"learning_rate_base": 0.04, "warmup_learning_rate": 0.01, "warmup_steps": 3, "total_steps": 20}
    rates = [standin_core.learning_rate(step, pipeline) for step in range(22)]
    assert rates[0] == 0.01 and rates[3] == pytest.approx(0.04)
    assert rates[:4] == sorted(rates[:4]) and rates[3:21] == sorted(rates[3:21], reverse=True)
    assert rates[20] == pytest.approx(0.0) and rates[21] == 0.0
    assert standin_core.learning_rate(0, None) == 0.001  # defaults: 0.08 / 0.001 / 10 / num_steps 100


def test_eval_metrics_rise_and_peak():
    keys = set(standin_core.eval_metrics(0))
    assert len(keys) == 16 and "DetectionBoxes_Recall/AR@100 (large)" in keys and "Loss/total_loss" in keys
    rising = [standin_core.eval_metrics(step)["DetectionBoxes_Precision/mAP"] for step in (0, 10, 50, 200)]
    assert rising == sorted(rising) and rising[0] == 0.0
    peaked = [standin_core.eval_metrics(step, map_peak_step=20)["DetectionBoxes_Precision/mAP"] for step in (10, 20, 30)]
    assert peaked[1] > peaked[0] and peaked[1] > peaked[2]


# ------------------------------------------------------------------------------------------- train

def test_train_checkpoints_state_and_events(tmp_path):
    job = make_job(tmp_path, "# standin: log_lines_per_step = 2\n")
    model_dir = tmp_path / "model"
    result = run("train", "--job", job)
    assert result.returncode == 0, result.stderr
    # ckpt-1 = step 0, then every 5 steps and the final step; max_to_keep 3 dropped ckpt-1.
    assert steps_of(model_dir) == {"ckpt-2": 5, "ckpt-3": 10, "ckpt-4": 12}
    assert sorted(os.listdir(model_dir)) == ["checkpoint"] + [
        f"ckpt-{n}.{kind}" for n in (2, 3, 4) for kind in ("data-00000-of-00001", "index")] + ["train"]
    state = (model_dir / "checkpoint").read_text().splitlines()
    assert state[:4] == ['model_checkpoint_path: "ckpt-4"', 'all_model_checkpoint_paths: "ckpt-2"',
                         'all_model_checkpoint_paths: "ckpt-3"', 'all_model_checkpoint_paths: "ckpt-4"']
    assert [line.split(":")[0] for line in state[4:]] == ["all_model_checkpoint_timestamps"] * 3 + [
        "last_preserved_timestamp"]
    assert json.loads((model_dir / "ckpt-4.index").read_text()) == {"step": 12, "standin": True, "shards": 1}

    pipeline = standin_core.effective_pipeline((tmp_path / "pipeline.config").read_text(), {"num_steps": None})
    events = train_events(model_dir)
    # as the real worker's train_loop records them: once per iteration of num_steps_per_iteration
    # steps (5, the cadence, up to step 10; then 2 for the remainder 10 -> 12)
    assert sorted(events) == [5, 10, 12]
    for step, values in events.items():
        assert set(values) == set(standin_core.TRAIN_TAGS)
        assert values == standin_core.train_scalars(step, pipeline, STEP_SECONDS)

    assert re.findall(r"standin line (\d+)", result.stdout) == [str(n) for n in range(1, 25)]
    assert "per-step time" not in result.stderr  # TF logs every 100 steps

    again = run("train", "--job", job)  # already done: nothing to do
    assert again.returncode == 0 and steps_of(model_dir) == {"ckpt-2": 5, "ckpt-3": 10, "ckpt-4": 12}


def test_log_cadence_shards_and_dense_summaries_on_request(tmp_path):
    job = make_job(tmp_path, "# standin: log_every_n = 5\n# standin: summary_every_n = 1\n"
                             "# standin: checkpoint_shards = 3\n")
    model_dir = tmp_path / "model"
    result = run("train", "--job", job)
    assert result.returncode == 0, result.stderr
    logged = re.findall(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ model_lib_v2\.py:705\] Step (\d+) per-step time "
                        r"\d+\.\d{3}s$", result.stderr, re.MULTILINE)
    assert logged == ["5", "10"] and "INFO:tensorflow:{'Loss/classification_loss': " in result.stderr
    assert sorted(train_events(model_dir)) == list(range(1, 13))
    assert sorted(n for n in os.listdir(model_dir) if n.startswith("ckpt-4.")) == [
        "ckpt-4.data-00000-of-00003", "ckpt-4.data-00001-of-00003", "ckpt-4.data-00002-of-00003", "ckpt-4.index"]
    assert steps_of(model_dir) == {"ckpt-2": 5, "ckpt-3": 10, "ckpt-4": 12}


def test_summary_writer_flushes_like_tfs(tmp_path):
    writer = SummaryWriter(str(tmp_path), max_queue=10, flush_seconds=120)
    version_only = os.path.getsize(writer.path)
    assert version_only > 0  # the file and its file-version record exist from the start
    for i in range(9):
        writer.scalar(1, f"t{i}", 1.0)
    assert os.path.getsize(writer.path) == version_only  # queued, not written
    writer.scalar(1, "t9", 1.0)
    assert os.path.getsize(writer.path) > version_only
    written = os.path.getsize(writer.path)
    writer.scalar(2, "late", 2.0)
    assert os.path.getsize(writer.path) == written
    writer.close()
    assert os.path.getsize(writer.path) > written


def test_pipeline_override_of_num_steps(tmp_path):
    job = make_job(tmp_path, num_steps=50, every_n=100, pipeline={"num_steps": 3})
    assert run("train", "--job", job).returncode == 0
    assert steps_of(tmp_path / "model") == {"ckpt-1": 0, "ckpt-2": 3}


def test_crash_then_resume_from_latest_checkpoint(tmp_path):
    job = make_job(tmp_path, "# standin: crash_at_step = 8\n# standin: crash_times = 1\n# standin: exit_code = 3\n"
                             "# standin: summary_every_n = 1\n# standin: log_every_n = 1\n")
    model_dir = tmp_path / "model"
    crashed = run("train", "--job", job)
    assert crashed.returncode == 3
    assert "Traceback (most recent call last):" in crashed.stderr
    assert steps_of(model_dir) == {"ckpt-1": 0, "ckpt-2": 5}
    assert max(train_events(model_dir)) == 7
    assert (model_dir / ".standin-crashes").read_text().strip() == "1"

    resumed = run("train", "--job", job)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 5 of 12" in resumed.stderr and "Step 6 per-step" in resumed.stderr
    assert "Step 5 per-step" not in resumed.stderr
    assert steps_of(model_dir) == {"ckpt-2": 5, "ckpt-3": 10, "ckpt-4": 12}
    assert len(os.listdir(model_dir / "train")) == 2
    assert sorted(train_events(model_dir)) == list(range(1, 13))


def test_crash_without_limit_repeats(tmp_path):
    job = make_job(tmp_path, "# standin: crash_at_step = 2\n")
    assert [run("train", "--job", job).returncode for _ in range(2)] == [1, 1]
    assert (tmp_path / "model" / ".standin-crashes").read_text().strip() == "2"


def test_oom_message(tmp_path):
    job = make_job(tmp_path, "# standin: oom_at_step = 2\n", pipeline={"batch_size": 16})
    result = run("train", "--job", job)
    assert result.returncode == 1
    cause = ("OOM when allocating tensor with shape[16,64,80,80] and type float on "
             "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc")
    lines = result.stderr.splitlines()
    # as the real worker: its marker first, then TF's graph-mode traceback ending in the cause
    marker = next(i for i, line in enumerate(lines) if line.startswith("oddaemon-failure: oom: out of GPU memory"))
    assert cause in lines[marker] and lines[marker + 1] == "Traceback (most recent call last):"
    assert "tensorflow.python.framework.errors_impl.ResourceExhaustedError: Graph execution error:" in lines
    assert cause in lines and len(lines) - marker > 20


def test_nan_message(tmp_path):
    result = run("train", "--job", make_job(tmp_path, "# standin: nan_at_step = 4\n"))
    assert result.returncode == 1 and "Loss is NaN at step 4" in result.stderr


def test_bad_directive_is_a_setup_error(tmp_path):
    result = run("train", "--job", make_job(tmp_path, "# standin: crash_at = 4\n"))
    assert result.returncode == 2 and "crash_at" in result.stderr and str(tmp_path / "job.json") in result.stderr


def test_hang_stays_alive_until_sigterm(tmp_path):
    proc = start(tmp_path, "train", "--job", make_job(tmp_path, "# standin: hang_at_step = 3\n"))
    try:
        wait_for(lambda: "hanging at step 3" in (tmp_path / "err.log").read_text(), what="the stand-in to hang at step 3")
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
    assert "SIGTERM received at step 2, exiting" in (tmp_path / "err.log").read_text()
    assert steps_of(tmp_path / "model") == {"ckpt-1": 0}


def test_sigterm_while_training(tmp_path):
    job = make_job(tmp_path, "# standin: step_seconds = 0.01\n", num_steps=100000, every_n=10)
    proc = start(tmp_path, "train", "--job", job)
    try:
        wait_for(lambda: len(standin_core.read_checkpoint_state(str(tmp_path / "model"))) >= 2, what="two checkpoints")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
    match = re.search(r"SIGTERM received at step (\d+), exiting", (tmp_path / "err.log").read_text())
    assert match and 10 <= int(match.group(1)) < 100000
    assert all(step % 10 == 0 for step in steps_of(tmp_path / "model").values())  # nothing extra saved


# -------------------------------------------------------------------------------------------- eval

def test_eval_writes_result_and_events(tmp_path):
    job = make_job(tmp_path, "# standin: map_peak_step = 6\n")
    assert run("train", "--job", job).returncode == 0
    model_dir = tmp_path / "model"
    out = tmp_path / "result.json"
    result = run("eval", "--job", job, "--checkpoint", model_dir / "ckpt-3", "--result", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["checkpoint"] == str(model_dir / "ckpt-3") and data["step"] == 10
    assert data["metrics"] == standin_core.eval_metrics(10, map_peak_step=6)
    assert data["duration_seconds"] >= 0.05 and data["wall_time"] > 0
    assert "Eval metrics at step 10" in result.stderr
    events = EventDirReader(str(model_dir / "eval")).read_new()
    assert {event.step for event in events} == {10}
    assert {tag: value for event in events for tag, value in event.values.items()} == data["metrics"]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_eval_missing_checkpoint(tmp_path):
    job = make_job(tmp_path)
    out = tmp_path / "result.json"
    result = run("eval", "--job", job, "--checkpoint", tmp_path / "model" / "ckpt-9", "--result", out)
    assert result.returncode == 2 and str(tmp_path / "model" / "ckpt-9") in result.stderr
    assert not out.exists()


def test_eval_crash_directive(tmp_path):
    job = make_job(tmp_path, "# standin: eval_crash = 12\n")
    assert run("train", "--job", job).returncode == 0
    out = tmp_path / "result.json"
    crashed = run("eval", "--job", job, "--checkpoint", tmp_path / "model" / "ckpt-4", "--result", out)
    assert crashed.returncode == 1 and not out.exists()
    assert run("eval", "--job", job, "--checkpoint", tmp_path / "model" / "ckpt-3", "--result", out).returncode == 0


# ------------------------------------------------------------------------------- inputs, as TF reads


def test_train_reads_its_inputs_and_fails_on_a_damaged_record_as_the_real_worker(tmp_path):
    records = tmp_path / "train-00000-of-00001.tfrecord"
    records.write_bytes(b"".join(encode_record(b"example %d" % i * 30) for i in range(4)))
    job = make_job(tmp_path, pipeline={"train_input_path": [str(tmp_path / "train-*.tfrecord")]})
    assert run("train", "--job", job).returncode == 0
    data = bytearray(records.read_bytes())
    size = len(data) // 4
    data[2 * size + 15] ^= 0xFF
    records.write_bytes(bytes(data))
    (tmp_path / "again").mkdir()
    job = make_job(tmp_path / "again", pipeline={"train_input_path": [str(tmp_path / "train-*.tfrecord")]})
    result = run("train", "--job", job)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("oddaemon-failure: input: "))
    assert lines[marker] == (f"oddaemon-failure: input: corrupt input record in {records} at record 2 (corrupted "
                             f"record at {2 * size}): replace the file or drop it from [pipeline] train_input_path, "
                             "then oddaemon retry")
    # then TF's graph-mode traceback, as in tests/fixtures/tf/train_corrupt_input.log
    assert lines[marker + 1] == "Traceback (most recent call last):"
    assert "tensorflow.python.framework.errors_impl.DataLossError: Graph execution error:" in lines
    assert lines[-2:] == [f"corrupted record at {2 * size}",
                          "\t [[{{node IteratorGetNext}}]] [Op:__inference__dist_train_step_15712]"]


def test_train_without_input_files_or_fine_tune_checkpoint_fails_in_tfs_words(tmp_path):
    job = make_job(tmp_path, pipeline={"train_input_path": [str(tmp_path / "none-*.tfrecord")]})
    result = run("train", "--job", job)
    assert result.returncode == 1 and "Did not find any input files matching the glob pattern" in result.stderr
    job = make_job(tmp_path, pipeline={"fine_tune_checkpoint": str(tmp_path / "zoo" / "ckpt-0")})
    result = run("train", "--job", job)
    assert result.returncode == 1
    assert ("NotFoundError: Unsuccessful TensorSliceReader constructor: Failed to find any matching files for "
            f"{tmp_path / 'zoo' / 'ckpt-0'}") in result.stderr
