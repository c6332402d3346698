"""Small I/O adapters on real files, pipes and signals."""

from __future__ import annotations

import os
import re
import signal

import pytest

from oddaemon.adapters.logs import LogPump, RotatingLog
from oddaemon.adapters.loop import GLibLoop, SelectLoop
from oddaemon.adapters.spool import NotARegularFile, Spool, is_candidate
from oddaemon.adapters.store import Store, atomic_write, rename_noreplace
from oddaemon.core.errors import OperationError

LOOPS = [SelectLoop, GLibLoop]


@pytest.mark.parametrize("name, ok", [
    ("job.toml", True), ("effdet_d0.v2.toml", True), (".job.toml", False), ("job.toml.swp", False),
    ("job.toml~", False), ("#job.toml#", False), ("job.txt", False), (".toml", False), ("job.tmp", False),
])
def test_spool_candidates(name, ok):
    assert is_candidate(name) is ok


def test_spool_refuses_links_fifos_and_directories_without_reading(tmp_path):
    spool = Spool(str(tmp_path))
    spool.ensure_dirs()
    target = tmp_path / "real.toml"
    target.write_text("x = 1")
    os.symlink(target, f"{spool.new}/link.toml")
    os.mkfifo(f"{spool.new}/fifo.toml")
    os.mkdir(f"{spool.new}/dir.toml")
    for name, kind in (("link.toml", "symbolic link"), ("fifo.toml", "FIFO"), ("dir.toml", "directory")):
        with pytest.raises(NotARegularFile, match=kind):
            spool.read(f"{spool.new}/{name}", 1000)
    dest, error = spool.reject(f"{spool.new}/link.toml", "why")
    assert os.path.islink(dest) and open(error).read() == "why"
    dest2, _ = spool.reject(f"{spool.new}/fifo.toml", "why")
    assert dest2.endswith("fifo.toml")


def test_spool_read_is_capped(tmp_path):
    spool = Spool(str(tmp_path))
    spool.ensure_dirs()
    path = f"{spool.new}/big.toml"
    with open(path, "wb") as f:
        f.write(b"a" * 5000)
    assert len(spool.read(path, 1000)) == 1001  # one byte past the cap tells the validator it is too big


def test_spool_reject_never_overwrites(tmp_path):
    spool = Spool(str(tmp_path))
    spool.ensure_dirs()
    for i in range(3):
        with open(f"{spool.new}/same.toml", "w") as f:
            f.write(str(i))
        spool.reject(f"{spool.new}/same.toml", f"error {i}")
    assert sorted(os.listdir(spool.rejected)) == ["same.2.toml", "same.2.toml.error", "same.3.toml",
                                                  "same.3.toml.error", "same.toml", "same.toml.error"]


