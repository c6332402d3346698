"""The stand-in's files, written and read the way TF writes and reads them, since the daemon's
timing depends on it:

* ``CheckpointManager``: like tf.train.CheckpointManager: numbered by save count, the data shards
  first, then the index, then the ``checkpoint`` state file, then the sweep past ``max_to_keep``.
* ``SummaryWriter``: like ``tf.summary.create_file_writer``: events queue in memory and reach the
  file every ``max_queue`` events or ``flush_seconds``, and at close; the file exists (with its
  file-version record) from the start.
* ``check_inputs``: reads every record of the train inputs as TF's TFRecordDataset would, and
  reports the first damaged one (file, record, byte offset); a glob that matches nothing is an error.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import time

from oddaemon.formats.tfevents_writer import EventFileWriter
from oddaemon.formats.tfrecord import masked_crc32c
from oddaemon.testing.standin_core import STATE_FILE, parse_state


def shard_names(name: str, shards: int) -> list[str]:
    return [f"{name}.data-{i:05d}-of-{shards:05d}" for i in range(shards)]


class CheckpointManager:
    """Saves like tf.train.CheckpointManager: numbered by save count, state file, max_to_keep."""

    def __init__(self, model_dir: str, max_to_keep: int | None, checkpoint_bytes: int | None = None,
                 shards: int = 1):
        self.model_dir = model_dir
        self.checkpoint_bytes = checkpoint_bytes
        self.max_to_keep = max_to_keep
        self.shards = max(1, shards)
        self.preserved = time.time()
        self.kept = [(name, stamp or self.preserved) for name, stamp in parse_state(model_dir)]
        match = re.search(r"-(\d+)$", self.kept[-1][0]) if self.kept else None
        self.save_counter = int(match.group(1)) if match else len(self.kept)

    def _path(self, name: str) -> str:
        return os.path.join(self.model_dir, name)

    def save(self, step: int) -> None:
        self.save_counter += 1
        name = f"ckpt-{self.save_counter}"
        temp_dir = self._path(name + "_temp")
        os.makedirs(temp_dir, exist_ok=True)
        for shard in shard_names(name, self.shards):
            with open(os.path.join(temp_dir, "part.data"), "wb") as data:
                text = f"standin checkpoint data for step {step}\n".encode()
                size = (self.checkpoint_bytes or 0) // self.shards
                data.write(text + b" " * max(0, size - len(text)))  # (a real one's size)
            os.replace(os.path.join(temp_dir, "part.data"), self._path(shard))
        with open(self._path(name + ".index"), "w", encoding="utf-8") as index:
            json.dump({"step": step, "standin": True, "shards": self.shards}, index)
        shutil.rmtree(temp_dir)
        # (a crash between writing the files and the state reuses a number: replace that entry)
        self.kept = [entry for entry in self.kept if entry[0] != name] + [(name, time.time())]
        self._write_state()  # like TF: record first, then sweep, then record again
        keep = self.max_to_keep or len(self.kept)
        if len(self.kept) > keep:
            for old, _ in self.kept[:-keep]:
                for path in [self._path(old + ".index"), *glob.glob(glob.escape(self._path(old)) + ".data-*")]:
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
            self.kept = self.kept[-keep:]
            self._write_state()

    def _write_state(self) -> None:
        lines = [f'model_checkpoint_path: "{self.kept[-1][0]}"']
        lines += [f'all_model_checkpoint_paths: "{name}"' for name, _ in self.kept]
        lines += [f"all_model_checkpoint_timestamps: {stamp!r}" for _, stamp in self.kept]
        lines.append(f"last_preserved_timestamp: {self.preserved!r}")
        temp = self._path(f"{STATE_FILE}.tmp{os.getpid()}")
        with open(temp, "w", encoding="utf-8") as state:
            state.write("\n".join(lines) + "\n")
        os.replace(temp, self._path(STATE_FILE))


class SummaryWriter:
    """tf.summary's file writer at the file level: one event per tag, queued, flushed every
    ``max_queue`` events or once ``flush_seconds`` passed since the last flush, and at close."""

    def __init__(self, logdir: str, max_queue: int = 10, flush_seconds: float = 120.0):
        self._writer = EventFileWriter(logdir)
        self.path = self._writer.path
        self.max_queue = max(1, max_queue)
        self.flush_seconds = flush_seconds
        self._queue: list[tuple[int, str, float, float]] = []
        self._flushed_at = time.monotonic()

    def scalar(self, step: int, tag: str, value: float) -> None:
        self._queue.append((step, tag, value, time.time()))
        if len(self._queue) >= self.max_queue or time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for step, tag, value, wall_time in self._queue:
            self._writer.add_scalars(step, {tag: value}, wall_time)
        self._queue.clear()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._writer.close()


def first_damaged_record(path: str) -> tuple[int, int] | None:
    """(record index, byte offset) of the first record TF could not read, or None if all are whole."""
    with open(path, "rb") as f:
        data = f.read()
    offset = index = 0
    while offset < len(data):
        header = data[offset:offset + 12]
        if len(header) < 12:
            return index, offset
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:12])
        end = offset + 12 + length + 4
        if masked_crc32c(header[:8]) != length_crc or end > len(data):
            return index, offset
        (data_crc,) = struct.unpack("<I", data[end - 4:end])
        if masked_crc32c(data[offset + 12:end - 4]) != data_crc:
            return index, offset
        offset, index = end, index + 1
    return None


class InputError(Exception):
    def __init__(self, kind: str, message: str):
        self.kind = kind  # "corrupt" or "missing"
        super().__init__(message)


def check_inputs(patterns: list[str]) -> int:
    """Read every train input record as TF would; the number of records. Raises InputError with
    ``corrupt`` (and the marker's file and record) or ``missing``."""
    total = 0
    for pattern in patterns:
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise InputError("missing", f"input_path {pattern} matched no files")
        for path in paths:
            try:
                damaged = first_damaged_record(path)
            except OSError as exc:
                raise InputError("missing", f"cannot read {path}: {exc.strerror}") from None
            if damaged is not None:
                raise InputError("corrupt", f"{path}\0{damaged[0]}\0{damaged[1]}")
            total += 1
    return total
