"""Hostile input: no job file, however made, raises out of the parser, goes unexplained or is lost.

1. Properties over ``parse_job`` with generated files (oddaemon/testing/hostile.py): random bytes,
   documents built from the real key set, mutated valid jobs, deep nesting, huge arrays, long
   values. 10,000 files in the full tier, 300 in the fast tier.
2. The same files through the real ``SpoolIntake`` and ``Spool`` (and the real scheduler): each
   ends byte-identical in accepted/ or in rejected/ beside a non-empty ``.error``.
3. Crafted entries against one real daemon: links, a FIFO, a directory, oversize and malformed
   files, paths out of the allowed roots, clashing and resubmitted jobs.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oddaemon.adapters.spool import NotARegularFile, Spool
from oddaemon.core import scheduler as sch
from oddaemon.core.checks import Problem, render_error_file
from oddaemon.core.config import Config
from oddaemon.core.job_validation import parse_job
from oddaemon.core.jobspec import ALLOWED_KEYS, MAX_PROBLEMS, TABLES, JobSpec
from oddaemon.core.printable import printable
from oddaemon.service.intake import SpoolIntake
from oddaemon.testing import hostile
from tests.support.harness import wait_for

CI_MAX_ARRAY = 5_000  # huge arrays here have 500 to 5,000 entries; the daemon case and the bench go to 200,000
MAX_ERROR_BYTES = 256 * 1024  # MAX_PROBLEMS messages, each naming at most a PATH_MAX path

# (kind, seed); kind "literal" carries the file itself, "@R" standing for the allowed root.
cases = st.tuples(st.sampled_from(hostile.KINDS), st.integers(0, 2**64 - 1))
# Files that once broke the parser or the daemon: each is a regression example below.
HUGE_HEX_PRIORITY = b"priority = 0x" + b"f" * 5000  # repr() of the value raised ValueError
HUGE_HEX_STEPS = (b'pipeline_config = "@R/models/m/pipeline.config"\nmodel_dir = "@R/runs/x"\n'
                  b"[pipeline]\nnum_steps = 0x" + b"f" * 5000)  # accepted, then json.dumps raised in the daemon
DEEP_GLOB = b'[pipeline]\ntrain_input_path = "@R' + b"/*" * 2000 + b'"'  # glob.glob raised RecursionError
MANY_KEYS = b"".join(b"k%x = 1\n" % i for i in range(100_000))  # a 30 MB .error file, seconds of difflib


def file_of(case: tuple, tree: hostile.Tree) -> bytes:
    kind, seed = case
    if kind == "literal":
        return seed.replace(b"@R", tree.root.encode())
    return hostile.hostile_file(random.Random(seed), tree, kind, max_array=CI_MAX_ARRAY)


def check_parse(case: tuple, tree: hostile.Tree) -> None:
    data = file_of(case, tree)
    result = parse_job(data, "fuzz.toml", tree.context())  # an exception here fails the test
    if isinstance(result, JobSpec):
        saved = json.dumps(result.to_dict())  # the daemon saves every accepted spec as JSON
        assert JobSpec.from_dict(json.loads(saved)) == result
        return
    assert case[0] != "valid_job", f"the generator's valid job was rejected: {result}"
    assert isinstance(result, list) and 0 < len(result) <= MAX_PROBLEMS + 1, result
    for problem in result:
        assert isinstance(problem, Problem) and problem.message.strip() and problem.render().strip()
    text = render_error_file("fuzz.toml", result)
    assert printable(problem.render()) in text and len(text.encode()) < MAX_ERROR_BYTES


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return hostile.make_tree(str(tmp_path_factory.mktemp("hostile")))


PROPERTY = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.slow
@settings(max_examples=10_000, **PROPERTY)
@given(case=cases)
@example(case=("literal", HUGE_HEX_PRIORITY))
@example(case=("literal", HUGE_HEX_STEPS))
@example(case=("literal", DEEP_GLOB))
@example(case=("literal", MANY_KEYS))
def test_ten_thousand_hostile_files_each_parse_to_a_spec_or_explained_problems(case, tree):
    check_parse(case, tree)


@settings(max_examples=300, **PROPERTY)
@given(case=cases)
@example(case=("literal", HUGE_HEX_PRIORITY))
@example(case=("literal", HUGE_HEX_STEPS))
@example(case=("literal", DEEP_GLOB))
@example(case=("literal", MANY_KEYS))
def test_hostile_files_each_parse_to_a_spec_or_explained_problems(case, tree):
    check_parse(case, tree)


def test_the_generator_knows_a_valid_value_for_every_key(tree):
    """A key added to the job spec must be fuzzed too: give it a valid value in oddaemon/testing/hostile.py."""
    missing = [f"{section or 'top'}.{key}" for section, keys in ALLOWED_KEYS.items() for key in keys
               if key not in TABLES and hostile.valid_value(random.Random(0), tree, section, key) is None]
    assert not missing


# ---- 2. through the real spool intake ---------------------------------------------------------------------------

class SpoolRig:
    """The real Spool and SpoolIntake; dispatch runs the real scheduler and carries out Accepted and
    Rejected as ``Daemon._execute`` does (no workers: preflight is off, nothing is started)."""

    def __init__(self, base: str):
        self.tree = hostile.make_tree(base)
        self.spool = Spool(os.path.join(base, "spool"))
        self.spool.ensure_dirs()
        config = Config(path=None, spool_dir=self.spool.root, state_dir=os.path.join(base, "state"),
                        log_dir=os.path.join(base, "logs"), allowed_roots=(self.tree.root,), worker_preflight=False)
        self.state = sch.State(inventory=(), policy=sch.Policy())
        # The loop is only used by rescans, which this rig does not run.
        self.intake = SpoolIntake(config, self.spool, None, self.dispatch, self.active_names, preflights=None)

    def dispatch(self, event: sch.Event) -> list[sch.Action]:
        self.state, actions = sch.step(self.state, event, time.time())
        for action in actions:
            if isinstance(action, sch.Accepted) and action.token:
                self.spool.accept(action.token, action.name)
            elif isinstance(action, sch.Rejected) and action.token:
                self.intake.reject(action.token, [Problem(action.reason)], "the daemon cannot run it")
        return actions

    def active_names(self) -> set[str]:
        return {j.name for j in self.state.jobs.values() if j.state not in sch.TERMINAL}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    return SpoolRig(str(tmp_path_factory.mktemp("spool-rig")))


def listing(directory: str) -> set[str]:
    return set(os.listdir(directory))


@settings(max_examples=300, **PROPERTY)
@given(case=cases, name_seed=st.integers(0, 2**32))
@example(case=("literal", HUGE_HEX_STEPS), name_seed=0)
@example(case=("literal", MANY_KEYS), name_seed=0)
def test_every_spool_file_ends_accepted_or_rejected_byte_for_byte(case, name_seed, rig):
    data = file_of(case, rig.tree)
    path = os.path.join(rig.spool.new, hostile.filename(random.Random(name_seed)))
    with open(path, "wb") as f:
        f.write(data)
    accepted_before, rejected_before = listing(rig.spool.accepted), listing(rig.spool.rejected)
    verdict = rig.intake.intake(path)
    assert not os.listdir(rig.spool.new), "the file was left in new/"
    new_accepted = listing(rig.spool.accepted) - accepted_before
    new_rejected = listing(rig.spool.rejected) - rejected_before
    if verdict.accepted:
        assert len(new_accepted) == 1 and not new_rejected
        kept = os.path.join(rig.spool.accepted, new_accepted.pop())
    else:
        assert verdict.accepted is False and verdict.message.strip() and not new_accepted
        [kept] = [os.path.join(rig.spool.rejected, n) for n in new_rejected if not n.endswith(".error")]
        assert new_rejected == {os.path.basename(kept), os.path.basename(kept) + ".error"}
        with open(kept + ".error") as f:
            error = f.read()
        assert "was rejected because" in error and len(error) < MAX_ERROR_BYTES
        assert error.splitlines()[2].strip(" -"), "the .error names no problem"
    with open(kept, "rb") as f:
        assert f.read() == data, "the kept file differs from the one submitted"


def test_spool_read_refuses_a_hard_link(tmp_path):
    original = tmp_path / "secret.toml"
    original.write_bytes(b'name = "x"\n')
    os.link(original, tmp_path / "link.toml")
    with pytest.raises(NotARegularFile, match=r"it is a hard link \(2 links to one file\); submit a copy"):
        Spool.read(str(tmp_path / "link.toml"), 1 << 20)
    os.unlink(original)
    assert Spool.read(str(tmp_path / "link.toml"), 1 << 20) == b'name = "x"\n'  # one link left: a plain file


# ---- 3. crafted entries against one real daemon ----------------------------------------------------------------

@dataclass
class Crafted:
    filename: str
    expect: str  # a phrase of the .error that names the cause
    make: Callable[[str], None]  # creates the entry at the given path in spool/tmp/
    check_kept: Callable[[str], None] | None = None  # asserts the moved entry is what was made; None: same bytes


def write(data: bytes) -> Callable[[str], None]:
    def make(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
    make.data = data
    return make


def crafted_cases(env, outside_run: str) -> list[Crafted]:
    root, models, data = env.root, env.models, env.data
    pipeline = env.pipeline("hostile")

    def job(name: str, extra: str = "", **keys) -> bytes:
        fields = {"name": name, "pipeline_config": pipeline, "model_dir": f"{models}/{name}", **keys}
        return ("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()) + extra).encode()

    def inputs(pattern: str) -> str:
        return f"[pipeline]\ntrain_input_path = {json.dumps(pattern)}\n"

    os.symlink("/etc", os.path.join(data, "escape"))
    os.symlink("/tmp", os.path.join(models, "escape"))
    os.symlink("/etc/passwd", os.path.join(data, "leak.tfrecord"))
    linked, hard = os.path.join(data, "linked.toml"), os.path.join(data, "hard-original.toml")
    for path, name in ((linked, "linked"), (hard, "hardlinked")):
        with open(path, "wb") as f:
            f.write(job(name))

    def link_case(filename, target, expect):
        def check(kept: str) -> None:
            assert os.path.islink(kept) and os.readlink(kept) == target
        return Crafted(filename, expect, lambda p: os.symlink(target, p), check)

    def hard_check(kept: str) -> None:
        assert os.path.samefile(kept, hard) and os.stat(hard).st_nlink == 2
        with open(hard, "rb") as f:
            assert f.read() == job("hardlinked")

    def make_dir(path: str) -> None:
        os.mkdir(path)
        with open(os.path.join(path, "inside.txt"), "w") as f:
            f.write("kept\n")

    def dir_check(kept: str) -> None:
        with open(os.path.join(kept, "inside.txt")) as f:
            assert f.read() == "kept\n"

    def fifo_check(kept: str) -> None:
        assert stat.S_ISFIFO(os.lstat(kept).st_mode)

    valid = job("valid-but")
    deep = 5000
    return [
        link_case("symlink.toml", linked, "it is a symbolic link; submit the file itself"),
        link_case("symlink-dangling.toml", "/nonexistent/job.toml", "it is a symbolic link"),
        link_case("symlink-device.toml", "/dev/zero", "it is a symbolic link"),
        Crafted("hardlink.toml", "it is a hard link (2 links to one file); submit a copy",
                lambda p: os.link(hard, p), hard_check),
        Crafted("fifo.toml", "it is a FIFO; only regular files are read", os.mkfifo, fifo_check),
        Crafted("x.toml", "it is a directory; only regular files are read", make_dir, dir_check),
        Crafted("oversize.toml", "the file is 1048577 bytes, larger than the limit of 1048576 bytes",
                write(valid + b"#" * (1_048_577 - len(valid) - 1) + b"\n")),
        Crafted("latin1.toml", "is not valid UTF-8; save the file as UTF-8 text", write(valid + b"# caf\xe9\n")),
        Crafted("nul.toml", "NUL byte at offset", write(valid.replace(b"\n", b"\n\x00", 1))),
        Crafted("deep-arrays.toml", "arrays or tables are nested too deeply",
                write(valid + b"a = " + b"[" * deep + b"]" * deep + b"\n")),
        Crafted("deep-inline.toml", "arrays or tables are nested too deeply",
                write(valid + b"a = " + b"{a = " * deep + b"1" + b"}" * deep + b"\n")),
        Crafted("deep-tables.toml", "parts (more than 16) was refused before parsing",
                write(valid + b"[" + b".".join([b"a"] * deep) + b"]\n")),
        Crafted("deep-pipeline.toml", "parts (more than 16) was refused before parsing",
                write(valid + b"[pipeline." + b".".join([b"a"] * deep) + b"]\n")),
        Crafted("huge-array.toml", "train_input_path: must be a path (glob) or a list of 1 to 1000 paths, got a list "
                "of 200000 entries", write(valid + b'[pipeline]\ntrain_input_path = [' + b'"a",' * 200_000 + b"]\n")),
        Crafted("huge-hex.toml", "[pipeline] num_steps: must be a whole number from 1 to 2147483647, got a whole "
                "number of about 6021 digits", write(valid + b"[pipeline]\nnum_steps = 0x" + b"f" * 5000 + b"\n")),
        Crafted("huge-decimal.toml", "a number has more than 4300 digits",
                write(valid + b"priority = " + b"9" * 5000 + b"\n")),
        Crafted("many-keys.toml", "more problems not listed here (at most 50 are)",
                write(valid + b"".join(b"k%x = 1\n" % i for i in range(80_000)))),
        Crafted("name-traversal.toml", "name: not a valid job name: '../../etc/passwd' contains '/'",
                write(job("../../etc/passwd"))),
        Crafted("model-dir-outside.toml", f"model_dir: {outside_run} is outside the allowed roots {root}",
                write(job("out1", model_dir=outside_run))),
        Crafted("model-dir-dotdot.toml", f"resolves to {os.path.dirname(root)}/escaped-run, which is outside",
                write(job("out2", model_dir=f"{models}/../../escaped-run"))),
        Crafted("model-dir-symlink.toml", f"model_dir: {models}/escape/oddaemon-escaped-run resolves to "
                "/tmp/oddaemon-escaped-run, which is outside",
                write(job("out3", model_dir=f"{models}/escape/oddaemon-escaped-run"))),
        Crafted("pipeline-outside.toml", "pipeline_config: /etc/passwd is outside the allowed roots",
                write(job("out4", pipeline_config="/etc/passwd"))),
        Crafted("pipeline-dotdot.toml", "resolves to /etc/passwd, which is outside the allowed roots",
                write(job("out5", pipeline_config=f"{data}/{'../' * 30}etc/passwd"))),
        Crafted("pipeline-symlink.toml", f"{data}/escape/passwd resolves to /etc/passwd, which is outside",
                write(job("out6", pipeline_config=f"{data}/escape/passwd"))),
        Crafted("inputs-outside.toml", "train_input_path: /etc/*.conf is outside the allowed roots",
                write(job("out7", inputs("/etc/*.conf")))),
        Crafted("inputs-dotdot.toml", "train_input_path: " + f"{data}/{'../' * 30}etc/* resolves to /etc/*",
                write(job("out8", inputs(f"{data}/{'../' * 30}etc/*")))),
        Crafted("inputs-symlink-dir.toml", f"{data}/escape/passwd resolves to /etc/passwd, which is outside",
                write(job("out9", inputs(f"{data}/escape/passwd")))),
        Crafted("inputs-symlink-match.toml", f"{data}/leak*.tfrecord matches {data}/leak.tfrecord, which resolves to "
                "/etc/passwd, outside the allowed roots", write(job("out10", inputs(f"{data}/leak*.tfrecord")))),
        Crafted("path-too-long.toml", "bytes long; a path can be at most 4095 bytes",
                write(job("out11", model_dir=f"{models}/{'a' * 5000}"))),
        Crafted("glob-too-deep.toml", "path components with wildcards (* ? [); at most 32 are allowed",
                write(job("out12", inputs(data + "/*" * 2000)))),
    ]


def kept_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def drop_entry(env, filename: str, make: Callable[[str], None]) -> None:
    """Made in spool/tmp/, then renamed into new/ (the Maildir way, as `oddaemon submit` does)."""
    tmp = os.path.join(env.spool, "tmp", filename)
    make(tmp)
    os.rename(tmp, os.path.join(env.spool, "new", filename))


def rejected_entry(env, filename: str) -> str | None:
    """The entry's path in rejected/ once it and its .error (written just before the move) are both there."""
    kept = os.path.join(env.spool, "rejected", filename)
    return kept if os.path.exists(kept + ".error") and os.path.lexists(kept) else None


