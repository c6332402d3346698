"""core/notify_waiting: notifications a stopping daemon keeps for the next one."""

from __future__ import annotations

import pytest

from oddaemon.core import notifications as nt
from oddaemon.core.notify_waiting import Waiting, decode, encode

TEAM = nt.Target("team", url="http://127.0.0.1:9/hook/T0/secret-token")
PAGER = nt.Target("pager", command=("/usr/local/bin/page",))


def settings(*targets: nt.Target) -> nt.Settings:
    return nt.Settings(targets=targets)


def test_what_waits_comes_back_as_it_was_and_no_url_is_written():
    waiting = [Waiting("cats", "succeeded", "team", b'{"job": "cats"}\xff', 1, 12.5),
               Waiting("dogs", "failed", "pager", b"{}", 0, -3.0)]
    raw = encode(waiting, settings(TEAM, PAGER))
    assert b"secret-token" not in raw and b"127.0.0.1" not in raw and b"/usr/local/bin/page" not in raw
    send, drop = decode(raw, settings(TEAM, PAGER))
    assert send == [waiting[0], Waiting("dogs", "failed", "pager", b"{}", 0, 0.0)] and drop == []  # (due now)


def test_a_target_changed_or_removed_while_stopped_drops_its_deliveries_with_the_reason():
    raw = encode([Waiting("cats", "succeeded", "team", b"{}"), Waiting("cats", "succeeded", "pager", b"{}")],
                 settings(TEAM, PAGER))
    moved = nt.Target("team", url="http://127.0.0.1:9/hook/T0/another-token")
    send, drop = decode(raw, settings(moved))
    assert send == []
    assert [(w.target, why) for w, why in drop] == [("team", "the target was changed while the daemon was stopped"),
                                                    ("pager", "the target was removed while the daemon was stopped")]


def test_a_delivery_for_a_target_the_stopping_daemon_no_longer_has_is_not_written():
    assert decode(encode([Waiting("cats", "failed", "gone", b"{}")], settings(TEAM)), settings(TEAM)) == ([], [])


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"version": 2, "waiting": []}', b'{"version": 1, "waiting": [{}]}',
                                 b'{"version": 1, "waiting": [{"job": "a", "event": "e", "target": "team", '
                                 b'"data": "!!", "tries": 0, "delay": 0}]}'])
def test_a_file_that_is_not_one_is_refused(raw):
    with pytest.raises(ValueError):
        decode(raw, settings(TEAM))
