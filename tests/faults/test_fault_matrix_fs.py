"""The fault matrix, part 2: filesystem faults under a real daemon (see test_fault_matrix.py for the
assertions every case makes). Each mount is undone and each process stopped in teardown, also when
a case fails."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest
from test_fault_matrix import (
    BAD_JOB,
    assert_every_checkpoint_evaluated,
    assert_jobs_listed,
    assert_no_file_lost,
    assert_still_serving,
    book,
    evaluated_steps,
)

from oddaemon.formats.tfevents import FILE_PREFIX
from oddaemon.formats.tfevents_writer import encode_scalar_event
from oddaemon.formats.tfrecord import encode_record
from oddaemon.testing.standin_eval import DATA_SHARD, EvalFailure, restore_step
from tests.support.harness import mount, train_marker, wait_for, worker_pids

MAX_QUEUED_EVENTS = "/proc/sys/fs/inotify/max_queued_events"


@contextlib.contextmanager
def _paused(pid: int):
    """SIGSTOP a process for the length of a ``with`` block (SIGCONT also when the block fails)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        _cont(pid)


def _cont(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _trainer(env, name: str) -> int:
    return wait_for(lambda: worker_pids(train_marker(env, name)), 30, what=f"the trainer of {name}")[0]


def _step(env, name: str) -> int:
    return (env.job(name) or {}).get("step") or 0


# ---------------------------------------------------------------------------------- the log dir


def test_log_directory_full_job_runs_on_errors_reported_and_writing_resumes(daemon_env, mounts):
    env = daemon_env
    os.makedirs(env.logs)
    mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", env.logs)
    mounts.append(env.logs)
    env.start()
    filler = os.path.join(env.logs, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # fill the log filesystem to the last byte
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    env.drop("chatty.toml", env.job_text("chatty", num_steps=150, every=50, keep=5, step_seconds=0.02,
                                         log_lines_per_step=20))
    wait_for(lambda: "No space left on device; the worker keeps running" in env.daemon_log(), 60,
             what="the daemon to report that it cannot write the job's log")
    wait_for(lambda: _step(env, "chatty") >= 20, 60, what="training to go on with a full log disk")
    assert env.answers() and env.job("chatty")["state"] == "running"
    os.unlink(filler)  # space again: writing resumes, and the log says where output is missing
    wait_for(lambda: "is written again after" in env.daemon_log(), 60, what="the log to be written again")
    job = env.wait_state("chatty", "succeeded", 90)
    assert job["step"] == 150 and job["restarts"] == 0
    assert_every_checkpoint_evaluated(job, [0, 50, 100, 150])
    log = open(os.path.join(env.logs, "chatty", "train.log"), errors="replace").read()
    assert "byte(s) of output lost here" in log and "No space left on device" in log
    # lines after the gap are all there
    assert "standin: training finished at step 150" in log.split("byte(s) of output lost here")[-1]
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "log-full")


# ------------------------------------------------------------------------------------- the spool


def test_inotify_queue_overflow_every_file_still_settled(daemon_env):
    env = daemon_env
    with open(MAX_QUEUED_EVENTS) as f:
        old = f.read().strip()
    try:  # read when an inotify instance is created: only the daemon's gets the small queue
        with open(MAX_QUEUED_EVENTS, "w") as f:
            f.write("64")
        env.start()
    finally:
        with open(MAX_QUEUED_EVENTS, "w") as f:
            f.write(old)
    pipeline = env.pipeline("flood", num_steps=2, step_seconds=0.01)
    valid = [f"f{i}" for i in range(0, 2000, 100)]
    with _paused(env.proc.pid):  # the daemon reads nothing while 2000 events pile up
        for i in range(2000):
            if i % 100 == 0:
                text = f'name = "f{i}"\npipeline_config = "{pipeline}"\nmodel_dir = "{env.models}/f{i}"\n'
            elif i % 2:
                text = f'pipeline_config = "{pipeline}"\nmodel_dir = "{env.models}/f{i}"\n[train]\ncheckpoint_every_n = -1\n'
            else:
                text = BAD_JOB.decode()
            env.drop(f"f{i}.toml", text)
    assert_no_file_lost(env, len(valid), 2000 - len(valid), timeout=180)
    assert "inotify queue overflowed" in open(env.stderr_path, errors="replace").read()
    assert_jobs_listed(env, valid)
    assert len(env.ask("list")["jobs"]) == len(valid)
    assert_still_serving(env, "overflow", timeout=120)


# --------------------------------------------------------------------------------- the model_dir


def test_model_dir_deleted_under_a_running_job(daemon_env):
    env = daemon_env.start()
    env.drop("deleted.toml", env.job_text("deleted", num_steps=120, every=10, keep=20, step_seconds=0.03))
    model_dir = os.path.join(env.models, "deleted")
    wait_for(lambda: _step(env, "deleted") >= 40, 60, what="training past step 40")
    with _paused(_trainer(env, "deleted")):
        for _ in range(10):  # (the daemon may be pinning a checkpoint right now: try again)
            try:
                shutil.rmtree(model_dir)
                break
            except OSError:
                time.sleep(0.05)
    job = env.wait_state("deleted", "succeeded", 90)
    checkpoints = book(job)
    # every checkpoint is accounted for: evaluated, or recorded as deleted before its evaluation
    assert all(c["state"] == "evaluated" or (c["state"] == "missed" and "deleted" in c["error"])
               for c in checkpoints.values()), checkpoints
    after = range(50, 121, 10)  # written into the re-created model_dir
    assert set(after) <= set(evaluated_steps(job)), evaluated_steps(job)
    assert sorted(checkpoints) == list(range(1, 14))  # ckpt-1 .. ckpt-13: none unknown
    assert job["step"] == 120 and job["progress"] == 1.0  # not the stale step of the deleted event file
    assert f"model_dir {model_dir} was deleted" in env.daemon_log()
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "deleted")


