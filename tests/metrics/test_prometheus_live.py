"""A real daemon (stand-in worker) scraped by a real Prometheus every second; every query of the
shipped Grafana dashboard must answer through Prometheus's HTTP API, with the stand-in's known numbers.

One scenario for the whole module (about 20 s): with ``[gpus] devices = [0]``
  alpha   GPU 0, 60 steps, evaluations slower than training: queued -> running -> evaluating -> succeeded
  delta   CPU, after crashy: checkpoints faster than its evaluator, its pins capped at 1 byte (released)
  beta    GPU 0, queued behind alpha, then runs for the rest of the module (holds GPU 0)
  gamma   GPU 0, queued behind beta until the end
  crashy  CPU, crashes at step 3 every time: one restart (max_restarts = 1), then failed
  epsilon CPU, waits for beta (after) until the end
  bad     a job file the spool rejects
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from oddaemon.testing.standin_core import effective_pipeline, eval_metrics, train_scalars
from tests.support.harness import DaemonEnv, wait_for
from tests.support.prom import PROMETHEUS, PROMTOOL, Prometheus, dashboard_expressions, free_port, http_get

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus; "
                                                  "/usr/bin/prometheus not found)"),
]

MAP = "DetectionBoxes_Precision/mAP"
AR100 = "DetectionBoxes_Recall/AR@100"
ALPHA_STEPS, ALPHA_STEP_SECONDS = 60, 0.05


class Scenario:
    def __init__(self, env: DaemonEnv, prom: Prometheus, metrics_url: str, started: float):
        self.env, self.prom, self.metrics_url, self.started = env, prom, metrics_url, started
        self.at: float = 0.0  # every query is evaluated at this instant (the data before it is final)
        self.jobs: dict[str, dict] = {}

    def value(self, expr: str) -> float:
        return self.prom.value(expr, self.at)

    def values(self, expr: str, label: str) -> dict[str, float]:
        return self.prom.values(expr, label, self.at)


def evaluated_steps(job: dict) -> list[int]:
    return [c["step"] for c in job["evaluation"]["checkpoints"] if c["state"] == "evaluated"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("live"))
    port = free_port()
    env = DaemonEnv(os.path.join(root, "daemon"), config_overrides={
        "gpus": [0], "metrics_listen": f"127.0.0.1:{port}", "max_restarts": 1})
    prom = Prometheus(os.path.join(root, "prometheus"), [f"127.0.0.1:{port}"], interval="1s")
    try:
        env.start()
        prom.start()
        wait_for(prom.targets_up, 30, 0.2, what="Prometheus to scrape the daemon")
        s = Scenario(env, prom, f"http://127.0.0.1:{port}/metrics", time.time())
        env.drop("alpha.toml", env.job_text("alpha", num_steps=ALPHA_STEPS, every=20, keep=5, priority=10,
                                            step_seconds=ALPHA_STEP_SECONDS, eval_seconds=2.0))
        env.wait_state("alpha", "running", 30)
        env.drop("beta.toml", env.job_text("beta", num_steps=100_000, every=20, keep=3, priority=5,
                                           step_seconds=0.05, eval_seconds=0.2))
        env.drop("gamma.toml", env.job_text("gamma", num_steps=10, priority=0))
        # waits for beta (after) for the whole module: the dependency panel's series
        env.drop("epsilon.toml", env.job_text("epsilon", num_steps=10, gpus=0, extra='after = ["beta"]'))
        env.drop("crashy.toml", env.job_text("crashy", num_steps=50, gpus=0, crash_at_step=3))
        env.drop("bad.toml", 'name = "bad"\npipeline_config = "relative/p.config"\n')
        # on the CPU after crashy: a checkpoint every step, TF keeps one, the evaluator is slower and
        # the pins may hold 1 byte alone: checkpoints are released unevaluated
        env.drop("delta.toml", env.job_text("delta", num_steps=30, every=1, keep=1, gpus=0, step_seconds=0.05,
                                            eval_seconds=0.5, eval_extra="max_pinned_bytes = 1\n"))
        s.jobs["alpha"] = env.wait_state("alpha", "succeeded", 90)
        s.jobs["crashy"] = env.wait_state("crashy", "failed", 60)
        s.jobs["delta"] = env.wait_state("delta", "succeeded", 90)
        assert s.jobs["delta"]["evaluation"]["pins"]["released"] > 0
        wait_for(lambda: len(evaluated_steps(env.job("beta"))) >= 2, 60, 0.2, what="two evaluations of beta")
        assert env.job("gamma")["state"] == "queued"
        assert env.job("epsilon")["state"] == "waiting"
        # until Prometheus has scraped the final state of the finished jobs, then a few scrapes more
        # so that rate windows ($__rate_interval = 5 s) hold several samples
        wait_for(lambda: prom.query('oddaemon_job_state{job_name="alpha", state="succeeded"}')
                 and prom.query('oddaemon_job_state{job_name="crashy", state="failed"}')
                 and prom.query('oddaemon_job_eval_lag_seconds{job_name="beta"}')
                 and prom.query('oddaemon_spool_rejected_files_total == 1')
                 and prom.query('oddaemon_job_checkpoints_released{job_name="delta"} > 0'),
                 30, 0.2, what="Prometheus to see the final states")
        time.sleep(3)
        s.at = time.time()
        s.jobs["beta"] = env.job("beta")
        s.jobs["gamma"] = env.job("gamma")
        yield s
    finally:
        try:
            env.close()
        finally:
            prom.stop()


def test_the_jobs_went_through_their_lives(scenario):
    history = [h["state"] for h in scenario.jobs["alpha"]["history"]]
    assert history[0] == "queued" and history[-3:] == ["running", "evaluating", "succeeded"]
    assert [h["state"] for h in scenario.jobs["beta"]["history"]][:2] == ["queued", "running"]
    assert scenario.jobs["crashy"]["restarts"] == 1
    assert scenario.env.rejected() == ["bad.toml", "bad.toml.error"]
    # ... and Prometheus saw each stage (states last seconds here, scrapes are 1 s apart)
    seen = {(job, state) for job, state in (("alpha", "running"), ("alpha", "evaluating"), ("alpha", "succeeded"),
                                            ("beta", "queued"), ("beta", "running"), ("gamma", "queued"),
                                            ("crashy", "failed"))
            if scenario.prom.query(f'max_over_time(oddaemon_job_state{{job_name="{job}", state="{state}"}}[10m]) == 1',
                                   scenario.at)}
    assert len(seen) == 7, seen


EXPRESSIONS = dashboard_expressions()


# Per-job resources come from the workers' cgroups (README "Per-job cgroups"): none without a cgroup
# backend; IO, pressure and the daemon's own leaf with cgroup v2 only; memory_max only where one is set
RESOURCES = re.compile(r"oddaemon_(job_(cpu_seconds|memory|io)\w*|daemon_\w+)")
# Sweeps, notifications and Slurm jobs have their series tested with a real daemon where they happen
# (tests/integration/test_sweeps.py, test_notifications.py, tests/slurm/test_slurm_backend.py); this
# scenario has no sweep, no notification target and the local backend, so their panels have no series here
NOT_IN_SCENARIO = re.compile(r"oddaemon_(sweep_\w+|notifications_total|job_slurm_info)")


@pytest.mark.parametrize("where,expr", EXPRESSIONS, ids=[where for where, _ in EXPRESSIONS])
def test_every_dashboard_query_returns_data(scenario, where, expr):
    result = scenario.prom.query(expr, scenario.at)
    if not result and NOT_IN_SCENARIO.search(expr):
        pytest.skip(f"{where}: {expr}: the scenario has no sweep, no notification target, no Slurm")
    if not result and RESOURCES.search(expr):
        backend = [r["metric"]["backend"] for r in scenario.prom.query("oddaemon_cgroups == 1", scenario.at)]
        pytest.skip(f"{where}: {expr}: no series with the cgroup backend here ({', '.join(backend) or '?'}) and "
                    "the scenario's limits")
    assert result, f"{where}: {expr} returned nothing"


def test_the_job_variable_lists_every_exported_job(scenario):
    names = scenario.prom.api("label/job_name/values", **{"match[]": "oddaemon_job_state"})
    assert {"alpha", "beta", "gamma", "crashy", "delta"} <= set(names)


def test_daemon_wide_values(scenario):
    s = scenario
    assert s.values("oddaemon_jobs", "state") == {"waiting": 1, "queued": 1, "running": 1, "backoff": 0,
                                                  "stopping": 0, "evaluating": 0, "succeeded": 2, "failed": 1,
                                                  "cancelled": 0}
    assert s.value("oddaemon_queue_length") == 1
    assert s.value("oddaemon_gpus") == 1 and s.value("oddaemon_gpus_allocated") == 1
    assert s.values("oddaemon_gpu_allocated", "job_name") == {"beta": 1}
    assert s.value('oddaemon_gpu_allocated{gpu="0", job_name="beta", role="train"}') == 1
    assert s.value("oddaemon_spool_rejected_files_total") == 1
    assert s.value("oddaemon_worker_restarts_total") == 1
    assert s.values("oddaemon_job_restarts_total", "job_name") == {"alpha": 0, "beta": 0, "gamma": 0, "crashy": 1,
                                                                 "delta": 0, "epsilon": 0}
    assert s.values("oddaemon_job_gpus", "job_name") == {"alpha": 0, "beta": 1, "gamma": 0, "crashy": 0,
                                                           "delta": 0, "epsilon": 0}
    evaluated = s.value("oddaemon_checkpoints_evaluated_total")
    assert evaluated >= len(evaluated_steps(s.jobs["alpha"])) + 2
    assert s.started - 60 < s.value("oddaemon_start_time_seconds") < s.started
    assert s.value("up") == 1


def test_alpha_values_are_the_standins_numbers(scenario):
    s = scenario
    job = 'job_name="alpha"'
    pipeline = effective_pipeline(open(os.path.join(s.env.data, "alpha.config")).read(), {"num_steps": ALPHA_STEPS})
    scalars = train_scalars(ALPHA_STEPS, pipeline, ALPHA_STEP_SECONDS)
    assert s.value(f"oddaemon_job_train_step{{{job}}}") == ALPHA_STEPS
    assert s.value(f"oddaemon_job_target_steps{{{job}}}") == ALPHA_STEPS
    assert s.value(f"oddaemon_job_progress_ratio{{{job}}}") == 1.0
    # a finished job has no speed and no ETA any more; while it ran, it had both
    assert s.prom.query(f"oddaemon_job_eta_seconds{{{job}}}", s.at) == []
    assert s.prom.query(f"oddaemon_job_steps_per_second{{{job}}}", s.at) == []
    assert s.value(f"min_over_time(oddaemon_job_eta_seconds{{{job}}}[5m])") >= 0
    losses = s.values(f"oddaemon_job_loss{{{job}}}", "component")
    assert losses == {tag.split("/", 1)[1]: v for tag, v in scalars.items() if tag.startswith("Loss/")}
    assert len(losses) == 4
    assert s.value(f"oddaemon_job_learning_rate{{{job}}}") == scalars["learning_rate"]
    assert 0 < s.value(f"max_over_time(oddaemon_job_steps_per_second{{{job}}}[5m])") <= 1 / ALPHA_STEP_SECONDS * 1.01
    # evaluation: checkpoints at steps 0, 20, 40, 60; mAP grows with the step, so the last is the best
    assert evaluated_steps(s.jobs["alpha"]) == [0, 20, 40, 60]
    assert s.values(f"oddaemon_job_checkpoints{{{job}}}", "state")["evaluated"] == 4
    best_step = s.value(f"oddaemon_job_best_metric_step{{{job}}}")
    assert best_step == ALPHA_STEPS == s.jobs["alpha"]["evaluation"]["best"]["step"]
    assert s.values(f"oddaemon_job_best_metric_value{{{job}}}", "metric") == {MAP: eval_metrics(ALPHA_STEPS)[MAP]}
    assert s.value(f"oddaemon_job_last_evaluated_step{{{job}}}") == ALPHA_STEPS
    assert s.value(f"oddaemon_job_latest_checkpoint_step{{{job}}}") == ALPHA_STEPS
    assert s.values(f"oddaemon_job_eval_metric{{{job}}}", "metric") == eval_metrics(ALPHA_STEPS)
    assert s.value(f"oddaemon_job_checkpoints_pending_evaluation{{{job}}}") == 0
    assert 1.9 < s.value(f"oddaemon_job_eval_duration_seconds{{{job}}}") < 30  # eval_seconds = 2
    assert 0 <= s.value(f"oddaemon_job_eval_lag_seconds{{{job}}}") < 30
    completed = s.value(f"oddaemon_job_latest_checkpoint_timestamp_seconds{{{job}}}")
    assert s.started < completed < s.at


def test_running_job_values(scenario):
    s = scenario
    job = 'job_name="beta"'
    step = s.value(f"oddaemon_job_train_step{{{job}}}")
    assert 0 < step <= s.jobs["beta"]["step"]
    assert s.value(f"oddaemon_job_progress_ratio{{{job}}}") == step / 100_000
    assert s.value(f"oddaemon_job_eta_seconds{{{job}}}") > 0
    age = s.value(f"time() - oddaemon_job_latest_checkpoint_timestamp_seconds{{{job}}}")
    assert 0 <= age < 30
    best_step = s.value(f"oddaemon_job_best_metric_step{{{job}}}")
    assert s.values(f"oddaemon_job_best_metric_value{{{job}}}", "metric") == {MAP: eval_metrics(int(best_step))[MAP]}
    # a queued job exports its state, restarts and GPUs, and nothing about training yet
    assert s.values('oddaemon_job_state{job_name="gamma"}', "state") == {"queued": 1}
    assert not s.prom.query('oddaemon_job_train_step{job_name="gamma"}', s.at)


def test_map_and_ar_over_training_step_pair_up(scenario):
    """What the "by training step" table joins: at every instant, the metric of the latest evaluation
    belongs to the step exported beside it."""
    s = scenario
    step_expr = "max by (job_name) (oddaemon_job_last_evaluated_step)"
    pairs: dict[str, set[tuple[int, float, float]]] = {}
    for name in ("alpha", "beta"):
        def series(expr: str) -> dict[float, float]:
            result = s.prom.query_range(expr, s.started, s.at, 0.5)
            return {float(t): float(v) for t, v in result[0]["values"]} if result else {}

        steps = series(f'max by (job_name) (oddaemon_job_last_evaluated_step{{job_name="{name}"}})')
        maps = series(f'oddaemon_job_eval_metric{{job_name="{name}", metric="{MAP}"}}')
        ars = series(f'oddaemon_job_eval_metric{{job_name="{name}", metric="{AR100}"}}')
        pairs[name] = {(int(steps[t]), maps[t], ars[t]) for t in steps if t in maps and t in ars}
        for step, mean_ap, ar in pairs[name]:
            assert (mean_ap, ar) == (eval_metrics(step)[MAP], eval_metrics(step)[AR100]), (name, step)
    assert {p[0] for p in pairs["alpha"]} <= {0, 20, 40, 60} and (60, eval_metrics(60)[MAP],
                                                                  eval_metrics(60)[AR100]) in pairs["alpha"]
    assert len({p[0] for p in pairs["alpha"]}) >= 2  # the table has more than one row per job
    assert s.prom.query(step_expr, s.at)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_live_exposition(scenario):
    for accept in ({}, {"Accept": "application/openmetrics-text; version=1.0.0"}):
        text = http_get(scenario.metrics_url, headers=accept)
        assert b"oddaemon_job_eval_metric{" in text
        if accept:
            assert text.rstrip().endswith(b"# EOF")
            continue  # promtool check metrics reads the Prometheus text format only
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert out.returncode == 0, (out.stdout + out.stderr).decode()
