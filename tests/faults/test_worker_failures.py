"""Fault matrix, the worker side: a hung worker, a NaN loss that never ends the process, failures a
restart cannot fix, out of GPU memory with oom_retry_halve_batch, and a GPU listed in the
configuration but gone. Real daemon, real stand-in workers, real fault injection. Each case
checks that the job ends with the reason a user can act on, in `oddaemon status`, the job record,
the metrics and the train log, and that the daemon keeps serving."""

from __future__ import annotations

import json
import os
import stat

from tests.support.harness import free_port, scrape, train_marker, wait_for, worker_pids


def train_keys(text: str, keys: str) -> str:
    return text.replace("[train]\n", f"[train]\n{keys}\n", 1)




def still_serving(env, name: str) -> None:
    """The daemon answers and runs a fresh job to the end."""
    env.drop(f"{name}.toml", env.job_text(name, num_steps=4, every=2, step_seconds=0.01))
    env.wait_state(name, "succeeded", 60)


def test_a_hung_worker_is_stopped_and_restarted_from_its_checkpoint(daemon_env):
    env = daemon_env.start()
    # The stand-in writes a step and a log line every 20 ms and then hangs at step 12 for good: a
    # timeout of 15 s is far beyond any pause a busy machine puts between two of its lines, so the
    # one hang it plays is the only one the daemon can find.
    text = env.job_text("hangs", num_steps=20, every=5, keep=10, step_seconds=0.02, hang_at_step=12, crash_times=1)
    env.drop("hangs.toml", train_keys(text, "hang_timeout_seconds = 15"))
    log_path = os.path.join(env.logs, "hangs", "train.log")

    def log_text() -> str:
        return open(log_path).read() if os.path.exists(log_path) else ""

    wait_for(lambda: "standin: hanging at step 12" in log_text(), 60, what="the stand-in to hang at step 12")
    wait_for(lambda: "==== oddaemon: stopping train: hung" in log_text(), 120,
             what="the daemon to stop the hung worker")
    job = env.wait_state("hangs", "succeeded", 120)
    assert job["restarts"] == 1 and job["attempt"] == 2
    backoff = [h for h in job["history"] if h["state"] == "backoff"]
    assert len(backoff) == 1 and "hung: no new step, checkpoint or log line for 15s" in backoff[0]["reason"]
    assert job["failure"]["kind"] == "hung"
    log = log_text()
    # in that order: the hang, the daemon's stop, the second attempt resuming from the last checkpoint
    hang, stop = log.index("standin: hanging at step 12"), log.index("==== oddaemon: stopping train: hung")
    assert hang < stop < log.index("==== oddaemon: starting train attempt 2") < log.index("resuming from step 10")
    assert log.count("==== oddaemon: stopping train") == 1
    # not a single checkpoint evaluation lost across the restart
    steps = sorted(c["step"] for c in job["evaluation"]["checkpoints"] if c["state"] == "evaluated")
    assert steps == [0, 5, 10, 15, 20], job["evaluation"]
    still_serving(env, "after-hang")


def test_a_nan_loss_stops_the_job_at_once_with_the_step(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}")
    env = daemon_env.start()
    # like the real TF OD API: the stand-in keeps training with NaN losses; only the daemon stops it
    # TF's cadence (the stand-in's default): the loss is recorded once per 50-step iteration and the
    # writer flushes every 10 events, so the first NaN the daemon can see is the one of step 50
    env.drop("diverges.toml", env.job_text("diverges", num_steps=5000, every=50, step_seconds=0.005,
                                           nan_loss_from_step=8))
    job = env.wait_state("diverges", "failed", 60)
    assert job["restarts"] == 0 and job["failure"]["kind"] == "nan" and job["failure"]["step"] == 50
    assert "loss became NaN at step 50 (Loss/total_loss)" in job["reason"]
    assert "not restarted: it would fail the same way" in job["reason"]
    assert job["step"] < 5000
    out = env.cli("status", "diverges")
    assert "failure    nan: loss became NaN at step 50" in out.stdout, out.stdout
    wait_for(lambda: 'oddaemon_job_failure{job_name="diverges",kind="nan"} 1.0' in scrape(port), 10,
             what="the failure in the metrics")
    still_serving(env, "after-nan")


def test_failures_a_restart_cannot_fix_fail_at_once_and_say_what_to_fix(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}", max_restarts=3)
    env = daemon_env.start()
    cases = {
        # TF's own words (tests/fixtures/tf/corrupt_record.txt), without the real worker's marker line:
        # what the daemon makes of TF alone (tests/faults/test_tf_failures.py replays the real worker)
        "corrupt": (open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tf",
                                      "corrupt_record.txt"), encoding="utf-8").read().strip(),
                    "input", "corrupt input record: the TFRecord file is damaged"),
        "noinput": ("tensorflow.python.framework.errors_impl.OutOfRangeError: End of sequence "
                    "[[{{node IteratorGetNext}}]]", "input", "no input records"),
        "badckpt": ("ValueError: Unresolved object in checkpoint (root).model._box_predictor: attributes {...}",
                    "checkpoint", "fine_tune_checkpoint_type"),
    }
    for name, (line, _, _) in cases.items():
        env.drop(f"{name}.toml", env.job_text(name, num_steps=10, step_seconds=0.01, crash_at_step=3,
                                              crash_text=json.dumps(line)[1:-1]))
    for name, (_, kind, advice) in cases.items():
        job = env.wait_state(name, "failed", 60)
        assert job["restarts"] == 0 and job["failure"]["kind"] == kind, job
        assert advice in job["reason"] and "not restarted" in job["reason"]
        wait_for(lambda name=name, kind=kind: f'oddaemon_job_failure{{job_name="{name}",kind="{kind}"}} 1.0'
                 in scrape(port), 10,
                 what=f"the failure of {name} in the metrics")
    # the reason is kept in the job record on disk too
    record = json.load(open(os.path.join(env.state, "jobs", "corrupt.json")))
    assert record["failure"]["kind"] == "input"
    still_serving(env, "after-fatal")