def test_model_dir_read_only_under_a_running_job_fails_readably_then_resumes(daemon_env, mounts):
    daemon_env.write_config(max_restarts=2)
    env = daemon_env.start()
    env.drop("ro.toml", env.job_text("ro", num_steps=60, every=5, keep=20, step_seconds=0.03))
    model_dir = os.path.join(env.models, "ro")
    wait_for(lambda: _step(env, "ro") >= 20, 60, what="training past step 20")
    with _paused(_trainer(env, "ro")):
        wait_for(lambda: evaluated_steps(env.job("ro")) and len(evaluated_steps(env.job("ro"))) == len(
            [n for n in os.listdir(model_dir) if n.endswith(".index")]), 30, what="evaluation to catch up")
        mount("--bind", model_dir, model_dir)
        mounts.append(model_dir)
        mount("-o", "remount,bind,ro", model_dir)
    job = env.wait_state("ro", "failed", 60)
    assert job["restarts"] == 2 and "gave up after 3 consecutive failure(s)" in job["reason"], job["reason"]
    log = open(os.path.join(env.logs, "ro", "train.log")).read()
    assert log.count("Read-only file system") >= 3
    out = env.cli("status", "ro")
    assert out.returncode == 0 and "failed" in out.stdout
    assert env.answers()
    subprocess.run(["umount", model_dir], check=True)
    mounts.remove(model_dir)
    assert env.cli("retry", "ro").returncode == 0
    job = env.wait_state("ro", "succeeded", 90)
    assert job["step"] == 60 and "resuming from step" in open(os.path.join(env.logs, "ro", "train.log")).read()
    assert_every_checkpoint_evaluated(job, list(range(0, 61, 5)))
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "read-only")


# ---------------------------------------------------------------------------------- checkpoints


def real_words_for_a_damaged_index(prefix: str) -> str:
    """What the real evaluator said of a checkpoint whose index was overwritten (a TF fixture)."""
    fixtures = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tf")
    with open(os.path.join(fixtures, "eval_corrupt_checkpoint.log"), encoding="utf-8") as f:
        line = next(line for line in f if "is unreadable or corrupt" in line)
    said = line.split("oddaemon.workers eval: ", 1)[1].strip()
    return said.replace("@ROOT@/models/good/ckpt-3", prefix)


