"""The path rules the daemon and the CLI share (``oddaemon.core.layout``), and the store that follows them."""

from __future__ import annotations

import json

from oddaemon.adapters.store import Store
from oddaemon.core import layout


def test_every_shared_path_under_state_dir_and_log_dir():
    assert layout.control_socket("/var/lib/od") == "/var/lib/od/control.sock"
    assert layout.saved_job("/var/lib/od", "effdet") == "/var/lib/od/jobs/effdet.json"
    assert layout.job_dir("/var/lib/od", "effdet") == "/var/lib/od/work/effdet"
    assert layout.worker_job("/var/lib/od", "effdet") == "/var/lib/od/work/effdet/job.json"
    assert layout.runtime_file("/var/lib/od", "effdet") == "/var/lib/od/runtime/effdet.json"
    assert layout.eval_book("/var/lib/od", "effdet") == "/var/lib/od/evals/effdet.json"
    assert layout.eval_results_dir("/var/lib/od", "effdet") == "/var/lib/od/evals/effdet"
    assert layout.preflight_dir("/var/lib/od") == "/var/lib/od/preflight"
    assert [layout.log_file("/var/log/od", "effdet", role) for role in ("train", "eval", "export", "preflight",
                                                                         "eval-serve")] == [
        "/var/log/od/effdet/train.log", "/var/log/od/effdet/eval.log", "/var/log/od/effdet/export.log",
        "/var/log/od/effdet/preflight.log", "/var/log/od/effdet/eval.log"]


def test_the_store_writes_where_the_layout_says(tmp_path):
    state = str(tmp_path / "state")
    store = Store(state)
    store.ensure_dirs()
    store.save_job("a", {"state": "queued"})
    handed = store.write_worker_job("a", {"spec": {}, "attempt": 1})
    store.save_runtime("a", {"train": {"pid": 1}})
    assert handed == layout.worker_job(state, "a") == f"{state}/work/a/job.json"
    assert store.job_dir("a") == f"{state}/work/a"
    with open(f"{state}/jobs/a.json") as f:
        assert json.load(f) == {"state": "queued"}
    with open(f"{state}/runtime/a.json") as f:
        assert json.load(f) == {"train": {"pid": 1}}
    assert [(path, record) for path, record, _ in store.load_jobs()] == [(f"{state}/jobs/a.json", {"state": "queued"})]