def settle(env, filenames: list[str], timeout: float = 60) -> None:
    """Wait until every file is in rejected/; stop waiting, and fail with the daemon's log, if the daemon died."""
    try:
        wait_for(lambda: env.proc.poll() is not None or all(rejected_entry(env, f) for f in filenames), timeout,
                 what="the files to be rejected")
    except AssertionError:
        pass
    where = {f: [d for d in ("new", "cur", "accepted") if os.path.lexists(os.path.join(env.spool, d, f))]
             for f in filenames if not rejected_entry(env, f)}
    status = "running" if env.proc.poll() is None else f"exited with {env.proc.returncode}"
    assert not where and status == "running", f"not rejected (found in): {where}; daemon {status}\n{env.daemon_log()}"


def error_of(env, filename: str) -> str:
    with open(rejected_entry(env, filename) + ".error") as f:
        return f.read()


def test_crafted_hostile_entries_are_set_aside_with_the_reason_and_the_daemon_carries_on(daemon_env, tmp_path):
    env = daemon_env.start()
    outside_run = f"/var/tmp/oddaemon-hostile-{os.getpid()}-{time.monotonic_ns()}"
    escaped = [outside_run, f"{os.path.dirname(env.root)}/escaped-run", "/tmp/oddaemon-escaped-run"]
    cases = crafted_cases(env, outside_run)
    for case in cases:
        drop_entry(env, case.filename, case.make)
    settle(env, [case.filename for case in cases])
    failures = []
    for case in cases:
        try:
            error = error_of(env, case.filename)
            assert f"Job file '{case.filename}' was rejected because" in error, error
            assert case.expect in error, f"expected {case.expect!r} in:\n{error[:2000]}"
            assert len(error) < 64 * 1024, f"the .error is {len(error)} bytes"
            kept = os.path.join(env.spool, "rejected", case.filename)
            if case.check_kept:
                case.check_kept(kept)
            else:
                assert kept_bytes(kept) == case.make.data, "the kept file differs from the one dropped"
        except AssertionError as exc:
            failures.append(f"{case.filename}: {exc}")
    assert not failures, "\n".join(failures)
    assert env.answers(), "the daemon stopped answering"  # all handled: it must answer at once
    assert not os.listdir(os.path.join(env.spool, "new")) and not os.listdir(os.path.join(env.spool, "cur"))
    assert env.ask("list")["jobs"] == [], "a hostile file was queued"
    assert not any(os.path.lexists(p) for p in escaped), "a model_dir outside the roots was created"
    assert not os.path.lexists(os.path.join(env.state, "..", "..", "etc"))

    # Clashes with jobs the daemon holds: one running, one queued behind it (one CPU slot).
    env.drop("owner.toml", env.job_text("owner", num_steps=1000, step_seconds=0.05))
    env.wait_state("owner", "running", 30)
    env.drop("waiter.toml", env.job_text("waiter", num_steps=5))
    env.wait_state("waiter", "queued", 30)
    owner_dir = os.path.join(env.models, "owner")
    os.symlink(owner_dir, os.path.join(env.models, "alias"))
    pipeline = env.pipeline("clash")

    def clash(name: str, model_dir: str) -> str:
        return f'name = "{name}"\npipeline_config = "{pipeline}"\nmodel_dir = "{model_dir}"\n'

    stateful = [
        ("claim.toml", clash("claimer", owner_dir),
         f"model_dir {owner_dir} is already used by job 'owner' (running); two jobs cannot train into one model_dir"),
        ("claim-slash.toml", clash("claimer2", owner_dir + "/"), "is already used by job 'owner' (running)"),
        ("claim-dotdot.toml", clash("claimer3", f"{env.models}/x/../owner"), "is already used by job 'owner'"),
        ("claim-symlink.toml", clash("claimer4", f"{env.models}/alias"), "is already used by job 'owner'"),
        ("owner-again.toml", env.job_text("owner", num_steps=5),
         "a job named 'owner' is already queued, running or being checked; cancel it first or choose another name"),
        ("waiter-again.toml", clash("waiter", f"{env.models}/elsewhere"),
         "a job named 'waiter' is already queued, running or being checked"),
    ]
    for filename, text, _ in stateful:
        env.drop(filename, text)
    settle(env, [filename for filename, _, _ in stateful])
    for filename, text, expect in stateful:
        error = error_of(env, filename)
        assert expect in error, f"{filename}: expected {expect!r} in:\n{error}"
        assert kept_bytes(os.path.join(env.spool, "rejected", filename)) == text.encode()
    jobs = {j["name"]: j["state"] for j in env.ask("list")["jobs"]}
    assert jobs == {"owner": "running", "waiter": "queued"}
    assert env.answers()
    assert "Traceback" not in env.daemon_log(), env.daemon_log()


