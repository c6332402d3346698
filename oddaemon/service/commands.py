"""The daemon's command surface, shared by the control socket (CLI) and D-Bus.

Every method runs on the main-loop thread. What cannot be done raises ``CommandError(kind, message)``
(``oddaemon.core.errors``); transports turn it into their own error form through the one conversion
point there (``error_reply`` for a JSON reply, ``dbus_error_name`` for a D-Bus error). ``Commands``
knows the daemon only through ``DaemonPort``: exactly what it uses of it.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from oddaemon import __version__
from oddaemon.core import scheduler as sch
from oddaemon.core.errors import CommandError, ErrorKind, error_reply
from oddaemon.core.sweep import sweep_summary, sweep_view
from oddaemon.core.views import list_row

if TYPE_CHECKING:
    from oddaemon.core.config import Config
    from oddaemon.service.intake import Verdict


log = logging.getLogger("oddaemon.service.commands")

# How long a D-Bus submit waits for the parser's verdict before it answers "validating" (the
# verdict then lands in the spool as for any file): the loop never waits longer on intake.
VERDICT_WAIT_SECONDS = 0.05


class SpoolDelivery(Protocol):
    def deliver(self, data: bytes, name: str) -> str: ...


class VerdictWait(Protocol):
    def verdict_within(self, path: str, timeout: float) -> Verdict | None: ...


@runtime_checkable
class DaemonPort(Protocol):
    """What ``Commands`` uses of the daemon (``oddaemon.service.daemon.Daemon`` has it)."""

    @property
    def state(self) -> sch.State: ...
    @property
    def config(self) -> Config: ...
    @property
    def spool(self) -> SpoolDelivery: ...
    @property
    def intake_(self) -> VerdictWait: ...

    def intake(self, path: str) -> Verdict | None: ...
    def dispatch(self, event: sch.Event) -> list[sch.Action]: ...
    def views(self, shown: int = ...) -> list[dict]: ...
    def view(self, name: str, shown: int = ...) -> dict: ...
    def gpu_holders(self) -> dict[int, tuple[str, str]]: ...
    def heavy_modules_loaded(self) -> list[str]: ...
    def reload(self) -> None: ...


class Commands:
    def __init__(self, daemon: DaemonPort):
        self.daemon = daemon

    # ---- read-only
    @property
    def version(self) -> str:
        return __version__

    def queue_length(self) -> int:
        return len(self.daemon.state.queue())

    def gpus(self) -> dict:
        """{"total": [ids], "free": [ids], "holders": {id: (job name, "train" | "eval")}}"""
        state = self.daemon.state
        return {"total": list(state.inventory), "free": list(state.free_gpus()), "holders": self.daemon.gpu_holders()}

    def list_jobs(self) -> list[dict]:
        return self.daemon.views()

    def list_rows(self) -> list[dict]:
        """What ``oddaemon list`` shows of every job (``core.views.LIST_COLUMNS``): a few hundred bytes
        a job where a whole view is kilobytes (its newest checkpoints, their metrics, its history)."""
        return [list_row(view) for view in self.daemon.views(shown=0)]

    def get_job(self, name: str) -> dict:
        if name in self.daemon.state.jobs:
            return self.daemon.view(name)
        raise CommandError(ErrorKind.NOT_FOUND, f"no job named '{name}'")

    def sweep(self, name: str) -> dict:
        """A sweep's table (``core.sweep.sweep_view``) from its variants' views."""
        variants = [j.name for j in self.daemon.state.jobs.values() if j.spec.sweep.of == name]
        if not variants:
            raise CommandError(ErrorKind.NOT_FOUND, f"no sweep named '{name}'")
        return sweep_view(name, [self.daemon.view(v, shown=0) for v in variants])

    def sweeps(self) -> list[dict]:
        """Every sweep in one line each, in the order its first variant was submitted."""
        names = dict.fromkeys(j.spec.sweep.of for j in sorted(self.daemon.state.jobs.values(), key=lambda j: j.seq)
                              if j.spec.sweep.of)
        return [sweep_summary(self.sweep(name)) for name in names]

    # ---- mutating
    def submit_text(self, text: str | bytes, filename: str = "submitted.toml") -> dict:
        """Validate exactly as the spool does; the text is kept as a spool file either way. A file
        the daemon does not take (fails validation, or the scheduler rejects it) is ``invalid``."""
        data = text.encode() if isinstance(text, str) else text
        base = os.path.basename(filename) or "submitted.toml"
        if not base.endswith(".toml"):
            base += ".toml"
        path = self.daemon.spool.deliver(data, f"{base[:-5]}.{uuid.uuid4().hex[:8]}.toml")
        verdict = self.daemon.intake(path)
        if verdict is not None and verdict.accepted is None and not verdict.name:  # being parsed: a moment
            verdict = self.daemon.intake_.verdict_within(path, VERDICT_WAIT_SECONDS) or verdict
        if verdict is None or verdict.accepted is False:
            raise CommandError(ErrorKind.INVALID,
                               verdict.message if verdict else "the file vanished before it could be read")
        if verdict.accepted is None:
            return {"name": verdict.name, "state": "validating", "queue_position": None}
        return self._submitted(verdict.name)

    def submit_file(self, path: str) -> dict:
        try:
            with open(path, "rb") as f:
                data = f.read(self.daemon.config.max_job_file_bytes + 1)
        except OSError as exc:
            raise CommandError(ErrorKind.INVALID, f"cannot read {path}: {exc.strerror}") from None
        return self.submit_text(data, os.path.basename(path))

    def _submitted(self, name: str) -> dict:
        if name not in self.daemon.state.jobs:  # a sweep: its variants were submitted
            view = self.sweep(name)
            return {"name": name, "state": view["state"], "queue_position": None,
                    "variants": [row["name"] for row in view["rows"]]}
        job = self.daemon.state.jobs[name]
        return {"name": name, "state": job.state.value, "queue_position": self.daemon.state.queue_position(name)}

    def cancel(self, name: str) -> str:
        return self._command(sch.Cancel(name), name)

    def finish(self, name: str) -> str:
        return self._command(sch.Finish(name), name)

    def retry(self, name: str) -> str:
        return self._command(sch.Retry(name), name)

    def set_priority(self, name: str, priority: object) -> dict:
        """The job's state and queue position once its priority is ``priority``."""
        state = self._command(sch.SetPriority(name, priority), name)  # type: ignore[arg-type]
        return {"state": state, "priority": self.daemon.state.jobs[name].spec.priority,
                "queue_position": self.daemon.state.queue_position(name)}

    def _command(self, event: sch.Event, name: str) -> str:
        refused = [a for a in self.daemon.dispatch(event) if isinstance(a, sch.Refused)]
        if refused:
            raise CommandError(refused[0].kind, refused[0].reason)
        return self.daemon.state.jobs[name].state.value

    def reload(self) -> None:
        self.daemon.reload()

    # ---- the control socket's JSON requests
    def handle_request(self, request: dict) -> dict:
        cmd, name = request.get("cmd"), request.get("name")
        try:
            return self._answer(cmd, name, request)
        except CommandError as exc:
            return error_reply(exc)
        except Exception as exc:
            log.exception("control request %r failed", cmd)
            return error_reply(exc, logged=True)

    def _answer(self, cmd: object, name: object, request: dict) -> dict:
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "version": self.version,
                    "heavy_modules": self.daemon.heavy_modules_loaded()}
        if cmd == "list":
            jobs = self.list_rows() if request.get("brief") is True else self.list_jobs()
            return {"ok": True, "jobs": jobs, "gpus": list(self.daemon.state.inventory),
                    "free_gpus": list(self.daemon.state.free_gpus()),
                    "queue": [j.name for j in self.daemon.state.queue()]}
        if cmd == "submit":
            return {"ok": True, **self.submit_text(str(request.get("text", "")), str(request.get("filename", "")))}
        if cmd == "reload":
            self.reload()
            return {"ok": True}
        if cmd == "sweep":
            return {"ok": True, "sweep": self.sweep(name)} if isinstance(name, str) else \
                {"ok": True, "sweeps": self.sweeps()}
        if not isinstance(name, str):
            raise CommandError(ErrorKind.INVALID, f"'{cmd}' needs a job name")
        if cmd == "status":
            return {"ok": True, "job": self.get_job(name)}
        if cmd == "cancel":
            return {"ok": True, "state": self.cancel(name)}
        if cmd == "finish":
            return {"ok": True, "state": self.finish(name)}
        if cmd == "retry":
            return {"ok": True, "state": self.retry(name)}
        if cmd == "priority":
            return {"ok": True, **self.set_priority(name, request.get("priority"))}
        raise CommandError(ErrorKind.INVALID, f"unknown command {cmd!r}")
