"""The fault matrix, part 1: processes and the daemon's own state.

Each case injects one fault into a real daemon (``python -m oddaemon serve``) running stand-in
workers, then asserts the same four things: no job is lost (every submitted job is listed and ends
as it should), every checkpoint written is evaluated (or recorded as failed/missed with a reason),
no submitted file is lost (each ends in spool/accepted or spool/rejected) and the daemon still
answers and runs a new job. Part 2 (``test_fault_matrix_fs.py``) has the filesystem faults; the
worker hang and a vanished GPU are covered elsewhere.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import tempfile
import time

import pytest

from oddaemon.adapters import store as store_module
from oddaemon.adapters.store import TEMP_PREFIX, Store
from oddaemon.formats.tfevents import EventDirReader
from oddaemon.testing.standin_core import checkpoint_step, read_checkpoint_state
from tests.support.harness import assert_evaluated_in_order, train_marker, wait_for, worker_pids

MAP = "DetectionBoxes_Precision/mAP"
BAD_JOB = b'name = "broken"\nmodel_dir = \n'  # a TOML syntax error: always rejected

# ------------------------------------------------------------------------------ shared assertions
# (test_fault_matrix_fs.py imports these)


def job_toml(env, name: str, num_steps: int = 20, every: int = 5, keep: int = 10, train_extra: str = "",
             eval_extra: str = "", priority: int = 0, **directives) -> str:
    """Like ``DaemonEnv.job_text``, with extra ``[train]`` keys (e.g. a job's own max_restarts)."""
    pipeline = env.pipeline(name, num_steps=num_steps, **directives)
    return (f'name = "{name}"\npipeline_config = "{pipeline}"\nmodel_dir = "{env.models}/{name}"\n'
            f"priority = {priority}\n[pipeline]\nnum_steps = {num_steps}\n"
            f"[train]\ncheckpoint_every_n = {every}\ncheckpoint_max_to_keep = {keep}\n{train_extra}\n"
            f"[eval]\n{eval_extra}\n")


def book(job: dict | None) -> dict[int, dict]:
    """The job's checkpoint evaluations by save number."""
    return {c["n"]: c for c in job["evaluation"]["checkpoints"]} if job else {}


def evaluated_steps(job: dict | None) -> list[int]:
    """The steps of the evaluated checkpoints in checkpoint order (ckpt-1, ckpt-2, ...), not sorted by
    step: a checkpoint whose step is out of its place shows."""
    return [c["step"] for n, c in sorted(book(job).items()) if c["state"] == "evaluated"]


def eval_event_steps(env, name: str) -> list[int]:
    """The steps of the mAP events under model_dir/eval in the order the evaluator wrote them (their
    wall time), not sorted: order is part of what is checked."""
    events = [e for e in EventDirReader(os.path.join(env.models, name, "eval")).read_new() if MAP in e.values]
    return [e.step for e in sorted(events, key=lambda e: e.wall_time)]


def assert_every_checkpoint_evaluated(job: dict, steps: list[int]) -> None:
    """Every checkpoint the trainer saved (``steps``) has exactly one successful evaluation."""
    assert evaluated_steps(job) == steps, book(job)
    assert all(c["state"] == "evaluated" for c in book(job).values()), book(job)


def spool_counts(env) -> tuple[int, int, int]:
    """(waiting in new/ or cur/, accepted, rejected) job files."""
    waiting = sum(len([n for n in os.listdir(os.path.join(env.spool, d)) if n.endswith(".toml")])
                  for d in ("new", "cur") if os.path.isdir(os.path.join(env.spool, d)))
    return waiting, len(env.accepted()), len([r for r in env.rejected() if r.endswith(".toml")])


def assert_no_file_lost(env, accepted: int, rejected: int, timeout: float = 60) -> None:
    """Every submitted file is settled: in accepted/ or in rejected/ (with its .error)."""
    wait_for(lambda: spool_counts(env) == (0, accepted, rejected), timeout, 0.2,
             what=f"{accepted} accepted and {rejected} rejected files (now {spool_counts(env)})")
    assert all(f"{r}.error" in env.rejected() for r in env.rejected() if r.endswith(".toml"))


def assert_jobs_listed(env, names) -> dict[str, dict]:
    jobs = {j["name"]: j for j in env.ask("list")["jobs"]}
    assert set(names) <= set(jobs), f"lost jobs: {set(names) - set(jobs)}"
    return jobs


def assert_still_serving(env, tag: str, timeout: float = 90) -> None:
    """The daemon answers and takes, runs and evaluates a new job."""
    assert env.answers()
    name = f"after-{tag}"
    env.drop(f"{name}.toml", env.job_text(name, num_steps=4, every=2, step_seconds=0.01, priority=100))
    job = env.wait_state(name, "succeeded", timeout)
    assert_every_checkpoint_evaluated(job, [0, 2, 4])


def saved_records(env) -> dict[str, dict]:
    """Every job record on disk, read without changing anything (the daemon may be writing)."""
    jobs_dir = os.path.join(env.state, "jobs")
    records = {}
    for entry in sorted(os.listdir(jobs_dir)):
        if entry.endswith(".json") and not entry.startswith("."):
            with open(os.path.join(jobs_dir, entry), "rb") as f:
                records[entry[:-5]] = json.loads(f.read())  # raises on a torn record
    return records


def temp_files(env) -> list[str]:
    return [os.path.join(d, n) for d in (os.path.join(env.state, "jobs"), os.path.join(env.state, "runtime"))
            if os.path.isdir(d) for n in os.listdir(d) if n.startswith(TEMP_PREFIX)]


# ---------------------------------------------------------------------------------- worker faults


def test_worker_sigkill_resumes_from_the_last_checkpoint_and_loses_nothing(daemon_env):
    env = daemon_env.start()
    env.drop("victim.toml", env.job_text("victim", num_steps=90, every=5, keep=3, step_seconds=0.04))
    marker = train_marker(env, "victim")
    for n, at in enumerate((15, 40, 65), start=1):
        wait_for(lambda at=at, n=n: (env.job("victim") or {}).get("attempt") == n and (env.job("victim")["step"] or 0) >= at
                 and worker_pids(marker), 60, 0.02, what=f"attempt {n} past step {at}")
        for pid in worker_pids(marker):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda n=n: (env.job("victim") or {}).get("attempt") == n + 1, 30, what="the restart")
    job = env.wait_state("victim", "succeeded", 90)
    assert job["restarts"] == 3 and job["attempt"] == 4 and job["step"] == 90
    backoffs = [h["reason"] for h in job["history"] if h["state"] == "backoff"]
    assert len(backoffs) == 3 and all("SIGKILL" in r for r in backoffs), backoffs
    log = open(os.path.join(env.logs, "victim", "train.log")).read()
    resumed = [int(s) for s in re.findall(r"resuming from step (\d+)", log)]
    assert len(resumed) == 3 and all(s % 5 == 0 and s >= at - 5 for s, at in zip(resumed, (15, 40, 65))), resumed
    steps = list(range(0, 91, 5))
    assert_every_checkpoint_evaluated(job, steps)
    assert eval_event_steps(env, "victim") == steps  # each evaluated once, in checkpoint order
    assert assert_evaluated_in_order(env, "victim") == list(range(1, len(steps) + 1))
    assert [checkpoint_step(p) for p in read_checkpoint_state(os.path.join(env.models, "victim"))] == [80, 85, 90]
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "worker-kill")
    assert_jobs_listed(env, ["victim", "after-worker-kill"])


