"""What the real-TensorFlow tests (tests/tf) share: their markers, the tiny SSD job, a SavedModel check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.support.harness import DaemonEnv

REAL_TF = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("object_detection") is None,
                       reason="the TF stack is not installed (scripts/setup installs it)"),
]

DETECT = r"""
import json, sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
side = int(sys.argv[2])
image = tf.constant(np.random.RandomState(0).randint(0, 255, (1, side, side, 3)).astype(np.uint8))
out = model(image)
print(json.dumps({"num": int(out["num_detections"][0]), "boxes": list(out["detection_boxes"].shape),
                  "scores": list(out["detection_scores"].shape)}))
"""


def detect(exported: str, side: int = 160) -> dict:
    """Load a SavedModel in a fresh Python and run one random image through it."""
    out = subprocess.run([sys.executable, "-c", DETECT, exported, str(side)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_job(env: DaemonEnv, name: str, pipeline: str, train: str, evaluation: str, every: int = 5) -> str:
    """Generate the tiny SSD demo data, start the daemon and drop a CPU job on that data."""
    data = os.path.join(env.root, "data", "demo")
    subprocess.run([sys.executable, "-m", "oddaemon.workers", "generate-demo", "--out", data, "--model",
                    "ssd_mobilenet_tiny", "--train-images", "16", "--eval-images", "8"], check=True)
    env.start()
    return env.drop(f"{name}.toml", f'''name = "{name}"
pipeline_config = "{data}/pipeline.config"
model_dir = "{env.models}/{name}"
[pipeline]
num_classes = 3
batch_size = 4
{pipeline}
label_map_path = "{data}/label_map.pbtxt"
train_input_path = "{data}/train-*.tfrecord"
eval_input_path = "{data}/eval.tfrecord"
[train]
gpus = 0
checkpoint_every_n = {every}
{train}
[eval]
{evaluation}
''')