def test_standin_evaluator_reads_damaged_checkpoints_like_tf(tmp_path):
    prefix = str(tmp_path / "ckpt-3")
    with open(prefix + ".index", "w") as f:
        json.dump({"step": 10, "standin": True}, f)
    with open(prefix + DATA_SHARD, "w") as f:
        f.write("standin checkpoint data for step 10\n")
    assert restore_step(prefix) == 10
    with open(prefix + DATA_SHARD, "wb") as f:
        f.write(b"\x00\xffgarbage\x17" * 50)
    with pytest.raises(EvalFailure, match="DataLossError: Checksum does not match"):
        restore_step(prefix)
    with open(prefix + ".index", "wb") as f:
        f.write(b"\x89garbage\x00" * 10)
    with pytest.raises(EvalFailure) as failure:
        restore_step(prefix)
    assert str(failure.value) == real_words_for_a_damaged_index(prefix)


def test_corrupt_checkpoint_fails_its_evaluation_with_the_reason_and_the_rest_go_on(daemon_env):
    env = daemon_env.start()
    env.drop("corrupt.toml", env.job_text("corrupt", num_steps=40, every=5, keep=20, step_seconds=0.02,
                                          eval_seconds=0.3))
    model_dir = os.path.join(env.models, "corrupt")
    evaluator = wait_for(lambda: worker_pids(f"eval-serve --job {env.state}/work/corrupt/job.json"), 30,
                         0.01, what="the evaluator")[0]
    with _paused(evaluator):  # it stays on ckpt-1 or ckpt-2 while training writes the rest
        wait_for(lambda: os.path.exists(os.path.join(model_dir, "ckpt-9.index")), 60, what="the last checkpoint")
        for name in ("ckpt-4.index", f"ckpt-4{DATA_SHARD}"):
            with open(os.path.join(model_dir, name), "r+b") as f:  # in place: its pinned hard link too
                f.truncate(0)
                f.write(b"\x89\x00garbage\xff" * 20)
        assert book(env.job("corrupt"))[4]["state"] == "pending"
    job = env.wait_state("corrupt", "succeeded", 90)
    checkpoints = book(job)
    failed = checkpoints.pop(4)
    assert failed["state"] == "failed" and failed["attempts"] == 1  # damaged: not retried
    assert failed["error"].startswith("the checkpoint is damaged, not retried: ")
    pinned = failed["error"].split("checkpoint ", 2)[2].split(" is unreadable")[0]  # the pinned copy's prefix
    assert failed["error"].endswith(real_words_for_a_damaged_index(pinned)), failed["error"]
    assert all(c["state"] == "evaluated" for c in checkpoints.values()) and len(checkpoints) == 8
    assert job["evaluation"]["best"]["step"] == 40
    assert "block checksum mismatch" in open(os.path.join(env.logs, "corrupt", "eval.log")).read()
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "corrupt")


# ---------------------------------------------------------------------------------- event files


def _records(path: str) -> list[tuple[int, int]]:
    """(offset, length) of each whole record of an event file."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos + 12 <= len(data):
        size = 12 + struct.unpack_from("<Q", data, pos)[0] + 4
        if pos + size > len(data):
            break
        out.append((pos, size))
        pos += size
    return out


def _event_file(env, name: str) -> str:
    """The trainer's newest event file."""
    train = os.path.join(env.models, name, "train")
    files = wait_for(lambda: [os.path.join(train, n) for n in os.listdir(train) if n.startswith(FILE_PREFIX)], 30,
                     what="an event file")
    return max(files, key=os.path.getmtime)


