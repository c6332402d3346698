"""Sweeps with the real daemon and the stand-in worker: a [sweep] file becomes NAME-1 … NAME-N, each
in its own model_dir, sharing the CPU slots like any jobs; halving stops the bottom variant at its
rung; `oddaemon sweep NAME` shows the values, the best metric and its step, and the state (also
after a restart); the metrics name the best variant; a bad value or a taken variant name rejects
the whole file with the key or the name."""

from __future__ import annotations

import json
import math
import os

from tests.support.harness import free_port, scrape, wait_for

MAP = "DetectionBoxes_Precision/mAP"




def sweep_text(env, name: str, sweep: str, num_steps: int, **directives) -> str:
    return env.job_text(name, num_steps=num_steps, every=10, keep=3, **directives) + f"\n[sweep]\n{sweep}\n"


def standin_map(step: int, learning_rate: float, scale: float) -> float:
    """The stand-in's mAP at ``step`` with ``# standin: map_lr_scale`` (standin_core.eval_metrics)."""
    return 0.5 * (1 - math.exp(-step / 50)) * min(1.0, learning_rate * scale)


def test_a_grid_sweep_runs_its_variants_halving_stops_the_bottom_one_and_the_view_names_the_best(daemon_env):
    port = free_port()
    daemon_env.write_config(max_cpu_jobs=3, metrics_listen=f"127.0.0.1:{port}")
    env = daemon_env.start()
    # learning rates 0.01, 0.02, 0.04 score 0.1, 0.2, 0.4 of the stand-in's mAP; halving at step 20
    # keeps ceil(0.6 * reached): both of the first two to get there, the best 2 of all 3
    env.drop("lr.toml", sweep_text(env, "lr", "values = { learning_rate_base = [0.01, 0.02, 0.04] }\n"
                                   "halving_steps = [20]\nkeep_fraction = 0.6", num_steps=1000,
                                   step_seconds=0.02, eval_seconds=0.02, map_lr_scale=10))
    wait_for(lambda: all(env.job(f"lr-{i}") for i in (1, 2, 3)), 30, what="the three variants")
    assert not env.job("lr")  # the sweep is its variants, not a job of its own
    first = env.wait_state("lr-1", "succeeded", 120)
    assert first["reason"].startswith("sweep lr: halving at step 20: DetectionBoxes_Precision/mAP ")
    assert "not among the best 2 of the 3 variants that reached step 20 (kept: lr-2, lr-3)" in first["reason"]
    assert first["step"] < 1000  # stopped early
    done = [env.wait_state(f"lr-{i}", "succeeded", 120) for i in (2, 3)]
    assert [j["reason"] for j in done] == ["training finished; every checkpoint evaluated"] * 2
    for i in (1, 2, 3):
        model_dir = os.path.join(env.models, "lr", f"lr-{i}")
        assert env.job(f"lr-{i}")["model_dir"] == model_dir
        assert any(f.startswith("ckpt-") and f.endswith(".index") for f in os.listdir(model_dir))
    # the stand-in's numbers: each variant's best is its mAP at its best step, with its own learning rate
    for i, rate in ((2, 0.02), (3, 0.04)):
        best = env.job(f"lr-{i}")["evaluation"]["best"]
        assert math.isclose(best["value"], standin_map(best["step"], rate, 10), rel_tol=1e-5)
    assert "[sweep lr]" in env.cli("list").stdout

    shown = json.loads(env.cli("sweep", "lr", "--json").stdout)
    assert [r["name"] for r in shown["rows"]] == ["lr-1", "lr-2", "lr-3"]
    assert [r["values"] for r in shown["rows"]] == [{"learning_rate_base": v} for v in (0.01, 0.02, 0.04)]
    assert [r["state"] for r in shown["rows"]] == ["succeeded"] * 3
    assert [r["stopped_by_halving"] for r in shown["rows"]] == [True, False, False]
    best3 = env.job("lr-3")["evaluation"]["best"]
    assert shown["best"]["name"] == "lr-3" and shown["best"]["value"] == best3["value"]
    assert shown["best"]["step"] == best3["step"] and shown["state"] == "succeeded"
    table = env.cli("sweep", "lr")
    assert table.returncode == 0
    assert "best: lr-3 (learning_rate_base = 0.04)" in table.stdout and "0.02" in table.stdout
    line = (f'oddaemon_sweep_best_metric_value{{job_name="lr-3",metric="{MAP}",sweep="lr"}}')
    wait_for(lambda: line in scrape(port), 30, what="the sweep's best in the metrics")

    env.stop()
    env.start()  # the sweep is its variants' records: it is there after a restart
    again = json.loads(env.cli("sweep", "lr", "--json").stdout)
    assert again["best"]["name"] == "lr-3" and [r["name"] for r in again["rows"]] == ["lr-1", "lr-2", "lr-3"]
    listed = json.loads(env.cli("sweep", "--json").stdout)
    assert [(s["name"], s["variants"], s["best"]) for s in listed] == [("lr", 3, "lr-3")]
    missing = env.cli("sweep", "nosuch")
    assert missing.returncode != 0 and "no sweep named 'nosuch'" in missing.stderr


def test_a_bad_sweep_value_or_a_taken_variant_name_rejects_the_whole_file(daemon_env):
    env = daemon_env.start()
    env.drop("bad.toml", sweep_text(env, "bad", "values = { learning_rate_base = [0.01, -1] }", num_steps=10))
    wait_for(lambda: "bad.toml.error" in env.rejected(), 30, what="the .error file")
    error = open(os.path.join(env.spool, "rejected", "bad.toml.error")).read()
    assert "[sweep] values.learning_rate_base[1]: must be a finite number > 0, got -1" in error
    assert not env.job("bad-1")

    env.drop("col-2.toml", env.job_text("col-2", num_steps=10))
    env.wait_state("col-2", "succeeded", 60)
    env.drop("col.toml", sweep_text(env, "col", "values = { learning_rate_base = [0.01, 0.02, 0.03] }", num_steps=10))
    wait_for(lambda: "col.toml.error" in env.rejected(), 30, what="the sweep's .error file")
    error = open(os.path.join(env.spool, "rejected", "col.toml.error")).read()
    assert "sweep 'col' (3 variants, col-1 ... col-3): variant col-2: a job named 'col-2'" in error
    assert not env.job("col-1") and not env.job("col-3")  # admitted as one, or not at all
