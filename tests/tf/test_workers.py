"""The real TF workers (oddaemon.workers) end to end, on a tiny SSD MobileNetV2-FPN trained from
scratch on generated data. Slow tier: needs the TF stack (requirements-tf.txt); skipped without it.

The workers run as real subprocesses (``sys.executable -m oddaemon.workers ...``), as the daemon
runs them. Training is shared: one 12-step run with checkpoint_every_n = 5 (checkpoints at steps
0, 5, 10, 12), which the eval, export, resume and preflight tests then use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("object_detection")

from oddaemon.core.failures import classify_failure  # noqa: E402
from oddaemon.core.jobspec import EvalOptions, JobSpec, PipelineEdits, TrainOptions  # noqa: E402
from oddaemon.formats.tfevents import EventDirReader, EventFileReader  # noqa: E402

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
COCO_METRICS = (
    "DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU",
    "DetectionBoxes_Precision/mAP@.75IOU", "DetectionBoxes_Precision/mAP (small)",
    "DetectionBoxes_Precision/mAP (medium)", "DetectionBoxes_Precision/mAP (large)",
    "DetectionBoxes_Recall/AR@1", "DetectionBoxes_Recall/AR@10", "DetectionBoxes_Recall/AR@100",
    "DetectionBoxes_Recall/AR@100 (small)", "DetectionBoxes_Recall/AR@100 (medium)",
    "DetectionBoxes_Recall/AR@100 (large)",
)
TRAIN_STEPS = 12
EVERY_N = 5


# ------------------------------------------------------------------------------------------ helpers


def worker(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "oddaemon.workers", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess, rc: int = 0) -> str:
    assert result.returncode == rc, f"exit status {result.returncode}; output tail:\n{result.stdout[-6000:]}"
    return result.stdout


def write_job(path, spec: JobSpec, gpus: list | None = None) -> str:
    job = {"spec": spec.to_dict(), "attempt": 1, "gpus": gpus if gpus is not None else [],
           "log_path": str(path) + ".log"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    return str(path)


def make_spec(data: dict, model_dir, **pipeline) -> JobSpec:
    train = pipeline.pop("train", TrainOptions(gpus=0, checkpoint_every_n=EVERY_N, checkpoint_max_to_keep=20))
    evaluation = pipeline.pop("eval", EvalOptions())
    return JobSpec(name="tiny", pipeline_config=pipeline.pop("pipeline_config", data["pipeline_config"]),
                   model_dir=str(model_dir), pipeline=PipelineEdits(**pipeline), train=train, eval=evaluation)


def checkpoint_steps(model_dir) -> dict[str, int]:
    """{prefix: step read from the checkpoint itself}, for every checkpoint in the state file."""
    state = tf.train.get_checkpoint_state(str(model_dir))
    return {p: int(tf.train.load_variable(p, STEP_KEY)) for p in state.all_model_checkpoint_paths}


def scalars(logdir) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for event in EventDirReader(str(logdir)).read_new():
        out.setdefault(event.step, {}).update(event.values)
    return out


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    check(worker("generate-demo", "--out", str(out), "--model", "ssd_mobilenet_tiny",
                 "--train-images", "16", "--eval-images", "6"))
    return {"dir": str(out), "pipeline_config": str(out / "pipeline.config"),
            "label_map": str(out / "label_map.pbtxt"), "train": str(out / "train-*.tfrecord"),
            "eval": str(out / "eval.tfrecord")}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trained")
    model_dir = root / "model"
    spec = make_spec(data, model_dir, num_steps=TRAIN_STEPS, total_steps=TRAIN_STEPS, warmup_steps=2,
                     batch_size=2, train_input_path=(data["train"],))
    job = write_job(root / "job.json", spec)
    started = time.monotonic()
    output = check(worker("train", "--job", job, timeout=900))
    return {"model_dir": model_dir, "job": job, "spec": spec, "output": output,
            "seconds": time.monotonic() - started, "root": root}


# ------------------------------------------------------------------------------------------ pure parts


def test_plan_phases_lands_on_the_cadence_and_the_final_step():
    from oddaemon.workers.train import Phase, plan_phases

    assert plan_phases(0, 12, 5) == [Phase(10, 5, 5, True), Phase(12, 2, 2, False)]
    assert plan_phases(0, 300, 100) == [Phase(300, 100, 100, True)]
    assert plan_phases(0, 2500, 1000) == [Phase(2000, 100, 1000, True), Phase(2500, 100, 500, False)]
    assert plan_phases(0, 7, 50) == [Phase(7, 7, 7, False)]
    assert plan_phases(12, 20, 5) == [Phase(17, 1, 5, False), Phase(20, 1, 3, False)]
    assert plan_phases(12, 12, 5) == []
    for start, end, every in [(0, 12, 5), (0, 1001, 1000), (7, 250, 30), (300, 1234, 1000), (0, 1, 1)]:
        phases = plan_phases(start, end, every)
        step, saves = start, []
        for phase in phases:  # replay train_loop's loop and checkpoint rule
            assert (phase.train_steps - step) % phase.steps_per_iteration == 0
            assert step % phase.steps_per_iteration == 0  # so its scalars are recorded
            checkpointed = step
            while step < phase.train_steps:
                step += phase.steps_per_iteration
                if step - checkpointed >= phase.checkpoint_every_n:
                    saves.append(step)
                    checkpointed = step
        assert step == end and saves[-1] == end
        assert [s for s in saves if s < end] == [start + k * every for k in range(1, (end - start) // every + 1)
                                                 if start + k * every < end]


def test_pipeline_edits_change_the_effective_config(data, tmp_path):
    from oddaemon.workers import compat

    compat.apply()
    from object_detection.utils import config_util

    from oddaemon.workers import pipeline

    source = config_util.get_configs_from_pipeline_file(data["pipeline_config"])
    edits = PipelineEdits(num_classes=5, batch_size=8, num_steps=1234, learning_rate_base=0.02,
                          warmup_learning_rate=0.002, warmup_steps=50, total_steps=1500,
                          fine_tune_checkpoint="/ft/checkpoint/ckpt-0", fine_tune_checkpoint_type="detection",
                          label_map_path="/labels/map.pbtxt", train_input_path=("/a/train-*.record", "/b/c.record"),
                          eval_input_path=("/e/val-?????.record",))
    spec = make_spec(data, tmp_path / "model", **{k: v for k, v in edits.__dict__.items()})
    path, _ = pipeline.prepare(spec.to_dict())
    assert path == str(tmp_path / "model" / "pipeline.config")
    configs = config_util.get_configs_from_pipeline_file(path)
    train = configs["train_config"]
    cosine = train.optimizer.momentum_optimizer.learning_rate.cosine_decay_learning_rate
    assert configs["model"].ssd.num_classes == 5
    assert train.batch_size == 8 and train.num_steps == 1234
    assert cosine.learning_rate_base == pytest.approx(0.02) and cosine.total_steps == 1500
    assert cosine.warmup_learning_rate == pytest.approx(0.002) and cosine.warmup_steps == 50
    assert train.fine_tune_checkpoint == "/ft/checkpoint/ckpt-0"
    assert train.fine_tune_checkpoint_type == "detection"
    assert configs["train_input_config"].label_map_path == "/labels/map.pbtxt"
    assert all(r.label_map_path == "/labels/map.pbtxt" for r in configs["eval_input_configs"])
    assert list(configs["train_input_config"].tf_record_input_reader.input_path) == ["/a/train-*.record",
                                                                                    "/b/c.record"]
    assert [list(r.tf_record_input_reader.input_path) for r in configs["eval_input_configs"]] == [
        ["/e/val-?????.record"]]
    # everything else is kept
    assert configs["model"].ssd.image_resizer == source["model"].ssd.image_resizer
    assert configs["eval_config"] == source["eval_config"]

    # no edits: the config is unchanged
    untouched, _ = pipeline.prepare(make_spec(data, tmp_path / "plain").to_dict())
    plain = config_util.get_configs_from_pipeline_file(untouched)
    for key in ("model", "train_config", "train_input_config", "eval_config"):
        assert plain[key] == source[key]

    # the manual workflow's layout: pipeline_config inside model_dir; edits do not accumulate
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(data["pipeline_config"], inside / "pipeline.config")
    spec = make_spec(data, inside, pipeline_config=str(inside / "pipeline.config"), num_steps=77)
    for _ in range(2):
        pipeline.prepare(spec.to_dict())
    assert config_util.get_configs_from_pipeline_file(str(inside / "pipeline.config"))["train_config"].num_steps == 77
    assert (inside / "pipeline.config.orig").read_text() == open(data["pipeline_config"]).read()


def test_a_fine_tune_checkpoint_gets_version_v2_unless_the_config_says_v1(data):
    from oddaemon.workers import compat

    compat.apply()
    from object_detection.protos import train_pb2

    from oddaemon.workers import pipeline

    source = pipeline.load_pipeline(data["pipeline_config"])
    assert not source.train_config.HasField("fine_tune_checkpoint_version")  # the proto default is V1
    edited = pipeline.apply_edits(source, PipelineEdits(fine_tune_checkpoint="/ft/ckpt-0",
                                                        fine_tune_checkpoint_type="detection"))
    assert edited.train_config.fine_tune_checkpoint_version == train_pb2.V2
    assert not any("fine_tune_checkpoint_version" in p for p in pipeline.check_effective(edited)[0])
    source.train_config.fine_tune_checkpoint_version = train_pb2.V1  # written in pipeline.config
    kept = pipeline.apply_edits(source, PipelineEdits(fine_tune_checkpoint="/ft/ckpt-0"))
    problems, _ = pipeline.check_effective(kept)
    assert any("change the line to `fine_tune_checkpoint_version: V2`" in p for p in problems), problems
    untouched = pipeline.apply_edits(pipeline.load_pipeline(data["pipeline_config"]), PipelineEdits())
    assert not untouched.train_config.HasField("fine_tune_checkpoint_version")  # no fine-tuning, no change


def test_cosine_edits_on_another_schedule_are_refused(data, tmp_path):
    from oddaemon.workers import compat

    compat.apply()
    from oddaemon.workers import pipeline

    text = open(data["pipeline_config"]).read()
    start = text.index("cosine_decay_learning_rate")
    end = text.index("momentum_optimizer_value")
    constant = text[:start] + "constant_learning_rate { learning_rate: 0.01 } } " + text[end:]
    proto = pipeline.parse_pipeline_text(constant, "/x/p.config")
    with pytest.raises(pipeline.PipelineError) as caught:
        pipeline.apply_edits(proto, {"learning_rate_base": 0.1, "warmup_steps": 5})
    assert caught.value.problems == [
        "[pipeline] learning_rate_base, warmup_steps: train_config.optimizer.momentum_optimizer.learning_rate "
        "uses constant_learning_rate, not cosine_decay_learning_rate; remove the key(s) or use a "
        "pipeline.config with a cosine decay learning rate"]


# ------------------------------------------------------------------------------------------ train


def test_train_checkpoints_on_the_cadence_and_at_the_final_step(trained):
    steps = checkpoint_steps(trained["model_dir"])
    assert sorted(steps.values()) == [0, 5, 10, TRAIN_STEPS]
    latest = tf.train.latest_checkpoint(str(trained["model_dir"]))
    assert steps[latest] == TRAIN_STEPS
    written = scalars(trained["model_dir"] / "train")
    assert {5, 10, TRAIN_STEPS} <= set(written)
    for step in (5, 10, TRAIN_STEPS):
        assert {"Loss/total_loss", "learning_rate", "Loss/classification_loss"} <= set(written[step])
    # the effective config is in model_dir, with the job's edits
    text = (trained["model_dir"] / "pipeline.config").read_text()
    assert f"num_steps: {TRAIN_STEPS}" in text and "batch_size: 2" in text
    assert "training finished at step 12" in trained["output"]


def test_train_resumes_from_the_latest_checkpoint(trained, data, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained["model_dir"], model_dir)
    before = set(checkpoint_steps(model_dir).values())
    spec = make_spec(data, model_dir, num_steps=17, total_steps=17, warmup_steps=2, batch_size=2,
                     train_input_path=(data["train"],))
    output = check(worker("train", "--job", write_job(tmp_path / "job.json", spec), timeout=600))
    assert f"resuming from step {TRAIN_STEPS}" in output
    steps = checkpoint_steps(model_dir)
    assert set(steps.values()) == before | {17}
    assert steps[tf.train.latest_checkpoint(str(model_dir))] == 17
    written = scalars(model_dir / "train")
    assert 17 in written and "Loss/total_loss" in written[17]
    # nothing was retrained from scratch: every scalar in the new event files is past the resumed step
    original = set(os.listdir(trained["model_dir"] / "train"))
    new_files = [f for f in os.listdir(model_dir / "train") if f not in original]
    assert new_files
    new_steps = {e.step for f in new_files for e in EventFileReader(str(model_dir / "train" / f)).read_new()}
    assert new_steps and min(new_steps) > TRAIN_STEPS
    # running again at num_steps does nothing
    output = check(worker("train", "--job", write_job(tmp_path / "job.json", spec), timeout=300))
    assert "nothing to train" in output


def start_train_worker(data: dict, tmp_path, model_dir, num_steps: int):
    """The train worker as the daemon runs it, on a long tiny job; its output in tmp_path/train.log."""
    spec = make_spec(data, model_dir, num_steps=num_steps, batch_size=2, train_input_path=(data["train"],))
    job = write_job(tmp_path / "job.json", spec)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "train.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "oddaemon.workers", "train", "--job", job], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def test_train_exits_promptly_on_sigterm(data, tmp_path):
    model_dir = tmp_path / "model"
    proc, log = start_train_worker(data, tmp_path, model_dir, num_steps=500)
    try:
        deadline = time.monotonic() + 300
        while not (model_dir / "checkpoint").exists():  # step 0 is saved before the first step
            assert proc.poll() is None, "the worker ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300s"
            time.sleep(0.5)
        time.sleep(3)  # now inside a training iteration (a tf.function call)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read()
    assert rc == 143, output[-3000:]
    assert took < 15
    assert "SIGTERM received" in output
    # the recorded checkpoints are complete and readable
    assert 0 in checkpoint_steps(model_dir).values()


def test_train_saves_and_asks_to_be_requeued_on_the_clusters_warning_signal(data, tmp_path):
    """sbatch --signal=B:USR2@N: the batch script forwards SIGUSR2 to the worker, which saves a
    checkpoint after the training iteration it is in and exits 75 with an oddaemon-failure line
    "requeued" (the daemon resubmits it; it resumes from that checkpoint)."""
    model_dir = tmp_path / "model"
    proc, log = start_train_worker(data, tmp_path, model_dir, num_steps=5000)
    try:
        deadline = time.monotonic() + 300
        while not (model_dir / "checkpoint").exists() or max(checkpoint_steps(model_dir).values()) < EVERY_N:
            assert proc.poll() is None, "the worker ended before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint after 300s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR2)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read()
    assert rc == 75, output[-3000:]
    (line,) = [x for x in output.splitlines() if x.startswith("oddaemon-failure: requeued: saved a checkpoint at step")]
    step = int(line.split("at step ")[1].split()[0])
    steps = checkpoint_steps(model_dir)
    assert step >= EVERY_N and max(steps.values()) == step, (line, steps)
    assert classify_failure(rc, output.splitlines()).kind == "requeued"


# ------------------------------------------------------------------------------------------ eval


def test_eval_one_checkpoint_writes_the_result_and_events(trained, tmp_path):
    steps = checkpoint_steps(trained["model_dir"])
    prefix = next(p for p, s in steps.items() if s == 5)
    result = tmp_path / "out" / "eval.json"
    spec = dataclasses.replace(trained["spec"], eval=EvalOptions(sample_1_of_n_eval_examples=2))
    job = write_job(tmp_path / "job.json", spec)
    started = time.monotonic()
    output = check(worker("eval", "--job", job, "--checkpoint", prefix, "--result", str(result), timeout=400))
    took = time.monotonic() - started
    assert "Performing evaluation on 3 images." in output  # 1 of 2 of the 6 eval images
    out = json.loads(result.read_text())
    assert out["checkpoint"] == prefix and out["step"] == 5
    assert set(COCO_METRICS) <= set(out["metrics"])
    assert all(isinstance(out["metrics"][k], float) for k in COCO_METRICS)
    assert {"Loss/total_loss", "Loss/classification_loss", "Loss/localization_loss"} <= set(out["losses"])
    assert all(out["metrics"][k] == v for k, v in out["losses"].items())
    assert out["duration_seconds"] > 0 and out["wall_time"] > 0
    assert not [f for f in os.listdir(result.parent) if f != "eval.json"]  # no temp file left
    written = scalars(trained["model_dir"] / "eval")
    assert "DetectionBoxes_Precision/mAP" in written[5] and "Loss/total_loss" in written[5]
    assert took < 300  # it evaluated once and exited; model_main_tf2 would poll for 300 s+


def test_eval_missing_or_corrupt_checkpoint_fails_clearly(trained, tmp_path):
    missing = str(trained["model_dir"] / "ckpt-99")
    result = worker("eval", "--job", trained["job"], "--checkpoint", missing, "--result",
                    str(tmp_path / "r.json"), timeout=120)
    assert result.returncode == 2
    assert f"checkpoint {missing}: {missing}.index does not exist" in result.stdout
    broken = tmp_path / "ckpt-7"
    (tmp_path / "ckpt-7.index").write_bytes(b"not a checkpoint index at all" * 10)
    result = worker("eval", "--job", trained["job"], "--checkpoint", str(broken), "--result",
                    str(tmp_path / "r.json"), timeout=120)
    assert result.returncode == 2
    assert f"checkpoint {broken} is unreadable or corrupt" in result.stdout
    assert not (tmp_path / "r.json").exists()


def test_warm_evaluator_serves_checkpoint_after_checkpoint(trained, tmp_path):
    steps = checkpoint_steps(trained["model_dir"])
    by_step = {s: p for p, s in steps.items()}
    spec = dataclasses.replace(trained["spec"], model_dir=str(trained["model_dir"]))
    job = write_job(tmp_path / "job.json", spec)
    reply_r, reply_w = os.pipe()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp_path / "eval.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "oddaemon.workers", "eval-serve", "--job", job,
                             "--reply-fd", str(reply_w)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=log, stderr=subprocess.STDOUT, pass_fds=(reply_w,), text=True)
    os.close(reply_w)
    replies = os.fdopen(reply_r, "r")
    try:
        assert json.loads(replies.readline()) == {"event": "ready"}
        requests = [(by_step[10], tmp_path / "r10.json"), (str(tmp_path / "ckpt-404"), tmp_path / "r404.json"),
                    (by_step[TRAIN_STEPS], tmp_path / "r12.json")]
        answers = []
        for prefix, result in requests:
            started = time.monotonic()
            proc.stdin.write(json.dumps({"checkpoint": prefix, "result": str(result)}) + "\n")
            proc.stdin.flush()
            answers.append((json.loads(replies.readline()), time.monotonic() - started))
        # a retry of a checkpoint whose events are written (as after an evaluator killed before its
        # result file): the events' values are taken, nothing is written twice
        map_events = map_events_at(trained["model_dir"] / "eval", 10)
        proc.stdin.write(json.dumps({"checkpoint": by_step[10], "result": str(tmp_path / "again.json"),
                                     "attempt": 2}) + "\n")
        proc.stdin.flush()
        again = json.loads(replies.readline())
        proc.stdin.close()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read()
    assert rc == 0, output[-3000:]
    (first, _), (missing, _), (second, warm_seconds) = answers
    assert first == {"event": "done", "checkpoint": by_step[10], "result": str(tmp_path / "r10.json")}
    assert missing["event"] == "failed" and ".index does not exist" in missing["error"]
    assert second["event"] == "done"
    assert json.loads((tmp_path / "r10.json").read_text())["step"] == 10
    out = json.loads((tmp_path / "r12.json").read_text())
    assert out["step"] == TRAIN_STEPS and set(COCO_METRICS) <= set(out["metrics"])
    assert not (tmp_path / "r404.json").exists()
    written = scalars(trained["model_dir"] / "eval")
    assert "DetectionBoxes_Precision/mAP" in written[10] and "DetectionBoxes_Precision/mAP" in written[TRAIN_STEPS]
    assert again == {"event": "done", "checkpoint": by_step[10], "result": str(tmp_path / "again.json")}
    assert map_events_at(trained["model_dir"] / "eval", 10) == map_events  # none written again
    taken = json.loads((tmp_path / "again.json").read_text())
    assert taken["step"] == 10 and taken["metrics"] == scalars(trained["model_dir"] / "eval")[10]
    assert "is in the eval event files already" in output
    print(f"warm evaluation of one checkpoint: {warm_seconds:.1f}s")


def map_events_at(logdir, step: int) -> int:
    return sum(1 for event in EventDirReader(str(logdir)).read_new()
               if event.step == step and "DetectionBoxes_Precision/mAP" in event.values)


# ------------------------------------------------------------------------------------------ export


def test_export_writes_a_loadable_saved_model(trained, tmp_path):
    steps = checkpoint_steps(trained["model_dir"])
    prefix = next(p for p, s in steps.items() if s == TRAIN_STEPS)
    output_dir = tmp_path / "exported"
    output_dir.mkdir()
    (output_dir / "old-marker").write_text("a previous export")
    check(worker("export", "--job", trained["job"], "--checkpoint", prefix, "--output", str(output_dir),
                 timeout=500))
    assert not (tmp_path / "exported.tmp").exists() and not (tmp_path / "exported.old").exists()
    assert not (output_dir / "old-marker").exists()
    assert (output_dir / "pipeline.config").exists() and (output_dir / "checkpoint" / "ckpt-0.index").exists()
    model = tf.saved_model.load(str(output_dir))  # DIR is the SavedModel, as the stand-in writes it
    image = tf.random.uniform([1, 160, 160, 3], maxval=255, dtype=tf.int32)
    detections = model(tf.cast(image, tf.uint8))
    assert detections["detection_boxes"].shape[:1] == (1,) and detections["detection_boxes"].shape[-1] == 4
    assert detections["detection_scores"].shape[0] == 1


# ------------------------------------------------------------------------------------------ preflight


def preflight(tmp_path, spec: JobSpec, gpus: list | None = None) -> dict:
    job = write_job(tmp_path / "job.json", spec, gpus)
    result = tmp_path / "preflight.json"
    check(worker("preflight", "--job", job, "--result", str(result), timeout=180))
    return json.loads(result.read_text())


def test_preflight_accepts_the_demo_job(data, tmp_path):
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", num_steps=40, total_steps=40))
    assert out["ok"] is True and out["problems"] == []
    assert out["effective"] == {"num_steps": 40, "batch_size": 4, "num_classes": 3}


def test_preflight_bad_config_text_gives_the_line(data, tmp_path):
    config = tmp_path / "p.config"
    lines = open(data["pipeline_config"]).read().splitlines()
    lines[11] = "    num_clases: 3"  # line 12
    config.write_text("\n".join(lines) + "\n")
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", pipeline_config=str(config)))
    assert out["ok"] is False
    assert out["problems"][0].startswith(f"pipeline_config {config} line 12: ")
    assert "num_clases" in out["problems"][0]


def test_preflight_num_classes_must_match_the_label_map(data, tmp_path):
    label_map = tmp_path / "label_map.pbtxt"
    label_map.write_text("".join(f"item {{ id: {i} name: \"c{i}\" }}\n" for i in range(1, 6)))
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", label_map_path=str(label_map)))
    assert out["problems"] == [f"num_classes is 3 but label map {label_map} has 5 items"]
    assert out["effective"]["num_classes"] == 3


def test_preflight_empty_glob(data, tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", train_input_path=(pattern,)))
    assert out["problems"] == [f"train input {pattern} matches no file"]


def test_preflight_corrupt_record_names_the_file(data, tmp_path):
    bad = tmp_path / "broken.record"
    bad.write_bytes(os.urandom(64) + b"garbage" * 100)
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", eval_input_path=(str(bad),)))
    assert len(out["problems"]) == 1
    assert out["problems"][0].startswith(f"eval input file {bad}: its first record is corrupt or not a TFRecord (")


def test_preflight_missing_fine_tune_checkpoint(data, tmp_path):
    prefix = str(tmp_path / "zoo" / "checkpoint" / "ckpt-0")
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", fine_tune_checkpoint=prefix,
                                        fine_tune_checkpoint_type="detection"))
    assert out["problems"] == [f"fine_tune_checkpoint {prefix}: {prefix}.index does not exist (give the "
                               "checkpoint prefix, e.g. .../checkpoint/ckpt-0)"]


def test_preflight_classification_type_on_a_detection_checkpoint(trained, data, tmp_path):
    prefix = tf.train.latest_checkpoint(str(trained["model_dir"]))
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", fine_tune_checkpoint=prefix,
                                        fine_tune_checkpoint_type="classification"))
    assert len(out["problems"]) == 1
    problem = out["problems"][0]
    assert problem.startswith(f"fine_tune_checkpoint_type is \"classification\" but {prefix} is a detection "
                              "checkpoint")
    assert problem.endswith("set [pipeline] fine_tune_checkpoint_type = \"detection\"")
    fixed = preflight(tmp_path, make_spec(data, tmp_path / "model", fine_tune_checkpoint=prefix,
                                          fine_tune_checkpoint_type="detection"))
    assert fixed["ok"] is True, fixed["problems"]


def test_preflight_batch_must_divide_over_the_gpus(data, tmp_path):
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", batch_size=6), gpus=[0, 1, 2, 3])
    assert out["problems"] == ["batch_size 6 is not divisible by the 4 GPU(s) this job gets; each GPU gets an "
                               "equal share of every batch (set [pipeline] batch_size to a multiple of 4)"]
    out = preflight(tmp_path, make_spec(data, tmp_path / "model", batch_size=8), gpus=[0, 1, 2, 3])
    assert out["ok"] is True


# ------------------------------------------------------------------------------------------ doctor


def test_doctor_reports_the_stack(tmp_path):
    result = worker("doctor", "--root", str(tmp_path), timeout=180)
    output = result.stdout
    for label in ("TensorFlow", "Keras", "protobuf", "NumPy", "Pillow", "shim tf_slim_control_flow_ops",
                  "object_detection", "GPUs (TensorFlow)", f"disk {tmp_path}"):
        assert label in output
    assert ("doctor: all OK" in output) == (result.returncode == 0)


def test_doctor_pins_agree_with_requirements():
    from oddaemon.workers import doctor

    pins = {}
    for name in ("requirements-tf.txt", "requirements-tf-nodeps.txt"):
        for line in open(os.path.join(REPO, name)):
            line = line.split("#")[0].strip()
            if line:
                package, _, version = line.partition("==")
                pins[package.lower().replace("_", "-")] = version
    assert "tensorflow" not in pins and "tensorflow-cpu" not in pins  # chosen per host
    for pin in doctor.PINS[1:]:
        listed = [pins[d.lower()] for d in pin.distributions if d.lower() in pins]
        assert listed, f"{pin.label} is not pinned in the requirements files"
        assert pin.accept(listed[0]), f"{pin.label} {listed[0]} is not what doctor accepts"


# ------------------------------------------------------------------------------------------ packaging


def test_importing_the_worker_package_loads_nothing_heavy():
    code = ("import sys, oddaemon.workers, oddaemon.workers.__main__, oddaemon.workers.demo_data; "
            "heavy = [m for m in ('tensorflow', 'numpy', 'object_detection', 'PIL') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_the_effdet_d0_demo_config_passes_preflight(tmp_path):
    data_dir = tmp_path / "effdet"
    check(worker("generate-demo", "--out", str(data_dir), "--model", "effdet_d0", "--train-images", "2",
                 "--eval-images", "1"))
    text = (data_dir / "pipeline.config").read_text()
    assert 'type: "ssd_efficientnet-b0_bifpn_keras"' in text and "min_dimension: 256" in text
    spec = JobSpec(name="effdet", pipeline_config=str(data_dir / "pipeline.config"), model_dir=str(tmp_path / "m"))
    out = preflight(tmp_path, spec)
    assert out["ok"] is True, out["problems"]
    assert out["effective"]["num_classes"] == 3


# ---------------------------------------------------------------------------- failure diagnosis


def test_a_corrupt_record_is_located_and_named_for_the_daemon(tmp_path):
    from oddaemon.core.failures import classify_failure
    from oddaemon.workers import diagnose

    good, bad = str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")
    for path in (good, bad):
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(5):
                writer.write(b"record %d " % i * 50)
    data = bytearray(open(bad, "rb").read())
    record = len(data) // 5
    data[2 * record + 20] ^= 0xFF  # inside the payload of record 2: its CRC no longer matches
    open(bad, "wb").write(bytes(data))
    assert diagnose.find_corrupt_record([str(tmp_path / "*.tfrecord")]) == (bad, 2)
    job = {"spec": {"pipeline": {"train_input_path": [str(tmp_path / "*.tfrecord")]}}}
    try:
        for _ in tf.data.TFRecordDataset([good, bad]):
            pass
    except tf.errors.DataLossError as exc:
        line = diagnose.explain(job, exc)
    else:
        pytest.fail("the damaged file was read without an error")
    failure = classify_failure(1, ["Traceback ...", "DataLossError: corrupted record at 140", line])
    assert failure.kind == "input" and f"corrupt input record in {bad} at record 2" in failure.message
    empty = str(tmp_path / "empty.tfrecord")
    open(empty, "wb").close()
    line = diagnose.explain({"spec": {"pipeline": {"train_input_path": empty}}}, tf.errors.OutOfRangeError(None, None, "End of sequence"))
    assert classify_failure(1, [line]).message.startswith(f"no input records: {empty} hold no records")
    oom = diagnose.explain(None, tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert classify_failure(1, [oom]).kind == "oom"
