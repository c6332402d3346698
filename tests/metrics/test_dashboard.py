"""The shipped Grafana dashboard, provisioning files and Prometheus scrape example, checked without a
running Prometheus (fast tier). The live test (test_prometheus_live.py) runs every query for real."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from oddaemon.adapters.metrics import SnapshotCollector, build_snapshot
from tests.support.prom import PROMTOOL, REPO, all_panels, dashboard_expressions, dashboard_targets, load_dashboard

DS = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "table"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def exported_names() -> set[str]:
    """Sample names the collector can export (families are yielded even when they have no samples)."""
    snap = build_snapshot([], {"total": [], "free": [], "holders": {}},
                          {"rejected_files": 0, "worker_restarts": 0, "checkpoints_evaluated": 0},
                          started_at=0.0, now=1.0, max_finished=20, max_age=86400.0)
    suffix = {"gauge": "", "counter": "_total", "info": "_info"}
    return {f.name + suffix[f.type] for f in SnapshotCollector(lambda: snap).collect()}


def test_grafana_10_json_with_the_two_variables(dashboard):
    assert dashboard["schemaVersion"] in (38, 39)
    assert dashboard["uid"] == "oddaemon-jobs" and dashboard["title"]
    assert dashboard.get("__inputs") == []  # provisioning needs no import-time inputs
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    job = variables["job_name"]
    assert job["type"] == "query" and job["datasource"] == DS
    assert job["definition"] == "label_values(oddaemon_job_state, job_name)"
    assert job["query"]["query"] == "label_values(oddaemon_job_state, job_name)"
    assert job["multi"] is True and job["includeAll"] is True and job["allValue"] == ".*"


def test_every_panel_and_target_uses_the_datasource_variable(dashboard):
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])
            assert "datasource" not in target["expr"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    # no hard-coded datasource anywhere: every uid in the file is the variable
    uids = re.findall(r'"uid":\s*"([^"]*)"', json.dumps(dashboard["panels"]))
    assert uids and set(uids) == {"${datasource}"}


def test_layout_ids_and_units(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels if p["type"] != "row"}
    assert units["Progress"] == "percentunit" and units["ETA"] == "s" and units["Learning rate"] == "sci"
    assert units["Checkpoint age (jobs training)"] == "s" and units["Evaluation lag and duration"] == "s"
    assert units["mAP and AR@100 (latest evaluation)"] == "percentunit"
    thresholds = {p["title"]: [s.get("value") for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
                  for p in panels if p["type"] != "row"}
    assert thresholds["Checkpoint age (jobs training)"] == [None, 1800, 3600]
    assert thresholds["Rejected job files"] == [None, 1]


def test_every_exported_metric_is_on_the_dashboard_and_every_name_there_exists(dashboard):
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(dashboard))
    used = set(re.findall(r"\boddaemon_\w+", exprs))
    names = exported_names()
    assert names - used == set(), "metrics not shown on the dashboard"
    assert used - names == set(), "dashboard names that the daemon does not export"
    # the must-haves
    for needle in ('metric=~"DetectionBoxes_Precision/mAP|DetectionBoxes_Recall/AR@100"',
                   "time() - oddaemon_job_latest_checkpoint_timestamp_seconds",
                   "oddaemon_job_last_evaluated_step", "oddaemon_job_best_metric_value",
                   "oddaemon_job_eval_lag_seconds", "oddaemon_gpu_allocated", "oddaemon_job_steps_per_second",
                   "oddaemon_job_eta_seconds", "oddaemon_job_progress_ratio", "oddaemon_job_loss",
                   "oddaemon_job_learning_rate", "oddaemon_job_restarts_total", "oddaemon_spool_rejected_files_total"):
        assert needle in exprs, needle
    per_job = [t["expr"] for _, t in dashboard_targets(dashboard) if "oddaemon_job_" in t["expr"]]
    assert all('job_name=~"$job_name"' in e for e in per_job), "a per-job query ignores the Job variable"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
def test_every_dashboard_query_parses_as_promql(tmp_path):
    """promtool parses each expression as a recording rule: a syntax error fails here, in the fast tier."""
    exprs = dashboard_expressions()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
def test_scrape_config_example_is_valid_and_targets_the_default_port():
    path = os.path.join(REPO, "etc", "prometheus", "oddaemon-scrape.yml")
    out = subprocess.run([PROMTOOL, "check", "config", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_example_scrapes_the_documented_default_address():
    """The README's default (127.0.0.1:9781, [metrics] listen left out) is what the example scrapes,
    read as Prometheus reads the file, not as text."""
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(REPO, "etc", "prometheus", "oddaemon-scrape.yml")) as f:
        config = yaml.safe_load(f)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["oddaemon"]
    assert job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http"
    assert [target for static in job["static_configs"] for target in static["targets"]] == ["127.0.0.1:9781"]


def test_grafana_provisioning_files():
    yaml = pytest.importorskip("yaml")
    base = os.path.join(REPO, "etc", "grafana", "provisioning")
    with open(os.path.join(base, "dashboards", "oddaemon.yaml")) as f:
        dashboards = yaml.safe_load(f)
    assert dashboards["apiVersion"] == 1
    provider = dashboards["providers"][0]
    assert provider["type"] == "file" and os.path.isabs(provider["options"]["path"])
    with open(os.path.join(base, "datasources", "prometheus.yaml")) as f:
        datasources = yaml.safe_load(f)
    assert datasources["apiVersion"] == 1
    ds = datasources["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http") and ds["jsonData"]["timeInterval"]