def test_evaluator_crash_and_sigkill_every_checkpoint_still_evaluated(daemon_env):
    env = daemon_env.start()
    env.drop("evcrash.toml", env.job_text("evcrash", num_steps=30, every=5, keep=10, step_seconds=0.02,
                                          eval_seconds=0.4, eval_crash=10, eval_crash_times=1))
    evaluator = f"eval-serve --job {env.state}/work/evcrash/job.json"
    results = os.path.join(env.state, "evals", "evcrash")

    def frozen_inside_an_evaluation() -> tuple[int, int] | None:
        """(pid, n) once the evaluator is stopped (SIGSTOP) in the middle of evaluating ckpt-n, a
        checkpoint after the crashed ckpt-3. Stopped, it changes nothing: if the daemon still has
        ckpt-n running and its result file is not there, the evaluator has not finished it, and the
        SIGKILL that follows lands inside that evaluation however slow the machine. Otherwise it is
        let go (SIGCONT) and the next look is taken."""
        running = [n for n, c in book(env.job("evcrash")).items() if c["state"] == "running" and n >= 4]
        pids = worker_pids(evaluator)
        if not running or len(pids) != 1:
            return None
        pid = pids[0]
        try:
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: process_state(pid) in ("T", None), 60, 0.01, what=f"evaluator {pid} to stop")
        except ProcessLookupError:
            return None
        still = [n for n, c in book(env.job("evcrash")).items() if c["state"] == "running"]
        if still == running and process_state(pid) == "T" and not os.path.exists(
                os.path.join(results, f"ckpt-{running[0]}.json")):
            return pid, running[0]
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        return None

    # the planned crash at step 10 comes first (retried 5 s later); then a SIGKILL during a later evaluation
    pid, killed = wait_for(frozen_inside_an_evaluation, 120, 0.02,
                           what="the evaluator inside an evaluation after the crash")
    os.kill(pid, signal.SIGKILL)
    job = env.wait_state("evcrash", "succeeded", 120)
    assert_every_checkpoint_evaluated(job, [0, 5, 10, 15, 20, 25, 30])
    checkpoints = book(job)
    assert checkpoints[3]["attempts"] == 2 and checkpoints[killed]["attempts"] == 2
    assert sum(c["attempts"] for c in checkpoints.values()) == 7 + 2
    log = open(os.path.join(env.logs, "evcrash", "eval.log")).read()
    assert "eval_crash at step 10" in log and log.count("warm evaluator for 'evcrash' ready") == 3
    assert job["restarts"] == 0 and job["step"] == 30  # training never noticed
    # neither the crash nor the kill put an evaluation out of checkpoint order
    assert assert_evaluated_in_order(env, "evcrash") == list(range(1, 8))
    assert_no_file_lost(env, 1, 0)
    assert_still_serving(env, "eval-crash")


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


