"""``python -m oddaemon.adapters.parser_child``: where job files are parsed and validated, apart from the
daemon's event loop and within limits.

One JSON line in per file, one JSON line out, on stdin/stdout::

    {"id": 7, "filename": "job.toml", "data": "<base64>", "context": {"allowed_roots": [...], ...}}
    {"id": 7, "spec": {...JobSpec.to_dict()...}}  or  {"id": 7, "problems": [{...Problem...}, ...]}

Limits, whatever the file's structure: ``CPU_SECONDS`` of CPU per file (a virtual-time timer
interrupts the parse) and an address space of ``MEMORY_BYTES`` for the whole process (a parse that
needs more fails with MemoryError). A file that hits one is rejected with the limit it hit; after a
MemoryError the process exits and the daemon starts a fresh one. The daemon adds a wall-clock
limit and kills a child that misses it (``oddaemon.adapters.parsers``). EOF on stdin ends the process.

Imports only the pure spec code (no tensorflow, no daemon).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import resource
import signal
import sys

from oddaemon.core.checks import Problem
from oddaemon.core.job_validation import ValidationContext, parse_job

CPU_SECONDS = 2.0
MEMORY_BYTES = 256 * 1024 * 1024


class CpuLimit(BaseException):  # not an Exception: no "except Exception" on the way swallows it
    pass


def _on_cpu_limit(signum, frame) -> None:
    raise CpuLimit()


def limits_problem(which: str) -> Problem:
    if which == "cpu":
        return Problem(f"parsing this file took more than {CPU_SECONDS:g} s of CPU, the limit for one job file; "
                       "a job file is a few dozen keys: simplify its structure")
    return Problem(f"parsing this file needed more than {MEMORY_BYTES // (1024 * 1024)} MiB of memory, the limit "
                   "for one job file; a job file is a few dozen keys: simplify its structure")


def decide(request: dict) -> dict:
    """Parse and validate one request's file; the reply (never raises CpuLimit: it is the reply)."""
    data = base64.b64decode(request["data"])
    ctx = ValidationContext(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["context"].items()})
    signal.setitimer(signal.ITIMER_VIRTUAL, CPU_SECONDS)
    try:
        result = parse_job(data, str(request["filename"]), ctx)
    except CpuLimit:
        result = [limits_problem("cpu")]
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
    if isinstance(result, list):
        return {"id": request["id"], "problems": [dataclasses.asdict(p) for p in result]}
    return {"id": request["id"], "spec": result.to_dict()}


def main() -> int:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    signal.signal(signal.SIGVTALRM, _on_cpu_limit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's Ctrl-C is the daemon's; EOF ends us
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            reply = decide(request)
        except MemoryError:
            reply = {"id": request.get("id"), "problems": [dataclasses.asdict(limits_problem("memory"))]}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            return 3  # start afresh: a MemoryError can leave the interpreter in a poor state
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
