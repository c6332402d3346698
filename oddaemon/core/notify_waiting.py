"""Notifications still waiting when the daemon stops, kept for the daemon that starts next (the pure part).

A job that succeeds a moment before ``systemctl restart oddaemon`` (an upgrade, a reload that needs
a restart) would otherwise never reach its webhook: the sender threads' queues die with the process.
So a stopping daemon writes what waits, and what was being tried at that moment (it may have gone
out: a notification arrives at least once, never not at all), to ``state_dir/notifications-waiting.json``;
the next daemon sends it, each delivery with the tries it had and the rest of its backoff.

A delivery goes only to the target it was made for: each carries a fingerprint (a hash, never the URL
or the command itself) of its target's definition, and one whose target is gone or was changed
while the daemon was stopped is dropped and recorded so, as a reload does. A daemon that is killed
keeps nothing (the history says what was sent).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from oddaemon.core.notifications import Settings, Target

VERSION = 1


@dataclass(frozen=True)
class Waiting:
    """One delivery not made yet: ``delay``, the seconds left until its next try."""

    job: str
    event: str
    target: str
    data: bytes
    tries: int = 0
    delay: float = 0.0


def fingerprint(target: Target) -> str:
    """What identifies a target's definition, without saying it (a URL may carry a token)."""
    return hashlib.sha256(repr(target).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def encode(waiting: list[Waiting], settings: Settings) -> bytes:
    """The file a stopping daemon writes (deliveries for a target it no longer has are left out)."""
    entries = []
    for w in waiting:
        target = settings.target(w.target)
        if target is not None:
            entries.append({"job": w.job, "event": w.event, "target": w.target, "fingerprint": fingerprint(target),
                            "data": base64.b64encode(w.data).decode("ascii"), "tries": w.tries,
                            "delay": round(max(0.0, w.delay), 3)})
    return json.dumps({"version": VERSION, "waiting": entries}, indent=1).encode()


def decode(raw: bytes, settings: Settings) -> tuple[list[Waiting], list[tuple[Waiting, str]]]:
    """(what to send, what to drop with the reason). ValueError for a file that is not one of these."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("waiting"), list):
        raise ValueError("not a waiting-notifications file of this version")
    send, drop = [], []
    for entry in doc["waiting"]:
        try:
            w = Waiting(str(entry["job"]), str(entry["event"]), str(entry["target"]),
                        base64.b64decode(entry["data"], validate=True), int(entry["tries"]), float(entry["delay"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a malformed entry ({type(exc).__name__}: {exc})") from None
        target = settings.target(w.target)
        if target is None:
            drop.append((w, "the target was removed while the daemon was stopped"))
        elif fingerprint(target) != entry.get("fingerprint"):
            drop.append((w, "the target was changed while the daemon was stopped"))
        else:
            send.append(w)
    return send, drop
