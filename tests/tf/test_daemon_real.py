"""The real daemon with the real TF workers, end to end, on the tiny SSD-MobileNetV2-FPN model:
preflight -> train (several checkpoints, max_to_keep 1) -> every checkpoint evaluated exactly once
by the warm evaluator -> best kept and exported -> the SavedModel loads and detects."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.support.harness import wait_for
from tests.support.realtf import REAL_TF, detect, tiny_job

pytestmark = [*REAL_TF, pytest.mark.timeout(1200)]

MAP = "DetectionBoxes_Precision/mAP"


def test_real_training_evaluation_best_and_export(real_env):
    env = real_env
    tiny_job(env, "tiny", "num_steps = 16", "checkpoint_max_to_keep = 1", 'device = "cpu"\nexport_best = true')
    final = env.wait_state("tiny", ("succeeded", "failed"), 900)
    assert final["state"] == "succeeded", (final["reason"], env.daemon_log()[-4000:])
    checkpoints = final["evaluation"]["checkpoints"]
    # ckpt-1 is step 0; cadence 5; the final step 16 is saved too
    assert [(c["state"], c["step"], c["attempts"]) for c in checkpoints] == [
        ("evaluated", s, 1) for s in (0, 5, 10, 15, 16)]
    assert all(MAP in c["metrics"] and "DetectionBoxes_Recall/AR@100" in c["metrics"] for c in checkpoints)
    log = open(os.path.join(env.logs, "tiny", "eval.log")).read()
    # one warm evaluator did the work: started once, its model built once, ready once
    assert log.count("==== oddaemon: starting eval") == 1, log[-4000:]
    assert len(re.findall(r"oddaemon\.workers eval-serve: model built in [\d.]+s; ready", log)) == 1, log[-4000:]
    # TF kept only one checkpoint; oddaemon pinned and evaluated all five; best/ holds the best one
    kept = [n for n in os.listdir(os.path.join(env.models, "tiny")) if n.endswith(".index")]
    assert len(kept) == 1
    # the best by the book: the highest mAP, a tie going to the later checkpoint (README: ties go to
    # the more trained one), worked out here from the evaluated checkpoints
    top = max(c["metrics"][MAP] for c in checkpoints)
    expected = max((c for c in checkpoints if c["metrics"][MAP] == top), key=lambda c: c["n"])
    assert final["evaluation"]["best"]["checkpoint"] == expected["checkpoint"]
    assert [c["checkpoint"] for c in checkpoints if c["best"]] == [expected["checkpoint"]]
    best_dir = os.path.join(env.models, "tiny", "best")
    best = json.load(open(os.path.join(best_dir, "best.json")))
    assert (best["checkpoint"], best["step"], best["value"]) == (expected["checkpoint"], expected["step"], top)
    # its files are there, whole: the index and every data shard it names ("-of-S")
    files = sorted(os.listdir(best_dir))
    shards = [f for f in files if f.startswith(f"{expected['checkpoint']}.data-")]
    assert shards, files
    total = int(re.fullmatch(rf"{expected['checkpoint']}\.data-\d{{5}}-of-(\d{{5}})", shards[0]).group(1))
    assert files == sorted(["best.json", f"{expected['checkpoint']}.index"] +
                           [f"{expected['checkpoint']}.data-{i:05d}-of-{total:05d}" for i in range(total)]), files
    assert all(os.path.getsize(os.path.join(best_dir, f)) > 0 for f in files), files
    # the CLI shows train loss, eval mAP and that best
    out = env.cli("status", "tiny")
    assert out.returncode == 0 and "total_loss=" in out.stdout and "mAP" in out.stdout, out.stdout
    assert f"  best       {expected['checkpoint']} step {expected['step']} mAP {top:.4g}" in out.stdout.splitlines(), \
        out.stdout
    # the export of the best checkpoint loads and detects
    exported = os.path.join(env.models, "tiny", "exported")
    wait_for(lambda: os.path.exists(os.path.join(exported, "saved_model.pb")), 120, 1.0, what="the export")
    result = detect(exported)
    assert result["num"] > 0 and result["boxes"][0] == 1 and result["boxes"][2] == 4 and result["scores"][0] == 1
    # oddaemon export: the checkpoint TF kept (step 16), exported now by the real export worker
    kept_prefix = os.path.join(env.models, "tiny", kept[0][:-len(".index")])
    out = env.cli("export", "tiny", "--checkpoint", kept_prefix, "-o", os.path.join(env.root, "kept-export"),
                  timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.load(open(os.path.join(env.root, "kept-export", "export.json")))["step"] == 16
    assert detect(os.path.join(env.root, "kept-export"))["num"] > 0
    # and the daemon never imported tensorflow
    assert env.ask("ping")["heavy_modules"] == []


def test_new_bests_while_a_real_export_runs_never_fail_an_export(real_env):
    """export_when = "each_best": a new best starts a real export (about half a minute on 2 cores)
    while training goes on and the evaluator finds better checkpoints (the eval loss falls step by
    step: measured 1.846, 1.837, 1.824, 1.810, 1.799, 1.789 at steps 5 to 30). None of them may fail
    an export; exported/ ends with the final best. The step-0 checkpoint is never exported: TF writes
    it before the model's variables all exist (its export fails with "Found 298 Python objects that
    were not bound to checkpointed values")."""
    env = real_env
    tiny_job(env, "race", "num_steps = 30", "checkpoint_max_to_keep = 1",
             'device = "cpu"\nexport_best = true\nexport_when = "each_best"\nmetric = "Loss/total_loss"\n'
             "higher_is_better = false")
    final = env.wait_state("race", ("succeeded", "failed"), 900)
    assert final["state"] == "succeeded", (final["reason"], env.daemon_log()[-4000:])
    log = env.daemon_log()
    assert not [line for line in log.splitlines() if "export" in line and ("failed" in line or "ERROR" in line)], log
    # the overlap happened: a newer best waited for (or superseded a waiting one behind) a running export
    assert "waits for the running export of ckpt-" in log, log[-4000:]
    assert "not exporting ckpt-1: it is the untrained step-0 checkpoint" in log
    best = final["evaluation"]["best"]
    info = json.load(open(os.path.join(env.models, "race", "exported", "export.json")))
    assert (info["checkpoint"], info["step"], info["value"]) == (best["checkpoint"], best["step"], best["value"])
    exported = os.path.join(env.models, "race", "exported")
    assert detect(exported)["num"] > 0
    with open(os.path.join(env.logs, "race", "export.log")) as f:
        assert f.read().count("oddaemon.workers export: step ") == len(re.findall(r"job race: exported ckpt-", log))


