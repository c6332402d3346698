"""The series counts that README "Cardinality" states, counted on a real daemon's exposition with
stand-in workers: daemon-wide, a queued job, a waiting job, a job trained and evaluated with the
COCO detection metrics (the stand-in evaluator reports the 16 that the TF evaluator does), while it
trains and once it has finished."""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import free_port, scrape, wait_for


def series(port: int) -> tuple[Counter, Counter, Counter]:
    """Series per job_name (None: daemon-wide) without the per-worker usage ones (label ``role``),
    those per job, and the daemon-wide ones by metric name."""
    jobs, usage, daemon = Counter(), Counter(), Counter()
    for family in text_string_to_metric_families(scrape(port)):
        for sample in family.samples:
            job = sample.labels.get("job_name")
            if job is None:
                daemon[sample.name] += 1
            if "role" in sample.labels and job is not None:
                usage[job] += 1
            else:
                jobs[job] += 1
    return jobs, usage, daemon


def test_the_series_counts_of_readme_cardinality(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}", max_cpu_jobs=1)
    env = daemon_env.start()
    env.drop("done.toml", env.job_text("done", num_steps=20, every=5, step_seconds=0.01))
    env.wait_state("done", "succeeded", 60)
    env.drop("long.toml", env.job_text("long", num_steps=10**6, every=500, step_seconds=0.002))
    env.wait_state("long", "running", 30)
    env.drop("q.toml", env.job_text("q", num_steps=10))
    env.wait_state("q", "queued", 30)
    env.drop("w.toml", env.job_text("w", num_steps=10, extra='after = ["q"]'))
    env.wait_state("w", "waiting", 30)
    counted: list[tuple[Counter, Counter, Counter]] = []

    def settled() -> bool:  # the running job has logged its losses, speed and learning rate, and is evaluated
        counted[:] = [series(port)]
        return counted[0][0]["long"] >= 43 and all(counted[0][0][name] for name in ("done", "q", "w"))

    try:
        wait_for(settled, 120, 0.5, what="the running job's series")
    except AssertionError:
        raise AssertionError(f"series per job: {dict(counted[0][0])}") from None
    jobs, usage, daemon = counted[0]
    # daemon-wide, on a host without GPUs and without notification targets: 18 (oddaemon_jobs by 9 states)
    assert sum(daemon.values()) == 18 and daemon["oddaemon_jobs"] == 9 and daemon["oddaemon_cgroups"] == 1, daemon
    assert jobs[None] == 18
    # a job that trains and is evaluated: 43 (state, restarts, GPUs, 6 training gauges, 4 losses,
    # 6 checkpoint states, 6 evaluation gauges, 16 evaluation metrics, best value and step);
    # once finished, 41 (no speed and no ETA)
    assert jobs["long"] == 43 and jobs["done"] == 41, dict(jobs)
    assert jobs["q"] == 4 and jobs["w"] == 5, dict(jobs)  # queued (with target steps); waiting: one more
    assert usage["done"] == usage["q"] == usage["w"] == 0 and usage["long"] <= 7 * 3, dict(usage)