# ------------------------------------------------------------------------- the daemon's own state


def _record(name: str, seq: int) -> dict:
    """A job-record-like dict whose size varies from a few bytes to ~60 KB with ``seq``."""
    return {"name": name, "seq": seq, "state": ("queued", "running", "backoff", "evaluating")[seq % 4],
            "history": [[seq, "running", "x" * 40]] * (seq * 7919 % 1500)}


# Where a writer is held for its SIGKILL, in the order atomic_write passes them, and whether that
# write's temporary file is left behind: created (empty), written (the data flushed, not synced),
# synced (not renamed yet), renamed (in place; the directory not synced yet).
HOLDS = (("created", True), ("written", True), ("synced", True), ("renamed", False))


def _hold_a_write(phase: str, passing: int, tell: int) -> None:
    """In the writer child only: let ``passing`` writes go through ``phase``; at the next one, say so
    (a byte on the ``tell`` pipe) and wait there, inside that write, to be killed."""
    calls = itertools.count()

    def hold() -> None:
        if next(calls) == passing:
            os.write(tell, b"!")
            while True:
                time.sleep(60)

    if phase == "created":
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            created = real_mkstemp(*args, **kwargs)
            hold()
            return created
        tempfile.mkstemp = mkstemp
    elif phase == "written":
        real_fchmod = os.fchmod
        os.fchmod = lambda fd, mode: (hold(), real_fchmod(fd, mode))[1]
    elif phase == "synced":
        real_rename = os.rename
        os.rename = lambda src, dst: (hold(), real_rename(src, dst))[1]
    else:
        real_fsync_dir = store_module.fsync_dir
        store_module.fsync_dir = lambda directory: (hold(), real_fsync_dir(directory))[1]


