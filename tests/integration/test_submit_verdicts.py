"""`oddaemon submit` says what the file became: a job waiting for its dependencies names them, and a
sweep file (whose variants are the jobs: no job carries the file's name) is reported as the sweep."""

from __future__ import annotations

import os


def write(env, filename: str, text: str) -> str:
    path = os.path.join(env.root, filename)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_submit_names_what_a_dependent_waits_for_and_reports_a_sweep_as_one(daemon_env):
    daemon_env.write_config(max_cpu_jobs=3)
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=400, every=100, step_seconds=0.05))
    env.wait_state("a", "running", 30)
    out = env.cli("submit", write(env, "b.toml", env.job_text("b", num_steps=2, every=1, extra='after = ["a"]')))
    assert out.returncode == 0, out.stderr
    assert "accepted as job b: waiting for a" in out.stdout, out.stdout
    sweep = env.job_text("s", num_steps=2, every=1) + "\n[sweep]\nvalues = { learning_rate_base = [0.01, 0.02] }\n"
    out = env.cli("submit", write(env, "s.toml", sweep))
    assert out.returncode == 0, out.stderr
    assert "accepted as sweep s: 2 jobs (s-1, s-2); see `oddaemon sweep s`" in out.stdout, out.stdout
    env.ask("cancel", name="a")
