"""Turn a worker's exit status and the tail of its log into a failure a user can act on.

Workers that recognise their own failure print one line ``oddaemon-failure: KIND: message``
(see ``oddaemon.workers.diagnose``); that line wins. Otherwise the log tail is matched against what
TensorFlow and the Object Detection API print for each kind. ``retry`` says whether restarting
could help: a NaN loss, a corrupt or empty input and a bad fine-tune checkpoint fail the same way
every time, so the job fails at once instead of burning its restarts.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

# The kinds, as exported in metrics (a bounded label set) and shown in `oddaemon status`.
KINDS = ("oom", "nan", "input", "checkpoint", "gpu", "storage", "hung", "signal", "exit", "refused",
         # ended by Slurm (core/slurm.py), or Slurm would not take or track the worker
         "time-limit", "node-fail", "preempted", "host-oom", "slurm",
         # the worker saved a checkpoint on the cluster's warning signal and asks to be resubmitted
         "requeued")
FATAL_KINDS = ("nan", "input", "checkpoint", "refused")  # "refused": the daemon would not start it
MARKER = "oddaemon-failure:"


@dataclass(frozen=True)
class Failure:
    kind: str  # one of KINDS
    message: str  # a complete sentence for the user: what happened and what to change
    step: int | None = None

    @property
    def retry(self) -> bool:
        return self.kind not in FATAL_KINDS

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict | None) -> Failure | None:
        if not d:
            return None
        return cls(str(d.get("kind", "exit")), str(d.get("message", "")), d.get("step"))


_OOM = re.compile(r"ResourceExhaustedError|OOM when allocating|CUDA_ERROR_OUT_OF_MEMORY|out of memory",
                  re.IGNORECASE)
_OOM_SHAPE = re.compile(r"OOM when allocating tensor with shape\s*\[([0-9, ]+)\]")
_NAN = re.compile(r"(?:Loss|loss)[^\n]*\bNaN\b|NaN loss|loss became NaN|Tensor had NaN values", re.IGNORECASE)
_STEP = re.compile(r"\bstep (\d+)", re.IGNORECASE)
_CORRUPT = re.compile(r"DataLossError|corrupted record|truncated record|Data loss:", re.IGNORECASE)
_NO_RECORDS = re.compile(r"OutOfRangeError[^\n]*End of sequence|input_path[^\n]*(?:matched no files|no files)",
                         re.IGNORECASE)
_CHECKPOINT = re.compile(r"Unsuccessful TensorSliceReader|fine_tune_checkpoint|Checkpoint was expecting|"
                         r"Unresolved object in checkpoint|Some objects had attributes which were not restored|"
                         r"NotFoundError[^\n]*\.index", re.IGNORECASE)
_GPU = re.compile(r"CUDA_ERROR_(?!OUT_OF_MEMORY)\w+|cudaError\w+|GPU is lost|failed call to cuInit|"
                  r"no CUDA-capable device|Xid", re.IGNORECASE)
_STORAGE = re.compile(r"Read-only file system|No space left on device|Disk quota exceeded|Permission denied")
_STORAGE_PATH = re.compile(r"'(/[^']+)'|\"(/[^\"]+)\"|(?<![\w/])(/[^\s:;,'\"]+)")
_FILE = re.compile(r"(/[^\s'\",:]+\.(?:tfrecords?|record|tfrecord-\S+|[0-9]{5}-of-[0-9]{5}))")


def marker_line(kind: str, message: str) -> str:
    """The line a worker prints (on stderr) to name its own failure."""
    return f"{MARKER} {kind}: {' '.join(message.split())}"


def parse_marker(line: str) -> Failure | None:
    index = line.find(MARKER)
    if index < 0:
        return None
    kind, _, message = line[index + len(MARKER):].strip().partition(":")
    kind = kind.strip()
    if kind not in KINDS or not message.strip():
        return None
    step = _STEP.search(message)
    return Failure(kind, message.strip(), int(step.group(1)) if step else None)


# Each role's failures in its own words: an export or evaluation failure never talks about the
# fine-tune checkpoint or the batch size, which are training's.
ROLE_SUBJECT = {"eval": "the evaluation", "export": "the export", "preflight": "the preflight check"}
_ERROR_LINE = re.compile(r"oddaemon\.workers [\w-]+: (?P<worker>.+)|"
                         r"^(?:[\w.]+\.)?(?P<exception>\w+(?:Error|Exception)\b.*)$")


def last_error_line(tail: list[str]) -> str | None:
    """The worker's own last error line: its ``oddaemon.workers ROLE: ...`` line, else the last
    exception line of a traceback (TF's message)."""
    for line in reversed(tail[-200:]):
        m = _ERROR_LINE.search(line.strip())
        if m:
            text = next(g for g in m.groups() if g)
            return " ".join(text.split())[:500]
    return None


def _classify_role(role: str, returncode: int, tail: list[str]) -> Failure | None:
    subject = ROLE_SUBJECT.get(role, f"the {role} worker")
    for line in reversed(tail[-200:]):
        marked = parse_marker(line)
        if marked is not None:
            return Failure(marked.kind, f"{subject} failed: {marked.message}", marked.step)
    if returncode == 0:
        return None
    text = "\n".join(tail[-80:])
    line = last_error_line(tail)
    said = f": {line}" if line else f" (see `oddaemon logs --role {role} NAME`)"
    storage = _STORAGE.search(text)
    if storage:
        return Failure("storage", f"{subject} failed: {storage.group(0)}{said}")
    if _OOM.search(text):
        return Failure("oom", f"{subject} ran out of memory{said}")
    if returncode < 0:  # killed from outside: whatever it printed last is no error of its own
        return Failure("signal", f"{subject} was {describe_returncode(returncode, diagnosis=True)}")
    return Failure("exit", f"{subject} failed ({describe_returncode(returncode)}){said}")


def classify_failure(returncode: int, tail: list[str], role: str = "train") -> Failure | None:
    """The failure that ended a worker, or None when nothing specific is known (and it exited 0).
    Training gets the detailed diagnosis below; the other roles their own words (``_classify_role``)."""
    if role != "train":
        return _classify_role(role, returncode, tail)
    for line in reversed(tail[-200:]):
        marked = parse_marker(line)
        if marked is not None:
            return marked
    text = "\n".join(tail[-80:])
    storage = _STORAGE.search(text)
    if storage:  # before out-of-memory: TF reports a full disk as ResourceExhaustedError too
        line = text[text.rfind("\n", 0, storage.start()) + 1:text.find("\n", storage.end()) % (len(text) + 1)]
        path = _STORAGE_PATH.search(line)
        where = f" on {next(g for g in path.groups() if g)}" if path else ""
        return Failure("storage", f"{storage.group(0)}{where}: free disk space, or fix the permissions or the "
                                  "mount of that path (a restart resumes from the latest checkpoint once it "
                                  "works; a failed job: oddaemon retry)")
    if _OOM.search(text):
        shape = _OOM_SHAPE.search(text)
        where = f" (allocating a tensor of shape [{shape.group(1)}])" if shape else ""
        return Failure("oom", f"out of GPU memory{where}: lower [pipeline] batch_size, or set "
                              "[train] oom_retry_halve_batch = true")
    nan = _NAN.search(text)
    if nan:
        step = _STEP.search(text[nan.start():nan.end() + 80]) or _STEP.search(nan.group(0))
        at = int(step.group(1)) if step else None
        return Failure("nan", "loss became NaN" + (f" at step {at}" if at is not None else "")
                       + ": lower [pipeline] learning_rate_base (or warmup_learning_rate), then oddaemon retry",
                       at)
    if _CORRUPT.search(text):
        file = _FILE.search(text)
        where = f" in {file.group(1)}" if file else ""
        return Failure("input", f"corrupt input record{where}: the TFRecord file is damaged or not a TFRecord; "
                                "replace it or drop it from [pipeline] train_input_path, then oddaemon retry")
    if _NO_RECORDS.search(text):
        return Failure("input", "no input records: train_input_path matches files that hold no records; "
                                "check [pipeline] train_input_path, then oddaemon retry")
    if _CHECKPOINT.search(text):
        return Failure("checkpoint", "the fine-tune checkpoint is missing or does not fit the model: check "
                                     "[pipeline] fine_tune_checkpoint and fine_tune_checkpoint_type (\"detection\" "
                                     "for Model Zoo detection checkpoints) and that it is the same architecture, "
                                     "then oddaemon retry")
    if _GPU.search(text):
        return Failure("gpu", f"GPU error ({_GPU.search(text).group(0)}): check nvidia-smi and `journalctl -k` "
                              "for Xid errors")
    if returncode < 0:
        return Failure("signal", describe_returncode(returncode, diagnosis=True))
    if returncode != 0:
        return Failure("exit", describe_returncode(returncode))
    return None


def describe_returncode(returncode: int, diagnosis: bool = False) -> str:
    """How a process ended, in words (the one place that says it): "exit status 3" or "killed by
    signal SIGTERM" (``returncode`` negative: killed by that signal, as subprocess reports it). As a
    failure's ``diagnosis``: "killed by SIGTERM", and a SIGKILL names the likely killer."""
    if returncode >= 0:
        return f"exit status {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    if not diagnosis:
        return f"killed by signal {name}"
    hint = " (the kernel's OOM killer? see `journalctl -k`)" if signum == signal.SIGKILL else ""
    return f"killed by {name}{hint}"
