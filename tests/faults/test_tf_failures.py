"""TF's failures as the daemon meets them: the logs a real TF run wrote (tests/fixtures/tf, made by
its make.py with TF itself) replayed through the stand-in, and a damaged TFRecord file the stand-in
reads record by record as TF does. Real daemon; tests/tf runs the same failures with real TF."""

from __future__ import annotations

import os
import re

from oddaemon.formats.tfrecord import encode_record

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "tf")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def marker_of(log_path: str) -> str:
    """The failure the real worker named in its own log: the message of its oddaemon-failure line."""
    line = next(line for line in open(log_path, encoding="utf-8") if line.startswith("oddaemon-failure:"))
    return line.split(":", 2)[2].strip()


def test_a_real_train_failure_log_is_read_as_the_real_worker_meant_it(daemon_env):
    """The real worker's log of a corrupt input record: its marker line, then TF's traceback (tens
    of lines, warnings before it). The job fails at once with the marker's words, not restarted."""
    daemon_env.write_config(max_restarts=3)
    env = daemon_env.start()
    env.drop("replayed.toml", env.job_text("replayed", num_steps=10, every=5, step_seconds=0.01, crash_at_step=3,
                                           crash_log=fixture("train_corrupt_input.log")))
    job = env.wait_state("replayed", "failed", 60)
    said = marker_of(fixture("train_corrupt_input.log"))
    assert re.fullmatch(r"corrupt input record in @ROOT@/bad/train-00000-of-00002\.tfrecord at record 2 "
                        r"\(corrupted record at \d+\): .*", said), said
    assert job["failure"]["kind"] == "input" and job["restarts"] == 0, job
    assert said.split(":")[0] in job["reason"] and "not restarted" in job["reason"], job["reason"]


def test_the_failure_marker_is_found_after_a_traceback_longer_than_the_log_tail(daemon_env, tmp_path):
    """A failure line, then 1,000 lines (a deep TF traceback, warnings): the daemon keeps the last
    200 lines of a worker's output, and the worker's own word on its failure besides."""
    real = open(fixture("train_corrupt_input.log"), encoding="utf-8").read()
    marker = next(line for line in real.splitlines() if line.startswith("oddaemon-failure:"))
    long_log = tmp_path / "long.log"
    long_log.write_text(marker + "\n" + "".join(f'  File "/x/frame{i}.py", line {i}, in f{i}\n' for i in range(1000))
                        + "tensorflow.python.framework.errors_impl.DataLossError: Graph execution error:\n")
    env = daemon_env.start()
    env.drop("deep.toml", env.job_text("deep", num_steps=10, every=5, step_seconds=0.01, crash_at_step=3,
                                       crash_log=str(long_log)))
    job = env.wait_state("deep", "failed", 60)
    assert job["failure"]["kind"] == "input" and job["restarts"] == 0, job
    assert "corrupt input record in @ROOT@/bad/train-00000-of-00002.tfrecord at record 2" in job["reason"]


def test_a_damaged_input_record_fails_at_once_naming_the_file_and_record(daemon_env):
    """The stand-in reads its train inputs record by record, as TF's TFRecordDataset does, and
    fails as the real worker does (tests/fixtures/tf/train_corrupt_input.log)."""
    env = daemon_env.start()
    data = os.path.join(env.data, "records")
    os.makedirs(data)
    good, bad = os.path.join(data, "train-00000-of-00002.tfrecord"), os.path.join(data, "train-00001-of-00002.tfrecord")
    for path in (good, bad):
        with open(path, "wb") as f:
            for i in range(5):
                f.write(encode_record(b"example %d " % i * 40))
    damaged = bytearray(open(bad, "rb").read())
    record_size = len(damaged) // 5
    damaged[3 * record_size + 20] ^= 0xFF  # inside record 3's payload: its CRC no longer matches
    open(bad, "wb").write(bytes(damaged))
    text = env.job_text("damaged", num_steps=10, every=5, step_seconds=0.01)
    text = text.replace("[pipeline]\n", f'[pipeline]\ntrain_input_path = "{data}/train-*.tfrecord"\n', 1)
    env.drop("damaged.toml", text)
    job = env.wait_state("damaged", "failed", 60)
    assert job["failure"]["kind"] == "input" and job["restarts"] == 0, job
    assert f"corrupt input record in {bad} at record 3 (corrupted record at {3 * record_size})" in job["reason"], \
        job["reason"]
    # fixed: the same job name retried reads the repaired file and trains to the end
    with open(bad, "wb") as f:
        for i in range(5):
            f.write(encode_record(b"example %d " % i * 40))
    assert env.cli("retry", "damaged").returncode == 0
    env.wait_state("damaged", "succeeded", 60)