def test_sigkill_during_state_writes_never_leaves_a_torn_record(tmp_path):
    """Hundreds of SIGKILLs of a process in the middle of Store.save_job / save_runtime (the daemon's
    only ways to write its state): every record on disk always loads and is one that was written.
    Half the kills are aimed: the writer is held at a known point inside a write (after the temp
    file's creation, after its data, after its fsync, after the rename) and killed there, so every
    point is hit whatever the machine's speed; the other half land wherever they land."""
    store = Store(str(tmp_path / "state"))
    store.ensure_dirs()
    names = ("alpha", "beta", "gamma")
    rng = random.Random(20240601)
    rounds = 400
    for round_ in range(rounds):
        aimed = HOLDS[(round_ // 2) % len(HOLDS)] if round_ % 2 == 0 else None
        passing = rng.randrange(0, 12)  # held in the 1st to 12th such write: any of the 6 records
        tell_r, tell_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                os.close(tell_r)
                if aimed:
                    _hold_a_write(aimed[0], passing, tell_w)
                seq = round_ * 1_000_000
                while True:
                    for name in names:
                        store.save_job(name, _record(name, seq))
                        store.save_runtime(name, {"train": {"pid": seq, "pad": "p" * (seq % 5000)}})
                    seq += 1
            finally:
                os._exit(0)
        os.close(tell_w)
        if aimed:
            told = os.read(tell_r, 1)  # the writer is inside a write, held at ``aimed``
            assert told == b"!", f"round {round_}: the writer ended before it reached {aimed[0]}"
        else:
            time.sleep(rng.choice((0.0, rng.uniform(0.0001, 0.001), rng.uniform(0.001, 0.006))))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(tell_r)
        left = [n for d in (store.jobs_dir, store.runtime_dir) for n in os.listdir(d) if n.startswith(TEMP_PREFIX)]
        if aimed:
            phase, leaves_a_temp = aimed
            assert len(left) == (1 if leaves_a_temp else 0), (round_, phase, left)
            # the held write is the ``passing``-th: (job record, runtime record) per name, per seq
            name, is_job, seq = names[passing // 2 % 3], passing % 2 == 0, round_ * 1_000_000 + passing // 6
            path = os.path.join(store.jobs_dir if is_job else store.runtime_dir, f"{name}.json")
            on_disk = None
            if os.path.exists(path):
                with open(path, "rb") as f:
                    record = json.loads(f.read())
                on_disk = record["seq"] if is_job else record["train"]["pid"]
            if not leaves_a_temp:
                assert on_disk == seq, (round_, phase, path, on_disk)  # renamed: the new record is in place
            elif passing >= 6:
                assert on_disk == seq - 1, (round_, phase, path, on_disk)  # not renamed: still the one before
            else:  # (the one before is an earlier round's, if any)
                assert on_disk is None or on_disk < round_ * 1_000_000, (round_, phase, path, on_disk)
        loaded = list(store.load_jobs())
        assert all(error == "" for _, _, error in loaded), [e for _, _, e in loaded if e]
        assert all(record == _record(record["name"], record["seq"]) for _, record, _ in loaded)
        for entry in os.listdir(store.runtime_dir):
            if not entry.startswith("."):
                with open(os.path.join(store.runtime_dir, entry), "rb") as f:
                    runtime = json.loads(f.read())
                assert runtime["train"]["pad"] == "p" * (runtime["train"]["pid"] % 5000)
        dict(store.load_runtime())
        leftovers = [n for d in (store.jobs_dir, store.runtime_dir) for n in os.listdir(d) if n.startswith(TEMP_PREFIX)]
        assert not leftovers, leftovers  # what a kill left behind is gone once the state is loaded


@pytest.mark.slow
def test_daemon_sigkilled_again_and_again_while_jobs_arrive_and_run(daemon_env):
    daemon_env.write_config(max_cpu_jobs=2)
    env = daemon_env
    rng = random.Random(4711)
    valid, logs = [], []
    for r in range(14):
        if r % 3 == 2:  # a file that arrives while the daemon is down
            env.drop(f"down{r}.toml", env.job_text(f"down{r}", num_steps=10, every=5, step_seconds=0.02))
            valid.append(f"down{r}")
        env.start()
        logs.append(env.stderr_path)
        env.drop(f"k{r}.toml", env.job_text(f"k{r}", num_steps=10, every=5, step_seconds=0.02))
        env.drop(f"bad{r}.toml", BAD_JOB)
        valid.append(f"k{r}")
        time.sleep(rng.uniform(0.0, 1.2))
        env.stop(signal.SIGKILL)
        records = saved_records(env)  # every record loads after every kill
        assert all(name == record["name"] for name, record in records.items())
    env.start()
    logs.append(env.stderr_path)
    for name in valid:
        job = env.wait_state(name, "succeeded", 120)
        assert_every_checkpoint_evaluated(job, [0, 5, 10])
    assert set(saved_records(env)) == set(valid)
    assert_jobs_listed(env, valid)
    # (a kill between saving a job's record and moving its file to accepted/ would leave the file to be
    # read again at the next start, and rejected as a duplicate: settled either way, never lost)
    wait_for(lambda: spool_counts(env)[0] == 0 and sum(spool_counts(env)) == len(valid) + 14, 60, 0.2,
             what=f"every file settled (now {spool_counts(env)})")
    assert spool_counts(env)[1] == len(valid), "a file was read twice (see the comment above)"
    wait_for(lambda: not temp_files(env), 10, what="no temporary file left in the state directory")
    for path in logs:
        text = open(path, errors="replace").read()
        assert "cannot read saved job record" not in text and "is not valid" not in text, text[-3000:]
    assert_still_serving(env, "kill-loop")


def _states(env) -> dict[str, str]:
    return {j["name"]: j["state"] for j in env.ask("list")["jobs"]}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_daemon_restart_with_jobs_in_every_state(daemon_env, sig):
    # three CPU slots; backoff long enough to restart inside it; a grace period to restart inside it
    daemon_env.write_config(max_cpu_jobs=3, backoff_base=60, backoff_cap=60, stop_grace=8)
    env = daemon_env.start()
    env.drop("done.toml", job_toml(env, "done", num_steps=4, every=2, step_seconds=0.01))
    env.wait_state("done", "succeeded", 60)
    env.drop("broken.toml", job_toml(env, "broken", num_steps=10, train_extra="max_restarts = 0", crash_at_step=2))
    env.wait_state("broken", "failed", 60)
    env.drop("evaluating.toml", job_toml(env, "evaluating", num_steps=20, every=2, step_seconds=0.01,
                                         eval_seconds=1.0))
    env.wait_state("evaluating", "evaluating", 60)
    env.drop("stopper.toml", job_toml(env, "stopper", num_steps=100_000, step_seconds=0.05, ignore_sigterm=1))
    env.drop("runner.toml", job_toml(env, "runner", num_steps=250, every=10, step_seconds=0.03))
    env.drop("crasher.toml", job_toml(env, "crasher", num_steps=20, step_seconds=0.02, crash_at_step=3, crash_times=1))
    env.wait_state("crasher", "backoff", 60)
    env.drop("waiter.toml", job_toml(env, "waiter", num_steps=10, step_seconds=0.02))
    env.drop("gone.toml", job_toml(env, "gone", num_steps=10))
    env.wait_state("gone", "queued", 30)
    assert env.ask("cancel", name="gone")["ok"]
    wait_for(lambda: (env.job("runner") or {}).get("step") and env.job("runner")["step"] >= 20, 60, what="runner steps")
    assert env.ask("cancel", name="stopper")["state"] == "stopping"
    before = _states(env)
    assert before == {"done": "succeeded", "broken": "failed", "evaluating": "evaluating", "stopper": "stopping",
                      "runner": "running", "crasher": "backoff", "waiter": "queued", "gone": "cancelled"}, before
    finished = {n: env.job(n) for n in ("done", "broken", "gone")}
    evaluated_before = len(evaluated_steps(env.job("evaluating")))

    env.stop(sig, timeout=30)
    wait_for(lambda: not worker_pids(os.path.join(env.state, "work")), 15, what="every worker gone with the daemon")
    records = saved_records(env)
    assert {n: r["state"] for n, r in records.items()} == before  # the state on disk is what it was
    env.start()

    for name, job in finished.items():  # finished jobs are left exactly as they were
        now = env.job(name)
        assert (now["state"], now["reason"], now["history"], now["finished_at"]) == (
            job["state"], job["reason"], job["history"], job["finished_at"])
    stopper = env.wait_state("stopper", "cancelled", 30)
    assert stopper["reason"] == "cancelled by request (daemon restarted)"
    runner = env.wait_state("runner", "succeeded", 120)
    assert runner["attempt"] == 2 and runner["step"] == 250
    assert "resuming from step" in open(os.path.join(env.logs, "runner", "train.log")).read()
    assert_every_checkpoint_evaluated(runner, list(range(0, 251, 10)))
    crasher = env.wait_state("crasher", "succeeded", 60)
    assert crasher["restarts"] == 1 and "resuming after daemon restart" in [h["reason"] for h in crasher["history"]]
    assert_every_checkpoint_evaluated(crasher, [0, 5, 10, 15, 20])
    waiter = env.wait_state("waiter", "succeeded", 60)
    assert_every_checkpoint_evaluated(waiter, [0, 5, 10])
    evaluating = env.wait_state("evaluating", "succeeded", 90)
    assert_every_checkpoint_evaluated(evaluating, list(range(0, 21, 2)))
    assert evaluated_before < 11 and evaluating["restarts"] == 0 and evaluating["attempt"] == 1  # not trained again
    assert_jobs_listed(env, before)
    assert_no_file_lost(env, 8, 0)
    assert not worker_pids(f"{env.state}/work/stopper/")
    assert_still_serving(env, "restart")


def test_spool_files_written_while_the_daemon_is_down_are_taken_at_start(daemon_env):
    env = daemon_env
    env.drop("cold.toml", env.job_text("cold", num_steps=6, every=3, step_seconds=0.01))
    env.drop("cold-bad.toml", BAD_JOB)
    env.start()
    job = env.wait_state("cold", "succeeded", 60)
    assert_every_checkpoint_evaluated(job, [0, 3, 6])
    assert_no_file_lost(env, 1, 1)
    env.stop(signal.SIGKILL)  # and after a crash of the daemon: files that came meanwhile
    env.drop("warm.toml", env.job_text("warm", num_steps=6, every=3, step_seconds=0.01))
    with open(os.path.join(env.spool, "new", "copied.toml"), "w") as f:  # cp-style, no rename
        f.write(env.job_text("copied", num_steps=6, every=3, step_seconds=0.01))
    env.drop("warm-bad.toml", BAD_JOB)
    env.start()
    for name in ("warm", "copied"):
        assert_every_checkpoint_evaluated(env.wait_state(name, "succeeded", 60), [0, 3, 6])
    assert_no_file_lost(env, 3, 2)
    assert_jobs_listed(env, ["cold", "warm", "copied"])
    assert_still_serving(env, "down")
