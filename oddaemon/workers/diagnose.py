"""Name a train worker's own failure in one line the daemon reads (``oddaemon-failure: KIND: ...``,
see ``oddaemon.core.failures``), with what the exception alone does not say: which input file holds the
corrupt record, and at which record.

Called from ``__main__`` with the exception that ends the worker; it never raises.
"""

from __future__ import annotations

import glob
import re
import time

from oddaemon.core.failures import marker_line

SCAN_SECONDS = 300.0  # at most this long looking for the corrupt file


def _first_line(exc: BaseException) -> str:
    """The line of TF's message that says what happened. In graph mode TF 2.15 says "Graph
    execution error:", then "Detected at node X defined at (most recent call last):" and the
    frames, then the cause ("corrupted record at 33415"), then the node: skip to the cause."""
    return essence(getattr(exc, "message", None) or str(exc)) or type(exc).__name__


def essence(message: str) -> str:
    """The first line of a TF error message that is neither its graph-mode preamble nor a frame."""
    for line in message.strip().splitlines():
        line = line.strip()
        if (not line or line == "Graph execution error:" or line.startswith(("Detected at node", "File \"", "[["))
                or line.endswith("(most recent call last):")):
            continue
        line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)  # eager mode's prefix
        return re.sub(r"\s+name:\s*$", "", line)[:300]
    return ""


def input_patterns(job: dict) -> list[str]:
    """The train input patterns: the job's [pipeline] edit, else the effective pipeline.config's."""
    spec = job["spec"]
    edit = (spec.get("pipeline") or {}).get("train_input_path")
    if edit:
        return [edit] if isinstance(edit, str) else list(edit)
    try:
        from oddaemon.workers import pipeline

        proto = pipeline.effective_pipeline(spec)
        return list(proto.train_input_reader.tf_record_input_reader.input_path)
    except Exception:  # noqa: BLE001 - best effort: the marker then names no file
        return []


def find_corrupt_record(patterns: list[str], budget: float = SCAN_SECONDS) -> tuple[str, int] | None:
    """(file, index of the first unreadable record) in the first damaged TFRecord file, or None."""
    import tensorflow as tf

    deadline = time.monotonic() + budget
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            count = 0
            try:
                for _ in tf.data.TFRecordDataset(path):
                    count += 1
                    if time.monotonic() > deadline:
                        return None
            except (tf.errors.DataLossError, tf.errors.OpError):
                return path, count
    return None


def count_records(patterns: list[str], limit: int = 1) -> int:
    import tensorflow as tf

    total = 0
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            total += sum(1 for _ in tf.data.TFRecordDataset(path).take(limit - total))
            if total >= limit:
                return total
    return total


def oom_marker(detail: str) -> str:
    return marker_line("oom", f"out of GPU memory ({detail}): lower [pipeline] batch_size, or set [train] "
                              "oom_retry_halve_batch = true")


def corrupt_input_marker(found: tuple[str, int] | None, detail: str) -> str:
    where = f" in {found[0]} at record {found[1]}" if found else ""
    return marker_line("input", f"corrupt input record{where} ({detail}): replace the file or drop it from "
                                "[pipeline] train_input_path, then oddaemon retry")


def _raised_in(exc: BaseException, function: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def fine_tune_failure(job: dict | None, exc: BaseException) -> str | None:
    """A failure while restoring the fine-tune checkpoint, told apart: a config problem (the version
    field) or a checkpoint that does not fit the model."""
    if not _raised_in(exc, "load_fine_tune_checkpoint"):
        return None
    spec = (job or {}).get("spec") or {}
    prefix = (spec.get("pipeline") or {}).get("fine_tune_checkpoint") or "the fine_tune_checkpoint"
    if "Checkpoint version should be V2" in str(exc):
        return marker_line("checkpoint", "pipeline.config problem: train_config.fine_tune_checkpoint_version is "
                                         "not V2, which model_main_tf2 requires: change it to "
                                         "`fine_tune_checkpoint_version: V2`, then oddaemon retry")
    return marker_line("checkpoint", f"the fine-tune checkpoint {prefix} does not fit the model "
                                     f"({_first_line(exc)}): it must come from the same architecture (and "
                                     "fine_tune_checkpoint_type \"detection\" for a detection checkpoint); the "
                                     "config itself is fine")


def explain(job: dict | None, exc: BaseException) -> str | None:
    """The marker line for ``exc``, or None when it is nothing this module knows."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    try:
        fine_tune = fine_tune_failure(job, exc)
        if fine_tune:
            return fine_tune
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            return oom_marker(_first_line(exc))
        if isinstance(exc, tf.errors.DataLossError) and job is not None:
            found = find_corrupt_record(input_patterns(job))
            return corrupt_input_marker(found, _first_line(exc))
        if isinstance(exc, (tf.errors.OutOfRangeError, StopIteration)) and job is not None:
            patterns = input_patterns(job)
            if patterns and count_records(patterns) == 0:
                return marker_line("input", f"no input records: {', '.join(patterns)} hold no records; check "
                                            "[pipeline] train_input_path, then oddaemon retry")
    except Exception:  # noqa: BLE001 - diagnosing must never hide the original error
        return None
    return None