def test_out_of_gpu_memory_halves_the_batch_and_scales_the_learning_rate(daemon_env):
    env = daemon_env.start()
    text = env.job_text("big", num_steps=10, every=5, step_seconds=0.01, batch_size=16, oom_above_batch=4)
    text = text.replace("[pipeline]\n", "[pipeline]\nlearning_rate_base = 0.08\nwarmup_learning_rate = 0.002\n", 1)
    env.drop("big.toml", train_keys(text, "oom_retry_halve_batch = true\nmax_restarts = 0"))
    job = env.wait_state("big", "succeeded", 60)
    assert job["adjustments"] == [
        "out of GPU memory: batch_size 16 -> 8, learning_rate_base 0.08 -> 0.04, warmup_learning_rate 0.002 -> 0.001",
        "out of GPU memory: batch_size 8 -> 4, learning_rate_base 0.04 -> 0.02, warmup_learning_rate 0.001 -> 0.0005",
    ]
    assert job["restarts"] == 2 and job["attempt"] == 3
    oom = [h["reason"] for h in job["history"] if h["state"] == "backoff"]
    assert "out of GPU memory at batch_size 16" in oom[0] and "restarting with batch_size 16 -> 8" in oom[0]
    # the last run trained with what the daemon chose
    spec = json.load(open(os.path.join(env.state, "work", "big", "job.json")))["spec"]
    assert spec["pipeline"]["batch_size"] == 4 and abs(spec["pipeline"]["learning_rate_base"] - 0.02) < 1e-12
    # ... and at the floor it is an ordinary failure with the reason
    text = env.job_text("huge", num_steps=10, step_seconds=0.01, batch_size=8, oom_above_batch=2)
    env.drop("huge.toml", train_keys(text, "oom_retry_halve_batch = true\nmin_batch_size = 4\nmax_restarts = 0"))
    job = env.wait_state("huge", "failed", 60)
    assert job["adjustments"] == ["out of GPU memory: batch_size 8 -> 4, learning rate unchanged "
                                  "(no learning_rate_base found)"]
    assert "batch_size 4 is already at the floor ([train] min_batch_size = 4)" in job["reason"]


def fake_nvidia_smi(directory: str, ids: list[int]) -> None:
    path = os.path.join(directory, "nvidia-smi")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in ids))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_a_gpu_listed_in_the_configuration_but_gone(daemon_env, tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake_nvidia_smi(str(bin_dir), [0, 1, 2])
    daemon_env.write_config(gpus=[0, 1, 2])
    env = daemon_env.start()
    env.drop("on2.toml", env.job_text("on2", num_steps=100000, step_seconds=0.05, gpus=[2]))
    env.wait_state("on2", "running", 30)
    env.stop()
    fake_nvidia_smi(str(bin_dir), [0, 1])  # GPU 2 fell off the bus while the daemon was down
    env.start()
    job = env.wait_state("on2", "failed", 30)
    assert "can no longer run here: it asks for GPU id(s) 2 ([train] gpus), which this machine does not have (GPUs: 0, 1)" \
        in job["reason"]
    assert "GPU(s) 2 are gone" in env.daemon_log()
    env.drop("wants2.toml", env.job_text("wants2", gpus=[2]))
    wait_for(lambda: "wants2.toml.error" in env.rejected(), 30, what="wants2 rejected")
    error = open(os.path.join(env.spool, "rejected", "wants2.toml.error")).read()
    assert "GPU id(s) 2 ([train] gpus), which this machine does not have" in error
    # a job on a GPU that is still there runs on it: its trainer sees GPU 1 and only GPU 1
    env.drop("on1.toml", env.job_text("on1", num_steps=100000, step_seconds=0.05, gpus=[1]))
    job = env.wait_state("on1", "running", 60)
    assert job["gpus"] == [1], job
    pid = wait_for(lambda: worker_pids(train_marker(env, "on1")), 60, what="the train worker of on1")[0]
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(entry.decode().split("=", 1) for entry in f.read().split(b"\0") if entry)
    assert environ["CUDA_VISIBLE_DEVICES"] == "1", environ
    listed = env.ask("list")
    assert sorted(listed["gpus"]) == [0, 1] and listed["free_gpus"] == [0], listed
    assert env.ask("cancel", name="on1")["ok"]
    env.wait_state("on1", "cancelled", 60)
    wait_for(lambda: not worker_pids(train_marker(env, "on1")), 60, what="the train worker of on1 to exit")
    wait_for(lambda: env.ask("list")["free_gpus"] == [0, 1], 60, what="GPU 1 to be free again")