def test_doctor_reports_a_healthy_stack(real_env):
    out = real_env.cli("doctor", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "doctor: all OK" in out.stdout and "tf_slim_control_flow_ops applied" in out.stdout
    assert f"disk {real_env.root}" in out.stdout


def test_a_real_nan_loss_is_caught_by_the_daemon(real_env):
    """The TF2 OD API trains on with a NaN loss (and writes NaN to its event files): measured with
    learning_rate_base = 1e12 on the tiny model, every logged loss from step 5 on was NaN and the
    worker exited 0 at num_steps. The daemon's guard reads the loss and stops the job at once."""
    env = real_env
    tiny_job(env, "diverges", "num_steps = 100000\nlearning_rate_base = 1e12\nwarmup_learning_rate = 1e12", "",
             "enabled = false")
    job = env.wait_state("diverges", ("failed", "succeeded"), 600)
    assert job["state"] == "failed" and job["failure"]["kind"] == "nan", (job["reason"], env.daemon_log()[-4000:])
    assert job["failure"]["step"] == 5 and "loss became NaN at step 5" in job["reason"]
    assert job["restarts"] == 0 and job["step"] < 1000
    assert "==== oddaemon: stopping train: loss became NaN" in open(os.path.join(env.logs, "diverges", "train.log")).read()


def test_finish_then_a_fine_tune_from_the_export_of_the_job_it_waits_for(real_env):
    """Two capabilities with the real workers in one run (the TF stack's build is most of each).
    oddaemon finish: the trainer saves a checkpoint after the training iteration it is in (off the
    cadence of 1,000) and exits; both checkpoints are evaluated, the best exported, the job
    succeeded. Then "finetune", submitted at the start with after = ["pretrain"] and pretrain's
    exported/checkpoint/ckpt-0 (not there yet; type "detection", as for a Model Zoo checkpoint) as
    its fine_tune_checkpoint, has waited and trains from it."""
    env = real_env
    tiny_job(env, "pretrain", "num_steps = 100000", "", 'device = "cpu"\nexport_best = true', every=1000)
    data = os.path.join(env.root, "data", "demo")
    awaited = f"{env.models}/pretrain/exported/checkpoint/ckpt-0"
    env.drop("finetune.toml", f'''name = "finetune"
after = ["pretrain"]
pipeline_config = "{data}/pipeline.config"
model_dir = "{env.models}/finetune"
[pipeline]
num_classes = 3
batch_size = 4
num_steps = 4
fine_tune_checkpoint = "{awaited}"
fine_tune_checkpoint_type = "detection"
label_map_path = "{data}/label_map.pbtxt"
train_input_path = "{data}/train-*.tfrecord"
eval_input_path = "{data}/eval.tfrecord"
[train]
gpus = 0
[eval]
enabled = false
''')
    env.wait_state("pretrain", ("running", "failed"), 300)
    waiting = env.wait_state("finetune", ("waiting", "failed", "succeeded"), 300)
    assert waiting["state"] == "waiting" and not os.path.exists(awaited + ".index"), waiting
    wait_for(lambda: ((env.job("pretrain") or {}).get("step") or 0) >= 10, 600, 1.0, what="training under way")
    out = env.cli("finish", "pretrain")
    assert out.returncode == 0 and out.stdout.strip() == "pretrain: stopping", out.stdout + out.stderr
    final = env.wait_state("pretrain", ("succeeded", "failed", "cancelled"), 600)
    assert final["state"] == "succeeded", (final["reason"], env.daemon_log()[-4000:])
    assert final["reason"] == "finished by request; every checkpoint evaluated" and final["restarts"] == 0
    checkpoints = final["evaluation"]["checkpoints"]
    assert [(c["step"] == 0, c["state"], c["attempts"]) for c in checkpoints] == [
        (True, "evaluated", 1), (False, "evaluated", 1)], checkpoints
    saved = checkpoints[-1]["step"]
    assert 10 <= saved < 1000
    with open(os.path.join(env.logs, "pretrain", "train.log")) as f:
        log = f.read()
    assert re.search(rf"oddaemon-failure: requeued: saved a checkpoint at step {saved} \(ckpt-\d+\) on SIGUSR2 "
                     r"\(oddaemon finish\)", log), log[-3000:]
    info = json.load(open(os.path.join(env.models, "pretrain", "exported", "export.json")))
    assert info["checkpoint"] == final["evaluation"]["best"]["checkpoint"]
    # the fine-tune from that export
    tuned = env.wait_state("finetune", ("succeeded", "failed"), 900)
    assert tuned["state"] == "succeeded", (tuned["reason"], env.daemon_log()[-4000:])
    assert final["finished_at"] <= tuned["started_at"]
    assert [h["state"] for h in tuned["history"]][:3] == ["waiting", "queued", "running"]
    with open(os.path.join(env.logs, "finetune", "train.log")) as f:
        log = f.read()
    assert "load_fine_tune_checkpoint" not in log and "Traceback" not in log, log[-4000:]
    assert os.path.isfile(os.path.join(env.models, "finetune", "ckpt-1.index"))