def test_event_file_truncated_mid_record_progress_goes_on(daemon_env):
    env = daemon_env.start()
    # a writer that writes every step's scalars at once (the reader is under test here, not TF's cadence)
    env.drop("torn.toml", env.job_text("torn", num_steps=150, every=50, keep=5, step_seconds=0.03,
                                       summary_every_n=1, summary_max_queue=1))
    wait_for(lambda: _step(env, "torn") >= 30, 60, what="training past step 30")
    trainer, daemon = _trainer(env, "torn"), env.proc.pid
    path = _event_file(env, "torn")
    try:
        os.kill(daemon, signal.SIGSTOP)
        time.sleep(0.3)  # records the daemon has not read yet ...
        os.kill(trainer, signal.SIGSTOP)
        offset, _ = _records(path)[-1]
        os.truncate(path, offset + 6)  # ... and the last one cut inside its header
        _cont(daemon)
        seen = env.job("torn")["step"]
        assert seen >= 30 and env.cli("status", "torn").returncode == 0
    finally:
        _cont(daemon, trainer)  # the trainer writes on at its own offset: a hole of zeros, then whole records
    wait_for(lambda: _step(env, "torn") >= seen + 30, 60, what="progress after the torn record")
    wait_for(lambda: "corrupt record in event file" in env.daemon_log(), 10, what="the corrupt record reported")
    # a writer that dies in the middle of a record: half a record at the end of its file, then a new file
    wait_for(lambda: _step(env, "torn") >= 100, 60, what="training past step 100")
    trainer = _trainer(env, "torn")
    os.kill(trainer, signal.SIGSTOP)
    path = _event_file(env, "torn")
    half = encode_record(encode_scalar_event(999, {"Loss/total_loss": 0.5}))
    with open(path, "ab") as f:
        f.write(half[:len(half) // 2])
    os.kill(trainer, signal.SIGKILL)
    job = env.wait_state("torn", "succeeded", 90)
    assert job["step"] == 150 and job["restarts"] == 1 and job["losses"]["total_loss"] > 0
    assert "internal error" not in env.daemon_log() and env.answers()
    assert_every_checkpoint_evaluated(job, [0, 50, 100, 150])
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "torn")


# --------------------------------------------------------------------------------- the pins' disk budget


def test_pins_stay_within_the_free_space_floor_and_training_never_fails(daemon_env):
    """A 64 MiB tmpfs as the model_dirs' file system, 4 MiB checkpoints every 0.1 s, an evaluator
    ten times slower and evaluate_all: unbounded, the pins alone would fill the disk and training
    would fail with No space left on device. With a 24 MiB floor the oldest waiting checkpoints
    are released instead, each recorded skipped with the reason."""
    env = daemon_env
    fast = os.path.join(env.root, "fast")
    os.makedirs(fast)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", fast], check=True)
    floor, size = 24 * 1024 * 1024, 4 * 1024 * 1024
    lowest = [1 << 62]
    try:
        env.write_config(pins_min_free_bytes=floor)
        env.start()
        text = env.job_text("big", num_steps=60, every=2, keep=2, step_seconds=0.05, eval_seconds=1.0,
                            checkpoint_bytes=size).replace(f'model_dir = "{env.models}/big"',
                                                           f'model_dir = "{fast}/big"')
        env.drop("big.toml", text)

        def done():
            st = os.statvfs(fast)
            lowest[0] = min(lowest[0], st.f_bavail * st.f_frsize)
            job = env.job("big")
            return job if job and job["state"] in ("succeeded", "failed") else None

        job = wait_for(done, 180, 0.02, what="the job to end")
        assert job["state"] == "succeeded" and job["restarts"] == 0, (job["reason"], env.daemon_log()[-3000:])
        checkpoints = job["evaluation"]["checkpoints"]
        assert len(checkpoints) == 31 and checkpoints[-1]["state"] == "evaluated" and checkpoints[-1]["step"] == 60
        released = [c for c in checkpoints if c["state"] == "skipped"]
        assert released and all("released unevaluated to keep" in c["error"] and "[pins] min_free_bytes" in c["error"]
                                for c in released), released
        assert {c["state"] for c in checkpoints} == {"evaluated", "skipped"}
        log = env.daemon_log()
        assert sum(line.count("ckpt-") for line in log.splitlines() if "released ckpt-" in line) == len(released)
        # below the floor only by what the trainer wrote before the daemon could react (one
        # checkpoint, plus the one TF still keeps), never by what the pins hold
        assert lowest[0] >= floor - 2 * size, (lowest[0], floor)
        assert env.ask("status", name="big")["job"]["evaluation"]["pins"]["released"] == len(released)
    finally:
        env.close()
        subprocess.run(["umount", "-l", fast], check=False)
