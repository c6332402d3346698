"""Exporting a job's best checkpoint to ``model_dir/exported`` without races (the I/O side).

Rules (README "Checkpoint evaluation"):

* An export reads checkpoint files that nothing else removes while it runs: before its worker
  starts, the checkpoint is hard-linked into ``model_dir/.oddaemon/export/`` (its own pin, apart
  from the evaluation pins and ``best/``, which a newer best replaces) and the pin is released when
  the worker exits.
* At most one export runs per job. A newer best that arrives meanwhile waits for it; a waiting
  best that an even newer one replaces before it started is dropped and logged at INFO as
  superseded. Nothing is stopped half-way, so no export fails because the best moved.
* ``[eval] export_when``: ``"end"`` (the default) exports once, the final best, when training and
  every evaluation are over: on a CPU-only host an export costs a minute or more of CPU that the
  trainer would otherwise use, and ``best/`` already keeps the best checkpoint during training.
  ``"each_best"`` exports each new best as it comes (one in flight, then the newest).
* The worker writes the SavedModel into ``exported.tmp`` and renames it into place, with
  ``export.json`` inside (checkpoint, step, metric, value), so ``exported/`` is always one whole
  export and says which one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon.adapters.pins import remove_checkpoint
from oddaemon.adapters.store import atomic_write_json
from oddaemon.core.errors import OperationError
from oddaemon.core.evalbook import CheckpointEval, EvalPolicy

log = logging.getLogger("oddaemon.service.exports")

EXPORT_INFO = "export.json"


@dataclass(frozen=True)
class ExportRequest:
    n: int  # ckpt-N
    prefix: str  # the export's own pinned prefix
    info: dict  # what export.json will say (checkpoint, step, metric, value, ...)


class JobExports:
    """One job's exports. ``start(prefix, output, info_path)`` starts the worker (False: it could not)."""

    def __init__(self, name: str, model_dir: str, start: Callable[[str, str, str], bool]):
        self.name = name
        self.model_dir = model_dir
        self.output = os.path.join(model_dir, "exported")
        self.pins = os.path.join(model_dir, ".oddaemon", "export")
        self._start = start
        self.running: ExportRequest | None = None
        self.waiting: ExportRequest | None = None
        self.tried: set[int] = set()  # checkpoints whose export ended, well or not (never tried twice at the end)
        shutil.rmtree(self.pins, ignore_errors=True)  # an export killed with an earlier daemon

    @property
    def idle(self) -> bool:
        return self.running is None and self.waiting is None

    def exported_checkpoint(self) -> int | None:
        """ckpt-N of the export in ``exported/`` now, from its export.json (None: none or unreadable)."""
        try:
            with open(os.path.join(self.output, EXPORT_INFO), "rb") as f:
                return int(str(json.loads(f.read())["checkpoint"]).rsplit("-", 1)[1])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    # ---- the hand-off from evaluation
    def offer_best(self, c: CheckpointEval, policy: EvalPolicy) -> None:
        """Export the best checkpoint ``c`` (evaluated; its files in ``model_dir/best``), unless it is
        the untrained step-0 checkpoint."""
        if c.step == 0:  # TF writes it before the first step, before the model's variables all exist
            log.info("job %s: not exporting ckpt-%d: it is the untrained step-0 checkpoint, which does not hold "
                     "the whole model", self.name, c.n)
            self.tried.add(c.n)
            return
        self.want(c.n, os.path.join(self.model_dir, "best", f"ckpt-{c.n}"), {
            "job": self.name, "checkpoint": f"ckpt-{c.n}", "step": c.step, "metric": policy.metric,
            "value": c.metrics.get(policy.metric), "higher_is_better": policy.higher_is_better,
            "metrics": c.metrics, "evaluated_at": c.finished_at})

    def offer_final_best(self, c: CheckpointEval, policy: EvalPolicy) -> None:
        """All evaluations are over: the final best is exported (whatever ``export_when`` says, after a
        running export), unless its export ended already or ``exported/`` holds it."""
        if c.n not in self.tried and self.exported_checkpoint() != c.n:
            self.offer_best(c, policy)

    def want(self, n: int, source_prefix: str, info: dict) -> None:
        """Export checkpoint ``n`` (files at ``source_prefix``) when no export runs, else after it."""
        if (self.running is not None and self.running.n == n) or (self.waiting is not None and self.waiting.n == n):
            return
        prefix = self._pin(n, source_prefix)
        if prefix is None:
            return
        if self.waiting is not None:
            log.info("job %s: export of ckpt-%d superseded by ckpt-%d before it started", self.name,
                     self.waiting.n, n)
            self._release(self.waiting.n)
        self.waiting = ExportRequest(n, prefix, info)
        if self.running is not None:
            log.info("job %s: export of ckpt-%d waits for the running export of ckpt-%d", self.name, n,
                     self.running.n)
        self._start_waiting()

    def _start_waiting(self) -> None:
        if self.running is not None or self.waiting is None:
            return
        request, self.waiting = self.waiting, None
        info_path = request.prefix + ".export.json"
        try:
            atomic_write_json(info_path, request.info)
        except OperationError as exc:  # "cannot write PATH: cause"
            self._gave_up(request, str(exc))
            return
        if self._start(request.prefix, self.output, info_path):
            self.running = request
            log.info("job %s: exporting ckpt-%d (step %s) to %s", self.name, request.n, request.info.get("step"),
                     self.output)
        else:
            self._gave_up(request, "the export worker could not be started (see the daemon log)")

    def exited(self, returncode: int, detail: str) -> None:
        request, self.running = self.running, None
        if request is None:
            return
        self._release(request.n)
        self.tried.add(request.n)
        if returncode == 0:
            log.info("job %s: exported ckpt-%d to %s", self.name, request.n, self.output)
        else:
            log.error("job %s: export of ckpt-%d failed: %s", self.name, request.n,
                      detail or f"exit status {returncode}")
        self._start_waiting()

    def stop(self) -> None:
        """The job's evaluation is being torn down: drop what waits (a running worker is stopped by
        the executor with the job's other workers)."""
        if self.waiting is not None:
            self._release(self.waiting.n)
            self.waiting = None

    def _gave_up(self, request: ExportRequest, why: str) -> None:
        self._release(request.n)
        self.tried.add(request.n)
        log.error("job %s: export of ckpt-%d failed: %s", self.name, request.n, why)

    # ---- the export's own pin
    def _pin(self, n: int, source_prefix: str) -> str | None:
        directory, stem = os.path.split(source_prefix)
        try:
            os.makedirs(self.pins, exist_ok=True)
            names = [x for x in os.listdir(directory) if x.startswith(stem + ".")]
            if stem + ".index" not in names:
                raise FileNotFoundError(f"{source_prefix}.index does not exist")
            for name in names:
                target = os.path.join(self.pins, f"ckpt-{n}" + name[len(stem):])
                if not os.path.exists(target):
                    os.link(os.path.join(directory, name), target)
        except OSError as exc:
            self._release(n)
            log.error("job %s: cannot pin ckpt-%d for its export in %s: %s", self.name, n, self.pins,
                      exc.strerror or exc)
            return None
        return os.path.join(self.pins, f"ckpt-{n}")

    def _release(self, n: int) -> None:
        remove_checkpoint(self.pins, n)
