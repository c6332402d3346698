"""The fake loop and the manual clock the service tests stand on: timers in due order on the clock,
removal, readers and signals recorded and fired."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.fakes import FakeLoop, ManualClock


def test_the_manual_clock_moves_only_when_told_and_never_back():
    clock = ManualClock(100.0)
    assert clock() == 100.0
    clock.set(104.5)
    assert clock() == 104.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.set(104.0)


def test_advance_runs_the_due_timers_in_due_order_at_their_due_time():
    loop = FakeLoop(ManualClock(0.0))
    ran = []
    loop.call_later(3.0, lambda: ran.append(("c", loop.clock())))
    loop.call_later(1.0, lambda: ran.append(("a", loop.clock())))
    loop.call_later(2.0, lambda: ran.append(("b", loop.clock())))
    assert loop.advance(1.5) == 1
    assert ran == [("a", 1.0)]
    assert loop.clock() == 1.5
    assert loop.timers() == [2.0, 3.0]
    assert loop.advance(10) == 2
    assert ran == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert loop.clock() == 11.5


def test_a_timer_added_by_a_timer_runs_in_the_same_advance_when_due():
    loop = FakeLoop(ManualClock(0.0))
    ran = []
    loop.call_later(1.0, lambda: loop.call_later(1.0, lambda: ran.append(loop.clock())))
    loop.advance(1.5)
    assert ran == []
    loop.advance(0.5)
    assert ran == [2.0]


def test_a_removed_timer_never_runs_and_equal_due_times_keep_their_order():
    loop = FakeLoop(ManualClock(0.0))
    ran = []
    first = loop.call_later(1.0, lambda: ran.append("first"))
    loop.call_later(1.0, lambda: ran.append("second"))
    loop.call_later(1.0, lambda: ran.append("third"))
    loop.remove(first)
    loop.remove(None)
    assert loop.timers() == [1.0, 1.0]
    loop.advance(1.0)
    assert ran == ["second", "third"]


def test_readers_and_signals_are_recorded_fired_and_removed():
    loop = FakeLoop()
    seen = []
    r, w = os.pipe()
    try:
        handle = loop.add_reader(r, lambda: seen.append(os.read(r, 10)))
        loop.add_signal(signal.SIGHUP, lambda: seen.append("hup"))
        assert loop.run_ready(0) == []  # nothing written yet: nothing runs
        os.write(w, b"x")
        assert loop.run_ready(5) == [r]
        loop.fire_signal(signal.SIGHUP)
        assert seen == [b"x", "hup"]
        loop.remove(handle)
        assert r not in loop.readers
        with pytest.raises(KeyError):
            loop.fire_reader(r)
    finally:
        os.close(r)
        os.close(w)


def test_run_runs_what_is_due_now_and_stop_is_recorded():
    loop = FakeLoop(ManualClock(5.0))
    ran = []
    loop.call_later(0, lambda: ran.append(loop.clock()))
    loop.call_later(1, lambda: ran.append("later"))
    loop.run()
    assert ran == [5.0]
    loop.stop()
    assert loop.stopped and not loop.running
