"""Notifications, the pure part: the daemon's ``[notify]`` targets and a job's ``[notify]`` choices
(checked like every other key), which events go where, the payload of each event in the generic JSON
and the Slack format, the retry schedule, and how a delivery is recorded in the job's history.

The I/O (the sender threads, HTTP, the command target) is ``adapters/notify.py``; what turns the
daemon's job transitions, evaluations and progress into events is ``service/notify_hook.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from oddaemon.core.checks import Invalid, finite_number, show
from oddaemon.core.jobspec import NOTIFY_CREDENTIALS, JobSpec, NotifyOptions

EVENTS = ("succeeded", "failed", "new_best", "stalled", "evaluator_behind")
FORMATS = ("json", "slack")
DEFAULT_EVENTS = ("succeeded", "failed")
TARGET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TARGET_KEYS = ("url", "url_file", "command", "format")
MAX_TARGETS = 32
RETRY_CAP_SECONDS = 300.0
HISTORY_STATE = "notify"  # the "state" column of a delivery's history entry (never a job state)
PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 425, 429}  # a retry cannot fix these


@dataclass(frozen=True)
class Target:
    """One daemon-wide destination: exactly one of ``url``, ``url_file`` (a file holding the URL,
    read at each delivery) and ``command`` (run with the event as JSON on stdin)."""

    name: str
    url: str = ""
    url_file: str = ""
    command: tuple[str, ...] = ()
    format: str = "json"  # webhooks: "json" (the event as it is) or "slack" ({"text": ...})

    @property
    def kind(self) -> str:
        return "command" if self.command else "webhook"


# ---- the daemon configuration: [notify.targets.NAME] -----------------------------------------------------------

def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value, re.ASCII):
        got = repr(value[:12] + "...") if isinstance(value, str) else f"a {type(value).__name__}"
        raise Invalid(f"{where} url must be an http:// or https:// URL, got {got}")
    return value


def check_targets(value: Any) -> tuple[Target, ...]:
    """``[notify.targets.NAME]`` tables to targets; Invalid names every problem (never the URL itself)."""
    if not isinstance(value, dict):
        raise Invalid(f"must be tables written as [notify.targets.NAME] sections, got a {type(value).__name__}")
    if len(value) > MAX_TARGETS:
        raise Invalid(f"{len(value)} targets are configured; at most {MAX_TARGETS} are allowed")
    problems: list[str] = []
    targets = []
    for name, table in value.items():
        where = f"[notify.targets.{name}]"
        if not TARGET_NAME_RE.fullmatch(name):
            problems.append(f"{where}: a target name is 1 to 64 characters from A-Z a-z 0-9 '_' '.' '-' "
                            "and starts with a letter or digit")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where} must be a table with url, url_file or command (a [notify.targets.{name}] "
                            f"section), got a {type(table).__name__}")  # (never the value: it may be a URL)
            continue
        unknown = [k for k in table if k not in TARGET_KEYS]
        problems += [f"{where}: unknown key {show(k)}. Allowed keys: {', '.join(TARGET_KEYS)}" for k in unknown]
        given = [k for k in ("url", "url_file", "command") if k in table]
        if len(given) != 1:
            problems.append(f"{where} needs exactly one of url, url_file and command, "
                            f"got {', '.join(given) if given else 'none'}")
            continue
        try:
            targets.append(_target(name, table, where))
        except Invalid as exc:
            problems.append(str(exc))
    if problems:
        raise Invalid("; ".join(problems))
    return tuple(targets)


def _target(name: str, table: dict, where: str) -> Target:
    fmt = table.get("format", "json")
    if fmt not in FORMATS:
        raise Invalid(f"{where} format must be one of {', '.join(repr(f) for f in FORMATS)}, got {show(fmt)}")
    if "command" in table:
        command = table["command"]
        if (not isinstance(command, list) or not command or not all(isinstance(a, str) and "\0" not in a
                                                                    for a in command)
                or not command[0].startswith("/")):
            raise Invalid(f"{where} command must be a non-empty list of strings: the program's absolute path, "
                          f"then its arguments, got {show(command)}")
        if "format" in table:
            raise Invalid(f"{where}: format is for url and url_file targets; a command gets the event as JSON")
        return Target(name, command=tuple(command))
    if "url_file" in table:
        path = table["url_file"]
        if not isinstance(path, str) or not path or "\0" in path:
            raise Invalid(f"{where} url_file must be a path to a file that holds the URL, got {show(path)}")
        return Target(name, url_file=path, format=fmt)
    return Target(name, url=_url(table["url"], where), format=fmt)


def check_event_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of events from {', '.join(EVENTS)}, got {show(value)}")
    bad = [v for v in value if v not in EVENTS]
    if bad:
        raise Invalid(f"{show(bad[0])} is not an event; the events are {', '.join(EVENTS)}")
    if len(set(value)) != len(value):
        raise Invalid(f"lists an event twice: {show(value)}")
    return tuple(value)


def check_target_names(value: Any, known: tuple[str, ...]) -> tuple[str, ...]:
    """Target names, each one of ``known`` (the daemon's); a URL gets the credentials message."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"must be a list of target names, got {show(value)}")
    for v in value:
        if "://" in v or v.startswith("/"):
            raise Invalid(f"{NOTIFY_CREDENTIALS}; got an address instead of a name")
        if v not in known:
            offered = ", ".join(known) if known else "none are configured"
            raise Invalid(f"{show(v)} is not one of the daemon's notification targets ({offered})")
    if len(set(value)) != len(value):
        raise Invalid(f"lists a target twice: {show(value)}")
    return tuple(value)


def job_checkers(known_targets: tuple[str, ...]) -> dict:
    """The checkers of a job's ``[notify]`` keys (``core/job_validation.py``)."""
    return {"events": check_event_list, "targets": lambda v: check_target_names(v, known_targets),
            "stalled_after_seconds": finite_number(0, inclusive=False)}


# ---- what goes where ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The daemon's notification settings (from ``Config``)."""

    targets: tuple[Target, ...] = ()
    default_targets: tuple[str, ...] = ()
    default_events: tuple[str, ...] = DEFAULT_EVENTS
    timeout_seconds: float = 10.0
    retries: int = 3
    retry_backoff_seconds: float = 5.0
    queue_size: int = 100
    stalled_after_seconds: float = 900.0

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


def choices(spec: JobSpec, settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(events, target names) of a job: its own ``[notify]`` values, else the daemon's defaults."""
    mine: NotifyOptions = spec.notify
    events = mine.events if mine.events is not None else settings.default_events
    targets = mine.targets if mine.targets is not None else settings.default_targets
    return (events, targets) if targets else ((), ())


def stalled_after(spec: JobSpec, settings: Settings) -> float:
    value = spec.notify.stalled_after_seconds
    return settings.stalled_after_seconds if value is None else value


# ---- payloads -------------------------------------------------------------------------------------------------

def payload(event: str, name: str, now: float, host: str, state: str, summary: str, **details: Any) -> dict:
    """The event as every target gets it (generic JSON; the Slack format is its ``message``)."""
    text = f"oddaemon on {host}: job {name} {summary}"
    return {"event": event, "job": name, "time": now, "host": host, "state": state, "message": text,
            **{k: v for k, v in details.items() if v is not None}}


def succeeded(name: str, now: float, host: str, reason: str, model_dir: str, metric: str | None,
              best: float | None, best_step: int | None) -> dict:
    at = f"; best {metric} {best:.4g} at step {best_step}" if best is not None else ""
    return payload("succeeded", name, now, host, "succeeded", f"succeeded ({reason}){at}", reason=reason,
                   model_dir=model_dir, metric=metric if best is not None else None, value=best, step=best_step)


def failed(name: str, now: float, host: str, sentence: str, kind: str | None, model_dir: str) -> dict:
    return payload("failed", name, now, host, "failed", f"failed: {sentence}", reason=sentence, failure_kind=kind,
                   model_dir=model_dir)


def new_best(name: str, now: float, host: str, state: str, metric: str, value: float, step: int | None,
             previous: float | None) -> dict:
    at = f" at step {step}" if step is not None else ""
    was = f" (was {previous:.4g})" if previous is not None else ""
    return payload("new_best", name, now, host, state, f"has a new best {metric}: {value:.4g}{at}{was}",
                   metric=metric, value=value, step=step, previous=previous)


def stalled(name: str, now: float, host: str, seconds: float, step: int | None) -> dict:
    at = f" (still at step {step})" if step is not None else " (no step yet)"
    return payload("stalled", name, now, host, "running", f"is stalled: no new training step for {seconds:.0f} s{at}",
                   seconds=seconds, step=step)


def evaluator_behind(name: str, now: float, host: str, state: str, waiting: int, skipped: int) -> dict:
    what = f"{waiting} checkpoint(s) wait for evaluation"
    if skipped:
        what += f", {skipped} skipped or released unevaluated"
    return payload("evaluator_behind", name, now, host, state, f"has its evaluator behind the trainer: {what}",
                   waiting=waiting, skipped=skipped)


def body(target: Target, event: dict) -> bytes:
    """What is POSTed to a webhook target, or written to a command's stdin."""
    if target.kind == "webhook" and target.format == "slack":
        return json.dumps({"text": event["message"]}).encode()
    return json.dumps(event, sort_keys=True).encode()


# ---- retries and the record -----------------------------------------------------------------------------------

def retry_delay(failed_tries: int, base: float) -> float:
    """Seconds before the next try after ``failed_tries`` failed ones: base, 2 base, 4 base ... capped."""
    return min(RETRY_CAP_SECONDS, base * 2 ** min(30, max(0, failed_tries - 1)))


def retryable_status(status: int) -> bool:
    """A redirect (never followed) or a 4xx but 408/425/429 is final; 5xx and the rest are retried."""
    return not 300 <= status < 400 and status not in PERMANENT_HTTP


@dataclass(frozen=True)
class Outcome:
    """How one delivery ended: sent, failed (after ``tries``), or dropped unsent (the queue was full)."""

    job: str
    event: str
    target: str
    result: str  # "sent" | "failed" | "dropped"
    tries: int = 1
    error: str = ""

    def text(self) -> str:
        if self.result == "sent":
            after = f" (try {self.tries})" if self.tries > 1 else ""
            return f"notification {self.event} to {self.target}: sent{after}"
        if self.result == "dropped" or not self.tries:
            return f"notification {self.event} to {self.target}: {self.result} unsent ({self.error})"
        return f"notification {self.event} to {self.target}: failed after {self.tries} tries ({self.error})"


def record(history: tuple, now: float, text: str, limit: int) -> tuple:
    """``history`` with a delivery's entry. Since the last state change, a delivery replaces the
    earlier one of the same event and target (a run of new_best is one entry per target, the
    latest), so deliveries never push the state changes out of the history."""
    def key(entry_text: object) -> str:
        return str(entry_text).split(":", 1)[0]  # "notification EVENT to TARGET"

    tail = len(history)
    while tail > 0 and history[tail - 1][1] == HISTORY_STATE:
        tail -= 1
    kept = history[:tail] + tuple(h for h in history[tail:] if key(h[2]) != key(text))
    return (kept + ((now, HISTORY_STATE, text),))[-limit:]