def test_submit_refuses_to_replace_a_waiting_file(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure_dirs()
    src = tmp_path / "a.toml"
    src.write_text("one")
    spool.submit(str(src))
    src.write_text("two")
    with pytest.raises(OperationError, match=re.escape(
            f"cannot submit to {spool.new}/a.toml: a file with this name is already waiting in the spool")):
        spool.submit(str(src))
    assert open(f"{spool.new}/a.toml").read() == "one"
    assert os.listdir(spool.tmp) == []


def test_rename_noreplace(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert (tmp_path / "c").read_text() == "a" and (tmp_path / "b").read_text() == "b"


def test_atomic_write_and_store_cleanup(tmp_path):
    store = Store(str(tmp_path))
    store.ensure_dirs()
    store.save_job("a", {"x": 1})
    atomic_write(os.path.join(store.jobs_dir, "b.json"), b"{not json")
    with open(os.path.join(store.jobs_dir, ".tmp-123"), "w") as f:
        f.write("half")
    loaded = list(store.load_jobs())
    assert [(os.path.basename(p), r) for p, r, _ in loaded if r] == [("a.json", {"x": 1})]
    assert [os.path.basename(p) for p, r, e in loaded if r is None and e] == ["b.json"]
    assert not os.path.exists(os.path.join(store.jobs_dir, ".tmp-123"))


def test_rotating_log_rotates_whole_writes_and_drops_the_oldest(tmp_path):
    path = str(tmp_path / "l" / "train.log")
    log = RotatingLog(path, max_bytes=100, backups=2)
    for i in range(10):
        log.write(f"line {i:02d} ".encode() + b"x" * 30 + b"\n")  # 39 bytes
    log.close()
    assert sorted(os.listdir(tmp_path / "l")) == ["train.log", "train.log.1", "train.log.2"]
    text = "".join(open(f"{path}{s}").read() for s in (".2", ".1", ""))
    assert [int(line.split()[1]) for line in text.splitlines()] == list(range(4, 10))
    assert all(os.path.getsize(f"{path}{s}") <= 100 for s in ("", ".1", ".2"))


def test_rotating_log_reopen_follows_an_external_rename(tmp_path):
    path = str(tmp_path / "train.log")
    log = RotatingLog(path, 10_000, 1)
    log.write(b"before\n")
    os.rename(path, path + ".old")
    log.reopen()
    log.write(b"after\n")
    assert open(path).read() == "after\n" and open(path + ".old").read() == "before\n"


def test_rotating_log_counts_write_errors_instead_of_raising(tmp_path):
    log = RotatingLog(str(tmp_path / "x.log"), 10_000, 1)
    log.close()
    log._fd = os.open("/dev/full", os.O_WRONLY)
    log.write(b"lost\n")
    assert log.write_errors == 1 and "No space left" in log.last_error


def test_log_pump_keeps_partial_lines_until_complete(tmp_path):
    r, w = os.pipe()
    log = RotatingLog(str(tmp_path / "p.log"), 10_000, 1)
    pump = LogPump(r, log)
    os.write(w, b"first\nsec")
    assert pump.pump()
    assert open(tmp_path / "p.log").read() == "first\n"
    os.write(w, b"ond\n")
    pump.pump()
    os.write(w, b"no newline at end")
    os.close(w)
    assert pump.pump() is False
    assert open(tmp_path / "p.log").read() == "first\nsecond\nno newline at end\n"
    assert list(pump.tail) == ["first", "second", "no newline at end"]




@pytest.mark.parametrize("loop_class", LOOPS)
def test_loop_timers_readers_signals_and_errors(loop_class):
    """Each step is started by the one before it (a timer writes, the reader's callback arms the next
    write, the last read raises a signal, the signal stops the loop), so a stalled machine cannot merge
    or reorder them. A timer that was removed, due at once, never runs; a generous deadline ends a
    loop that lost an event."""
    loop = loop_class()
    seen = []
    r, w = os.pipe()

    def on_read():
        data = os.read(r, 100)
        seen.append(("read", data))
        if data == b"boom":
            loop.call_later(0, lambda: os.write(w, b"again"))
            raise RuntimeError("a failing callback must not remove its source")
        if data == b"again":
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_usr1():
        seen.append("usr1")
        loop.call_later(0, loop.stop)  # due after the removed timer below: it had its chance to run

    def deadline():
        seen.append("deadline")
        loop.stop()

    loop.add_reader(r, on_read)
    cancelled = loop.call_later(0, lambda: seen.append("cancelled timer ran"))
    loop.remove(cancelled)
    loop.add_signal(signal.SIGUSR1, on_usr1)
    loop.call_later(0, lambda: os.write(w, b"boom"))
    guard = loop.call_later(120, deadline)
    try:
        loop.run()
    finally:
        loop.remove(guard)
        loop.close()
        os.close(r)
        os.close(w)
    assert seen == [("read", b"boom"), ("read", b"again"), "usr1"]


def test_the_daemons_own_deliveries_go_through_tmp_and_half_writes_are_cleaned_at_start(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure_dirs()
    path = spool.deliver(b'name = "x"\n', "x.1234.toml")
    assert path == os.path.join(spool.new, "x.1234.toml") and open(path, "rb").read() == b'name = "x"\n'
    assert os.listdir(spool.tmp) == []
    # a daemon killed inside atomic_write leaves ".tmp-*"; a user's own dotfiles are not ours to touch
    for directory in (spool.tmp, spool.new):
        open(os.path.join(directory, ".tmp-deadbeef"), "wb").close()
        open(os.path.join(directory, ".users-own.toml"), "wb").close()
    spool.ensure_dirs()
    assert sorted(os.listdir(spool.tmp)) == [".users-own.toml"]
    assert sorted(os.listdir(spool.new)) == [".users-own.toml", "x.1234.toml"]
    with pytest.raises(OperationError, match=re.escape(
            f"cannot deliver to {path}: a file with this name is already waiting in the spool")):
        spool.deliver(b"again", "x.1234.toml")  # never replaces a waiting file
    assert open(path, "rb").read() == b'name = "x"\n' and os.listdir(spool.tmp) == [".users-own.toml"]
