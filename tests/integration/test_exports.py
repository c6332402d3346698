"""Exports of the best checkpoint with the real daemon and the stand-in worker, whose export reads
the checkpoint's files at the end of its model build as the real exporter does: a new best while an
export runs never makes an export fail, and ``exported/`` ends with the final best."""

from __future__ import annotations

import json
import os
import re

MAP = "DetectionBoxes_Precision/mAP"


def export_info(env, name: str) -> dict:
    with open(os.path.join(env.models, name, "exported", "export.json")) as f:
        return json.load(f)


def test_new_bests_during_a_slow_export_supersede_the_waiting_one_and_nothing_fails(daemon_env):
    env = daemon_env.start()
    # a checkpoint every 5 steps x 0.05 s = 0.25 s, each a new best (mAP rises with the step), and an
    # export that builds its model for 2 s: about eight new bests arrive during each export
    env.drop("race.toml", env.job_text("race", num_steps=60, every=5, keep=1, step_seconds=0.05,
                                       eval_seconds=0.02, export_seconds=2.0,
                                       eval_extra='export_best = true\nexport_when = "each_best"\n'))
    job = env.wait_state("race", "succeeded", 120)
    log = env.daemon_log()
    assert "failed" not in "\n".join(line for line in log.splitlines() if "export" in line), log
    superseded = re.findall(r"job race: export of ckpt-(\d+) superseded by ckpt-(\d+) before it started", log)
    assert len(superseded) >= 3, log
    assert all(int(old) < int(new) for old, new in superseded)
    started = [int(n) for n in re.findall(r"job race: exporting ckpt-(\d+)", log)]
    done = [int(n) for n in re.findall(r"job race: exported ckpt-(\d+)", log)]
    assert started == done and started == sorted(started) and len(started) >= 2
    best = job["evaluation"]["best"]
    assert best["step"] == 60 and done[-1] == best["n"]
    info = export_info(env, "race")
    assert info["checkpoint"] == best["checkpoint"] and info["step"] == 60 and info["metric"] == MAP
    assert info["value"] == best["value"]
    with open(os.path.join(env.models, "race", "exported", "saved_model.pb")) as f:
        assert json.load(f)["step"] == 60
    # the export's own log, and its pins released
    with open(os.path.join(env.logs, "race", "export.log")) as f:
        assert f.read().count("standin: exported step") == len(done)
    assert os.listdir(os.path.join(env.models, "race", ".oddaemon", "export")) == []


def test_export_when_end_exports_once_the_final_best_after_training(daemon_env):
    env = daemon_env.start()
    env.drop("once.toml", env.job_text("once", num_steps=30, every=5, keep=2, step_seconds=0.02,
                                       eval_extra="export_best = true\n"))
    job = env.wait_state("once", "succeeded", 60)
    log = env.daemon_log()
    assert re.findall(r"job once: exporting ckpt-(\d+)", log) == [str(job["evaluation"]["best"]["n"])]
    assert log.index("job once: running -> evaluating") < log.index("job once: exporting")
    assert log.index("job once: exported") < log.index("job once: evaluating -> succeeded")
    assert export_info(env, "once")["step"] == 30


def test_a_failing_export_is_reported_in_its_own_words_and_the_job_still_ends(daemon_env):
    env = daemon_env.start()
    # TF's text when a checkpoint cannot be found: for training it would mean the fine-tune checkpoint
    crash = ("tensorflow.python.framework.errors_impl.NotFoundError: Unsuccessful TensorSliceReader constructor: "
             "Failed to find any matching files for /somewhere/ckpt-3")
    env.drop("nofit.toml", env.job_text("nofit", num_steps=10, every=5, keep=2, step_seconds=0.02,
                                        export_crash_text=crash, eval_extra="export_best = true\n"))
    job = env.wait_state("nofit", "succeeded", 60)
    log = env.daemon_log()
    line = next(line for line in log.splitlines() if "export of ckpt-" in line and "failed" in line)
    assert "ERROR job nofit: export of ckpt-3 failed: the export failed (exit status 1): NotFoundError: " \
           "Unsuccessful TensorSliceReader constructor" in line, line
    assert "fine-tune" not in line and "fine_tune" not in line
    assert job["evaluation"]["best"]["n"] == 3 and not os.path.exists(os.path.join(env.models, "nofit", "exported"))
    with open(os.path.join(env.logs, "nofit", "export.log")) as f:
        assert crash in f.read()
    with open(os.path.join(env.logs, "nofit", "eval.log")) as f:
        assert "cannot export" not in f.read()  # the export's output is in export.log only