def test_links_fifos_and_directories_made_directly_in_new_are_set_aside(daemon_env):
    """Made in new/ itself (no rename, no write): inotify reports only IN_CREATE for these; the
    daemon sets them aside at once, and a new regular file still waits for its close-after-write."""
    env = daemon_env.start()
    new = os.path.join(env.spool, "new")
    original = os.path.join(env.data, "direct-original.toml")
    with open(original, "w") as f:
        f.write(env.job_text("direct"))
    entries = {"direct-symlink.toml": lambda p: os.symlink(original, p),
               "direct-hardlink.toml": lambda p: os.link(original, p),
               "direct-fifo.toml": os.mkfifo, "direct-dir.toml": os.mkdir}
    for filename, make in entries.items():
        make(os.path.join(new, filename))
    writing = open(os.path.join(new, "direct-written.toml"), "w")  # open, half written: must wait
    writing.write(env.job_text("written")[:40])
    writing.flush()
    settle(env, list(entries), timeout=10)
    for filename in entries:
        assert "was rejected because it is not a regular file" in error_of(env, filename)
    assert os.listdir(new) == ["direct-written.toml"]
    writing.write(env.job_text("written")[40:])
    writing.close()
    env.wait_state("written", ("queued", "running", "evaluating", "succeeded"), 30)
    with open(original) as f:
        assert f.read() == env.job_text("direct")
    assert [j["name"] for j in env.ask("list")["jobs"]] == ["written"] and "Traceback" not in env.daemon_log()
