"""Spool intake: inotify events and rescans of ``spool/new`` -> validation -> scheduler.

Every file that lands in ``new/`` ends in ``accepted/`` (the scheduler took it) or ``rejected/``
(with its ``.error``); none is read twice and none is lost.

Who may submit: a file must be owned by root, the daemon's user, the worker user, or a member of
``[jobs] submit_group`` (looked up for each file, so a user just added to the group can submit at
once); anyone else's file is rejected with the reason. ``submit_group = ""`` turns this check off.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from inotify_simple import flags

from oddaemon.adapters.confine import Identity, group_exists, submitter_problem, user_name
from oddaemon.adapters.inotify import SPOOL_MASK, InotifyHub
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.parsers import ParserPool
from oddaemon.adapters.spool import NotARegularFile, Spool, is_candidate
from oddaemon.core import scheduler as sch
from oddaemon.core.checks import Problem, render_error_file, size_problem
from oddaemon.core.config import Config
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.job_validation import parse_job
from oddaemon.core.jobspec import JobSpec
from oddaemon.core.sweep import expand, is_definition
from oddaemon.service.preflight import Preflights

log = logging.getLogger("oddaemon.service.intake")

SETTLE_SECONDS = 1.0  # a file in new/ younger than this at rescan may still be being written
MAX_REMEMBERED = 1000  # verdicts kept for verdict_within
PER_TURN = 16  # spool files taken per loop turn (each a read, a rename and a pipe write: well under 1 ms)
HOLD_SECONDS = 60.0  # the longest a checked job waits for files still being parsed (its `after` may be among them)


@dataclass(frozen=True)
class Verdict:
    accepted: bool | None  # None: valid so far, its preflight is running
    name: str
    message: str  # why it was rejected (the .error text, or the scheduler's reason)


class SpoolIntake:
    def __init__(self, config: Config, spool: Spool, loop: Loop, dispatch: Callable[[sch.Event], list[sch.Action]],
                 active_names: Callable[[], set[str]], preflights: Preflights | None,
                 parsers: ParserPool | None = None):
        self.config = config
        self.spool = spool
        self.loop = loop
        self.dispatch = dispatch
        self.active_names = active_names  # names of jobs that are queued, running, ... (not finished)
        self.preflights = preflights
        self.parsers = parsers  # job files are parsed in child processes (None: in-process)
        self.decided: dict[str, Verdict] = {}  # delivered path -> verdict, for verdict_within
        self.rejected_total = 0
        self.on_rejected: Callable[[], object] = lambda: None  # the count changed (the daemon: a metrics snapshot)
        self._rescan_pending = False
        self._queue: dict[str, None] = {}  # paths waiting for intake, in arrival order
        self._draining = False
        self.worker_identity: Identity | None = None  # set by the daemon at start (a root daemon's worker user)
        self.state: Callable[[], sch.State] | None = None  # set by the daemon: a sweep is admitted as one
        self._held: list[tuple[JobSpec, str]] = []  # checked, waiting for a job they name in `after` to be
        self._release_pending = False  #              checked too (see submit)
        self._held_since: dict[str, float] = {}

    def start(self, hub: InotifyHub) -> None:
        group = self.config.submit_group
        if group and not group_exists(group):
            who = "root" if os.geteuid() == 0 else f"root and {user_name(os.geteuid())}"
            log.warning("the submit group '%s' ([jobs] submit_group) does not exist on this system: only %s may "
                        "submit jobs; create it (groupadd %s) and add the users who submit, or set submit_group = "
                        "\"\" to accept files from anyone who can write to %s", group, who, group, self.spool.new)
        # Files whose checks a restart interrupted are checked again first.
        for path in self.spool.scan(self.spool.cur):
            self._enqueue(path)
        # Watch first, then rescan: a file that arrives in between is seen by one or the other.
        hub.watch(self.spool.new, SPOOL_MASK, self._on_event, self.rescan)
        self.rescan()
        # Before READY: every file waiting at start is taken out of new/ now (its parse goes on
        # afterwards), so `active (running)` never coexists with a file the daemon has not seen.
        while self._queue:
            self._take_next()

    def _on_event(self, filename: str, mask: int) -> None:
        if not is_candidate(filename):
            return
        path = os.path.join(self.spool.new, filename)
        if mask & flags.CREATE and not mask & flags.ISDIR:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                return  # a new file being written: its CLOSE_WRITE (or a rescan) takes it
        self._enqueue(path)  # moved or written in, or made in place as a link, FIFO or directory

    def _enqueue(self, path: str) -> None:
        """Files are taken ``PER_TURN`` per loop turn, so a burst of 500 (or a rescan of 2,000) never
        keeps the loop from the control socket, D-Bus and the workers for long; a path queued twice
        (two events) is taken once."""
        self._queue[path] = None
        if not self._draining:
            self._draining = True
            self.loop.call_later(0, self._drain)

    def _take_next(self) -> None:
        path = next(iter(self._queue))
        del self._queue[path]
        self.intake(path)

    def _drain(self) -> None:
        for _ in range(min(PER_TURN, len(self._queue))):
            self._take_next()
        if self._queue:
            self.loop.call_later(0, self._drain)
        else:
            self._draining = False

    def rescan(self) -> None:
        now = time.time()
        young = False
        for path in self.spool.scan():
            try:
                if now - os.lstat(path).st_mtime < SETTLE_SECONDS:
                    young = True  # may still be being written: its close-write event, or the re-check, takes it
                    continue
            except FileNotFoundError:
                continue
            self._enqueue(path)
        if young and not self._rescan_pending:
            self._rescan_pending = True
            self.loop.call_later(SETTLE_SECONDS, self._rescan_again)

    def _rescan_again(self) -> None:
        self._rescan_pending = False
        self.rescan()

    def intake(self, path: str) -> Verdict | None:
        """Validate and submit one spool file. None if it was already gone (a duplicate event).
        Whatever goes wrong, the file ends in accepted/ or rejected/ (or stays for a restart when
        even that fails): one bad file never stops the intake of the others."""
        try:
            return self._intake(path)
        except Exception as exc:
            log.exception("intake of %s failed", path)
            if not os.path.lexists(path):
                return None
            return self.reject(path, [Problem(f"the daemon failed while reading this file ({type(exc).__name__}: "
                                              f"{exc}); this is a bug in oddaemon, please report it with the file")],
                               "the daemon could not process it")

    def _intake(self, path: str) -> Verdict | None:
        name = os.path.basename(path)
        try:
            data = self.spool.read(path, self.config.max_job_file_bytes)
        except FileNotFoundError:
            return None
        except NotARegularFile as exc:
            return self.reject(path, [Problem(f"{name} was not read: {exc}")], "it is not a regular file")
        except OSError as exc:
            return self.reject(path, [Problem(f"{name} could not be read: {exc.strerror}")], "it could not be read")
        try:
            owner = os.lstat(path).st_uid
        except FileNotFoundError:
            return None
        problem = submitter_problem(owner, self.config.submit_group, self.trusted_uids())
        if problem:
            return self.reject(path, [Problem(f"{name} is {problem}")], "its owner may not submit jobs")
        if len(data) > self.config.max_job_file_bytes:  # read stops at the cap: report the real size
            try:
                size = os.lstat(path).st_size
            except OSError:
                size = len(data)
            return self.reject(path, [size_problem(size, self.config.max_job_file_bytes)])
        if self.parsers is None:  # (in-process, for tests of the intake alone)
            return self._parsed(path, path, parse_job(data, name, self.config.validation_context()))
        # Parsed in a child process, within limits, while the loop goes on; the file waits in cur/
        # (a restart checks it again), so nothing else can take or replace it meanwhile.
        try:
            held = path if os.path.dirname(path) == self.spool.cur else self.spool.hold(path)
        except OddaemonError as exc:
            log.error("%s", user_message(exc))
            return None
        self.parsers.parse(data, name, self.config.validation_context(),
                           lambda result: self._parsed(path, held, result))
        return Verdict(None, "", "")

    def _parsed(self, origin: str, path: str, result: JobSpec | list[Problem]) -> Verdict | None:
        verdict = self._decide(path, result)
        if verdict is not None:
            self.decided[origin] = verdict
            while len(self.decided) > MAX_REMEMBERED:
                self.decided.pop(next(iter(self.decided)))
        return verdict

    def _decide(self, path: str, result: JobSpec | list[Problem]) -> Verdict | None:
        if isinstance(result, list):
            return self.reject(path, result)
        if self.preflights is None:
            return self.submit(result, path)
        names = [v.name for v in expand(result)] if is_definition(result) else [result.name]
        busy = [n for n in names if n in self.active_names() or n in self.preflights.names()]
        if busy:
            return self.reject(path, [Problem(f"a job named '{busy[0]}' is already queued, running or being "
                                              "checked; cancel it first or choose another name"
                                              + (f" (the sweep's variants are {names[0]} ... {names[-1]})"
                                                 if names[0] != result.name else ""))],
                               "the daemon cannot run it")
        try:
            held = path if os.path.dirname(path) == self.spool.cur else self.spool.hold(path)
        except OddaemonError as exc:
            log.error("%s", user_message(exc))
            return None
        # A sweep's preflight checks its first variant's values (the others differ only in those).
        self.preflights.add(replace(result, pipeline=expand(result)[0].pipeline) if is_definition(result) else result,
                            held)
        return Verdict(None, result.name, "")

    def verdict_within(self, path: str, timeout: float) -> Verdict | None:
        """The verdict on the file delivered as ``path`` if it comes within ``timeout`` (None: not yet).
        Blocks the loop that long at most: for the D-Bus submit call's reply."""
        if path not in self.decided and self.parsers is not None:
            self.parsers.settle(timeout)
        return self.decided.pop(path, None)

    def trusted_uids(self) -> set[int]:
        """Owners whose files need no group membership: root, the daemon's user, the worker user."""
        return {0, os.geteuid()} | ({self.worker_identity.uid} if self.worker_identity else set())

    def submit(self, spec: JobSpec, path: str) -> Verdict:
        """Hand a checked job to the scheduler. One that waits for (``after``) a job whose own check
        is still running is held (its file stays in cur/) until that one is accepted or rejected:
        job files dropped together may finish their checks in any order."""
        if spec.after and self._dependency_unsettled(spec, path):
            self._held.append((spec, path))
            return Verdict(None, spec.name, "")
        self._held_since.pop(path, None)
        self._release_held_soon()
        if is_definition(spec):
            return self.submit_sweep(spec, path)
        for action in self.dispatch(sch.Submit(spec, token=path)):
            if isinstance(action, sch.Rejected):
                return Verdict(False, spec.name, action.reason)
        return Verdict(True, spec.name, "")

    def _dependency_unsettled(self, spec: JobSpec, path: str) -> bool:
        """A job it waits for that the scheduler does not have may still be on its way: being checked
        (held until it is decided), or among files still read or parsed (held, for ``HOLD_SECONDS``
        at most, until those are through)."""
        active = self.active_names()
        unknown = [dep for dep in spec.after if dep not in active]
        if not unknown:
            return False
        if self.preflights is not None and not self.preflights.names().isdisjoint(unknown):
            return True
        since = self._held_since.setdefault(path, time.monotonic())
        arriving = (bool(self._queue) or (self.parsers is not None and self.parsers.pending > 0)
                    or self._other_files_in_flight(path))
        return arriving and time.monotonic() - since < HOLD_SECONDS

    def _other_files_in_flight(self, path: str) -> bool:
        """Another job file still in new/ or cur/ (not yet taken, or being parsed or checked), apart
        from the held ones: the spool itself says whether a dependency may still arrive, whatever
        stage its check is in."""
        held = {p for _, p in self._held}
        for folder in (self.spool.new, self.spool.cur):
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for name in names:
                other = os.path.join(folder, name)
                if is_candidate(name) and other != path and other not in held:
                    return True
        return False

    def _release_held_soon(self) -> None:
        if self._held and not self._release_pending:
            self._release_pending = True
            self.loop.call_later(0, self._release_held)

    def _release_held(self) -> None:
        self._release_pending = False
        held, self._held = self._held, []
        for spec, path in held:
            self.submit(spec, path)  # (held again while what it waits for is still being checked)

    def submit_sweep(self, spec: JobSpec, path: str) -> Verdict:
        """A sweep is admitted as one: every variant is first stepped through the scheduler on a copy of
        its state (pure), and one the scheduler would reject (a name taken, a model_dir in use, GPUs
        this machine lacks) rejects the file, naming it; then all are submitted, and the file is
        accepted under the sweep's name."""
        variants = expand(spec)
        state = self.state() if self.state is not None else None
        if state is not None:
            now = time.time()
            for variant in variants:
                state, actions = sch.step(state, sch.Submit(variant), now)
                refused = next((a for a in actions if isinstance(a, sch.Rejected)), None)
                if refused is not None:
                    return self.reject(path, [Problem(f"sweep '{spec.name}' ({len(variants)} variants, "
                                                      f"{variants[0].name} ... {variants[-1].name}): variant "
                                                      f"{variant.name}: {refused.reason}")],
                                       "the daemon cannot run it")
        refused_names = []
        for variant in variants:
            if any(isinstance(a, sch.Rejected) for a in self.dispatch(sch.Submit(variant))):
                refused_names.append(variant.name)  # (the check above makes this the rare race)
        if refused_names:
            log.error("sweep %s: variants %s were not accepted", spec.name, ", ".join(refused_names))
        try:
            self.spool.accept(path, spec.name)
        except OddaemonError as exc:
            log.error("%s", user_message(exc))
        log.info("sweep %s: %d variants submitted (%s ... %s)", spec.name, len(variants), variants[0].name,
                 variants[-1].name)
        return Verdict(True, spec.name, "")

    def reject(self, path: str, problems: list[Problem],
               because: str = "it is not a valid oddaemon job spec") -> Verdict:
        self.rejected_total += 1
        self.on_rejected()
        self._release_held_soon()
        text = render_error_file(os.path.basename(path), problems, because)
        try:
            _, error_path = self.spool.reject(path, text)
            log.warning("rejected %s -> %s: %s", path, error_path, "; ".join(p.render() for p in problems))
        except OddaemonError as exc:
            log.error("%s (the file stays where it is)", user_message(exc))
        return Verdict(False, "", text)
