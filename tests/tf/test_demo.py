"""The demo as users run it (``oddaemon demo``, what ``scripts/demo`` runs), with the real TF workers:
it learns from scratch on the CPU, every checkpoint is evaluated, the best is exported and loads,
and it prints a line only when something changed, with no warning. Then fine-tuning as the seed
does it: a second job starts from the demo's exported checkpoint with another ``num_classes`` and a
pipeline.config without ``fine_tune_checkpoint_version``. A threshold on quality, never on time
(the README's demo time is a measurement)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.harness import DaemonEnv
from tests.support.realtf import REAL_TF, detect

pytestmark = [*REAL_TF, pytest.mark.timeout(1500)]

MAP = "DetectionBoxes_Precision/mAP"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "demo")
    out = subprocess.run([sys.executable, "-m", "oddaemon", "demo", "--dir", root], capture_output=True, text=True,
                         timeout=1400, env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    return root, out


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_the_demo_learns_evaluates_every_checkpoint_and_exports_the_best(demo):
    root, out = demo
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "demo: job demo succeeded" in out.stdout
    book = load(os.path.join(root, "state", "evals", "demo.json"))
    checkpoints = book["checkpoints"]
    assert [(c["state"], c["step"], c["attempts"]) for c in checkpoints] == [
        ("evaluated", step, 1) for step in range(0, 1001, 200)]
    best = load(os.path.join(root, "models", "demo", "best", "best.json"))
    values = {c["step"]: c["metrics"][MAP] for c in checkpoints}
    assert best["value"] == max(values.values()) and best["value"] >= 0.25, values
    info = load(os.path.join(root, "models", "demo", "exported", "export.json"))
    assert (info["checkpoint"], info["step"], info["metric"], info["value"]) == (
        best["checkpoint"], best["step"], MAP, best["value"])
    exported = os.path.join(root, "models", "demo", "exported")
    assert detect(exported, 128)["num"] > 0


def test_the_demo_prints_a_line_only_when_something_changed_and_no_warning(demo):
    root, out = demo
    progress = [line for line in out.stdout.splitlines() if line.startswith("demo: ") and " step " in line]
    assert len(progress) >= 6, out.stdout  # in a pipe: one line per change
    assert all(a != b for a, b in zip(progress, progress[1:])), out.stdout
    assert "None" not in out.stdout
    noisy = [line for line in (out.stdout + out.stderr).splitlines() if " WARNING " in line or " ERROR " in line]
    assert noisy == [], noisy


def test_fine_tuning_from_another_jobs_checkpoint_with_new_num_classes(demo, tmp_path):
    """The seed's central step. The pipeline.config sets no fine_tune_checkpoint_version (its proto
    default is V1, which model_main_tf2 refuses); oddaemon makes the effective config TF2-ready."""
    root, out = demo
    assert out.returncode == 0
    env = DaemonEnv(str(tmp_path))
    env.write_config(worker_module="oddaemon.workers")
    try:
        data = os.path.join(env.root, "data", "demo")
        shutil.copytree(os.path.join(root, "data"), data)
        checkpoint = os.path.join(env.root, "zoo", "checkpoint")
        shutil.copytree(os.path.join(root, "models", "demo", "exported", "checkpoint"), checkpoint)
        with open(os.path.join(data, "pipeline.config")) as f:
            assert "fine_tune_checkpoint" not in f.read()
        with open(os.path.join(data, "label_map.pbtxt")) as f:
            labels = f.read() + 'item {\n  id: 4\n  name: "star"\n}\n'
        with open(os.path.join(data, "label_map4.pbtxt"), "w") as f:
            f.write(labels)
        env.start()
        env.drop("tuned.toml", f'''name = "tuned"
pipeline_config = "{data}/pipeline.config"
model_dir = "{env.models}/tuned"
[pipeline]
num_classes = 4
num_steps = 20
label_map_path = "{data}/label_map4.pbtxt"
train_input_path = "{data}/train-*.tfrecord"
eval_input_path = "{data}/eval.tfrecord"
fine_tune_checkpoint = "{checkpoint}/ckpt-0"
fine_tune_checkpoint_type = "detection"
[train]
gpus = 0
checkpoint_every_n = 20
''')
        job = env.wait_state("tuned", ("succeeded", "failed"), 900)
        assert job["state"] == "succeeded", (job["reason"], job.get("failure"), env.daemon_log()[-4000:])
        with open(os.path.join(env.models, "tuned", "pipeline.config")) as f:
            assert "fine_tune_checkpoint_version: V2" in f.read()
        tuned = {c["step"]: c["metrics"] for c in job["evaluation"]["checkpoints"]}
        scratch = load(os.path.join(root, "state", "evals", "demo.json"))["checkpoints"][0]
        assert scratch["step"] == 0 and sorted(tuned) == [0, 20]
        # step 0 of the fine-tuned job already detects: the weights were restored (the class head is new)
        assert tuned[0][f"{MAP}@.50IOU"] > scratch["metrics"][f"{MAP}@.50IOU"], (tuned[0], scratch["metrics"])
        assert tuned[0][MAP] > scratch["metrics"][MAP]
    finally:
        env.close(timeout=60)
