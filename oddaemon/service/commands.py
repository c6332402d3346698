"""The daemon's command surface, shared by the control socket (CLI) and D-Bus.

Every method runs on the main-loop thread. Refusals raise ``CommandError`` with a message for
the user; transports turn it into their own error form (a JSON ``error``, a D-Bus error).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING

from oddaemon import __version__
from oddaemon.core import scheduler as sch
from oddaemon.core.errors import OddaemonError, user_message

if TYPE_CHECKING:
    from oddaemon.service.daemon import Daemon


log = logging.getLogger("oddaemon.service.commands")

# How long a D-Bus submit waits for the parser's verdict before it answers "validating" (the
# verdict then lands in the spool as for any file): the loop never waits longer on intake.
VERDICT_WAIT_SECONDS = 0.05


class CommandError(OddaemonError):
    pass


class Commands:
    def __init__(self, daemon: "Daemon"):
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

    def get_job(self, name: str) -> dict:
        if name in self.daemon.state.jobs:
            return self.daemon.view(name)
        raise CommandError(f"no job named '{name}'")

    # ---- mutating
    def submit_text(self, text: str | bytes, filename: str = "submitted.toml") -> dict:
        """Validate exactly as the spool does; the text is kept as a spool file either way."""
        data = text.encode() if isinstance(text, str) else text
        base = os.path.basename(filename) or "submitted.toml"
        if not base.endswith(".toml"):
            base += ".toml"
        path = self.daemon.spool.deliver(data, f"{base[:-5]}.{uuid.uuid4().hex[:8]}.toml")
        verdict = self.daemon.intake(path)
        if verdict is not None and verdict.accepted is None and not verdict.name:  # being parsed: a moment
            verdict = self.daemon.intake_.verdict_within(path, VERDICT_WAIT_SECONDS) or verdict
        if verdict is None or verdict.accepted is False:
            raise CommandError(verdict.message if verdict else "the file vanished before it could be read")
        if verdict.accepted is None:
            return {"name": verdict.name, "state": "validating", "queue_position": None}
        return self._submitted(verdict.name)

    def submit_file(self, path: str) -> dict:
        try:
            with open(path, "rb") as f:
                data = f.read(self.daemon.config.max_job_file_bytes + 1)
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        return self.submit_text(data, os.path.basename(path))

    def _submitted(self, name: str) -> dict:
        job = self.daemon.state.jobs[name]
        return {"name": name, "state": job.state.value, "queue_position": self.daemon.state.queue_position(name)}

    def cancel(self, name: str) -> str:
        return self._command(sch.Cancel(name), name)

    def retry(self, name: str) -> str:
        return self._command(sch.Retry(name), name)

    def _command(self, event: sch.Event, name: str) -> str:
        refused = [a for a in self.daemon.dispatch(event) if isinstance(a, sch.Refused)]
        if refused:
            raise CommandError(refused[0].reason)
        return self.daemon.state.jobs[name].state.value

    def reload(self) -> None:
        self.daemon.reload()

    # ---- the control socket's JSON requests
    def handle_request(self, request: dict) -> dict:
        cmd, name = request.get("cmd"), request.get("name")
        try:
            if cmd == "ping":
                return {"ok": True, "pid": os.getpid(), "version": self.version,
                        "heavy_modules": self.daemon.heavy_modules_loaded()}
            if cmd == "list":
                return {"ok": True, "jobs": self.list_jobs(), "gpus": list(self.daemon.state.inventory),
                        "free_gpus": list(self.daemon.state.free_gpus()),
                        "queue": [j.name for j in self.daemon.state.queue()]}
            if cmd == "submit":
                return {"ok": True, **self.submit_text(str(request.get("text", "")), str(request.get("filename", "")))}
            if cmd == "reload":
                self.reload()
                return {"ok": True}
            if not isinstance(name, str):
                return {"ok": False, "error": f"'{cmd}' needs a job name"}
            if cmd == "status":
                return {"ok": True, "job": self.get_job(name)}
            if cmd == "cancel":
                return {"ok": True, "state": self.cancel(name)}
            if cmd == "retry":
                return {"ok": True, "state": self.retry(name)}
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - every request gets an answer, never silence
            log.exception("control request %r failed", cmd)
            return {"ok": False, "error": user_message(exc)}
