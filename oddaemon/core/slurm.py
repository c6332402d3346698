"""Slurm, read and written as text: the ``sbatch`` command line for a worker, ``sbatch --parsable``'s
answer, ``squeue``'s jobs (its ``--Format`` fields) and ``scontrol show job -o``'s
line, and what each Slurm job state means for the daemon: still waiting, running, or ended with an
exit status and a failure kind. Pure: the commands run in ``adapters/slurm_cli.py``.

Slurm's states (``squeue`` man page, "JOB STATE CODES"): a job is *waiting* while Slurm holds it
(PENDING, CONFIGURING, REQUEUED, REQUEUE_HOLD, REQUEUE_FED, RESV_DEL_HOLD, SUSPENDED, STOPPED),
*running* while it runs or is being cleaned up (RUNNING, COMPLETING, SIGNALING, STAGE_OUT, RESIZING),
and *ended* in every other state, each with its failure kind: TIMEOUT and DEADLINE are
``time-limit``, NODE_FAIL and BOOT_FAIL ``node-fail``, PREEMPTED ``preempted``, OUT_OF_MEMORY
``host-oom``; FAILED is the worker's own exit status (its log tells why); CANCELLED is a signal.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                     "SUSPENDED", "STOPPED"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"})
# Ended by Slurm rather than by the worker: the failure kind, and the sentence for the user.
SLURM_ENDINGS = {
    "TIMEOUT": ("time-limit", "Slurm stopped it at its time limit"),
    "DEADLINE": ("time-limit", "Slurm stopped it at its deadline"),
    "NODE_FAIL": ("node-fail", "its Slurm node failed"),
    "BOOT_FAIL": ("node-fail", "its Slurm node failed to boot"),
    "PREEMPTED": ("preempted", "Slurm preempted it for another job"),
    "OUT_OF_MEMORY": ("host-oom", "Slurm's cgroup memory limit killed it (out of host memory)"),
    "REVOKED": ("signal", "Slurm revoked it (a federated sibling started it)"),
}
REQUEUE_EXIT = 75  # EX_TEMPFAIL: a worker that saved a checkpoint on Slurm's warning signal asks to be requeued
WARNING_SIGNAL = "USR2"  # sent before the time limit (NCCL uses USR1)
TIME_LIMIT_RE = re.compile(r"(\d+-)?\d+(:\d{2}){0,2}")  # "90", "12:00:00", "2-00:00:00" (Slurm's --time)
PORT_BASE_VARIABLE = "ODDAEMON_SLURM_PORT_BASE"  # several nodes: the workers' port, from [slurm] port_base
CHIEF_EXIT_FILE = "slurm-{role}.chief-exit"  # several nodes: task 0's exit status, the one that counts
SUBMIT_SKEW_SECONDS = 30.0  # how far the daemon's host and the Slurm controller's clocks may disagree (NTP)
_SBATCH_ANSWER = re.compile(r"^\s*(\d+)(?:;(\S+))?\s*$")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class SlurmSettings:
    """The daemon-wide ``[slurm]`` settings a site gives (``core/config.py``)."""

    partition: str = ""
    eval_partition: str = ""
    account: str = ""
    qos: str = ""
    time_limit: str = ""  # Slurm's format, e.g. "24:00:00"
    gres_name: str = "gpu"
    extra_args: tuple[str, ...] = ()  # from the allow-list, already checked
    poll_seconds: float = 3.0
    warning_seconds: int = 120  # WARNING_SIGNAL this long before the time limit
    port_base: int = 8888  # several nodes: the TCP port each node's task listens on (SlurmClusterResolver's)


@dataclass(frozen=True)
class SlurmJob:
    """One job as ``squeue`` (or ``scontrol show job -o``) shows it."""

    job_id: int
    name: str
    state: str  # Slurm's job state, e.g. "RUNNING"
    reason: str  # Slurm's state reason, e.g. "Resources", "NonZeroExitCode"
    exit_status: int  # the wait status Slurm records (exit code << 8 | signal)
    restarts: int
    submit_time: int
    nodes: str = ""

    @property
    def phase(self) -> str:
        """"waiting", "running" or "ended"."""
        if self.state in WAITING:
            return "waiting"
        if self.state in RUNNING:
            return "running"
        return "ended"


@dataclass(frozen=True)
class Ending:
    """How an ended Slurm job is reported as a worker's exit: ``returncode`` as a process's (negative
    for a signal) and, where Slurm ended it, the failure kind and sentence."""

    returncode: int
    kind: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Submission:
    """The daemon's own record of submitting one worker (``<work>/slurm-<role>.json``), written before
    ``sbatch`` runs (``job_id`` None) and again with the id it answered."""

    attempt: int
    submitted_at: float  # the daemon's clock just before sbatch ran
    job_id: int | None = None

    def to_json(self) -> dict:
        return {"attempt": self.attempt, "submitted_at": self.submitted_at, "job_id": self.job_id}

    @staticmethod
    def from_json(doc: object) -> Submission | None:
        """None for what is not such a record (the record is then as good as absent)."""
        try:
            job_id = doc.get("job_id")
            return Submission(int(doc["attempt"]), float(doc["submitted_at"]),
                              None if job_id is None else int(job_id))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


def adoptable(found: Mapping[int, SlurmJob], record: Submission | None,
              skew: float = SUBMIT_SKEW_SECONDS) -> tuple[SlurmJob | None, list[SlurmJob]]:
    """Which of the live Slurm jobs named like a worker (``squeue --me --name=...``) a restarted daemon
    adopts, and the ones it ignores. Slurm reuses job ids (they wrap at ``MaxJobId``, and start again
    at 1 when the controller's state is lost), and a job of the same name may be a leftover of an
    earlier run: only a job Slurm says was submitted no earlier than the daemon's last record of
    submitting this worker (less ``skew``, for the two hosts' clocks) is this worker's. Among those,
    the id the record holds, else the newest. Without a record (a daemon from before the records) every
    live job counts, as before. A job whose submit time Slurm does not give (0) counts as new."""
    alive = [job for job in found.values() if job.phase != "ended"]
    since = float("-inf") if record is None else record.submitted_at - skew
    ours = [job for job in alive if job.submit_time == 0 or job.submit_time >= since]
    stale = [job for job in alive if job not in ours]
    if not ours:
        return None, stale
    chosen = next((job for job in ours if record is not None and job.job_id == record.job_id), None)
    chosen = chosen or max(ours, key=lambda job: (job.submit_time, job.job_id))
    return chosen, stale


def job_name(name: str, role: str) -> str:
    """The Slurm job name of a job's worker: ``oddaemon-<name>-<role>`` (what ``squeue`` shows)."""
    return f"oddaemon-{_NAME_SAFE.sub('_', name)}-{role}"


def sbatch_argv(settings: SlurmSettings, name: str, role: str, gpus: int, script: str, log: str,
                job_time_limit: str = "", job_partition: str = "", nodes: int = 1) -> list[str]:
    """``sbatch --parsable`` for one worker: its batch script, its log (appended, as local logs are),
    GPUs as ``--gres=<gres>:N`` (per node), Slurm's warning signal sent to the batch shell before the time
    limit. Several nodes: one task per node (``batch_script`` starts them with ``srun``)."""
    partition = job_partition or (settings.eval_partition if role != "train" and settings.eval_partition
                                  else settings.partition)
    argv = ["sbatch", "--parsable", f"--job-name={job_name(name, role)}", f"--output={log}", "--open-mode=append",
            f"--signal=B:{WARNING_SIGNAL}@{settings.warning_seconds}", "--no-requeue", f"--nodes={nodes}"]
    if nodes > 1:
        argv.append("--ntasks-per-node=1")
    if partition:
        argv.append(f"--partition={partition}")
    if settings.account:
        argv.append(f"--account={settings.account}")
    if settings.qos:
        argv.append(f"--qos={settings.qos}")
    if job_time_limit or settings.time_limit:
        argv.append(f"--time={job_time_limit or settings.time_limit}")
    if gpus:
        argv.append(f"--gres={settings.gres_name}:{gpus}")
    return [*argv, *settings.extra_args, script]


# The shell forwards Slurm's signals to the worker: its traps are set before the worker starts (a
# warning that comes first, as Slurm may send it up to a minute early, must not kill the shell).
_TRAPS = [f"trap '[ -n \"${{child:-}}\" ] && kill -{WARNING_SIGNAL} $child' {WARNING_SIGNAL}",
          "trap '[ -n \"${child:-}\" ] && kill -TERM $child' TERM"]
_WAIT = ["while true; do wait $child; status=$?; kill -0 $child 2>/dev/null || break; done"]


def batch_script(argv: Sequence[str], env: Mapping[str, str], cwd: str, nodes: int = 1, role: str = "train",
                 port_base: int = 8888) -> str:
    """The batch script that runs one worker: its environment (without ``CUDA_VISIBLE_DEVICES``, which
    Slurm sets from the GRES it allocated), its directory, then the worker in the background so the
    shell can forward Slurm's warning signal to it and report its exit status.

    Several nodes: ``srun`` starts one task per node (``srun`` forwards the signal to every task); task
    0, the chief, writes to the job's log and its exit status is the job's (``CHIEF_EXIT_FILE``; srun's
    own when the chief left none, e.g. killed because another task failed: ``--kill-on-bad-exit``);
    task N > 0 writes to ``<cwd>/slurm-<role>-task<N>.log``."""
    lines = ["#!/bin/bash", "# written by oddaemon: one worker of one job", "set -u"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())
              if k != "CUDA_VISIBLE_DEVICES" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    lines.append(f"cd {shlex.quote(cwd)}")
    if nodes <= 1:
        return "\n".join([*lines, *_TRAPS, f"{shlex.join(argv)} &", "child=$!", *_WAIT, "exit $status", ""])
    chief_exit = CHIEF_EXIT_FILE.format(role=role)
    task = "\n".join([  # what each task runs (bash -c): the chief in the background, to forward the signal too
        'if [ "$SLURM_PROCID" != 0 ]; then',
        f'  exec {shlex.join(argv)} >>"slurm-{role}-task$SLURM_PROCID.log" 2>&1', "fi",
        *_TRAPS, f"{shlex.join(argv)} &", "child=$!", *_WAIT, f"echo $status > {chief_exit}", "exit $status"])
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", "--ntasks-per-node=1", "bash", "-c", task]
    lines += [f"export {PORT_BASE_VARIABLE}={port_base}", f"rm -f {chief_exit}", *_TRAPS, f"{shlex.join(srun)} &",
              "child=$!", *_WAIT,
              f"if [ -s {chief_exit} ]; then status=$(cat {chief_exit}); fi", "exit $status", ""]
    return "\n".join(lines)


def parse_sbatch(stdout: str) -> tuple[int, str]:
    """``sbatch --parsable``'s answer: ``jobid`` or ``jobid;cluster``. Raises ValueError otherwise."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    match = _SBATCH_ANSWER.match(lines[-1]) if lines else None
    if match is None:
        raise ValueError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return int(match.group(1)), match.group(2) or ""


# What the daemon reads of ``squeue``: its ``--Format`` fields (``|`` after each), one line per job.
# Not ``--json``: 22.05's ignores every filter (--me, --name, --jobs) and prints each job the
# controller holds: on a busy cluster megabytes per call, and past ``MAX_OUTPUT`` no answer at all.
# ``exit_code`` is the wait status (exit code << 8 | signal), as in ``squeue --json``.
SQUEUE_FORMAT = "JobID:|,Name:|,State:|,Reason:|,SubmitTime:|,NodeList:|,exit_code:|,RestartCnt:|"
_SQUEUE_FIELDS = 8


def adopt_lookup_argv(name: str) -> list[str]:
    """``squeue`` for this user's live jobs named ``name`` (``job_name``): the look before submitting."""
    return ["squeue", "--me", "--noheader", f"--name={name}", f"--Format={SQUEUE_FORMAT}"]


def poll_argv() -> list[str]:
    """The one ``squeue`` of a poll cycle: every job of this user in any state Slurm still holds
    (ended ones until ``MinJobAge``, with their exit status), whatever their number: the daemon picks
    its own by id. Not ``--jobs=<ids>``: one argument holds at most 128 KiB (``MAX_ARG_STRLEN``)."""
    return ["squeue", "--me", "--noheader", "--states=all", f"--Format={SQUEUE_FORMAT}"]


def _local_epoch(text: str) -> int:
    """squeue's submit time (``2026-12-03T13:10:11``, this host's local time) as epoch seconds; 0 when
    it gives none (``N/A``): such a job counts as new (``adoptable``)."""
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        return 0


def _number(text: str) -> int:
    return int(text) if text.strip().isdigit() else 0


def parse_squeue_lines(text: str) -> dict[int, SlurmJob]:
    """The jobs of an ``SQUEUE_FORMAT`` output by id (lines it cannot read are skipped)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if parts and parts[-1] == "":
            parts.pop()  # the separator after the last field
        if len(parts) != _SQUEUE_FIELDS or not parts[0].isdigit():
            continue  # not such a line, or an array or heterogeneous job ("12_3", "12+1"): not one oddaemon submits
        job_id = int(parts[0])
        jobs[job_id] = SlurmJob(job_id, parts[1], parts[2], parts[3], _number(parts[6]), _number(parts[7]),
                                _local_epoch(parts[4]), "" if parts[5] in ("", "(null)") else parts[5])
    return jobs


def parse_scontrol_job(line: str) -> SlurmJob | None:
    """``scontrol show job -o ID``'s one line (for a job ``squeue`` no longer lists); None when it
    says nothing usable. ``ExitCode=3:0`` is exit code 3, signal 0."""
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    try:
        code, sig = (int(x) for x in fields.get("ExitCode", "0:0").split(":", 1))
        return SlurmJob(int(fields["JobId"]), fields.get("JobName", ""), fields["JobState"], fields.get("Reason", ""),
                        (code << 8) | sig, int(fields.get("Restarts", 0)), 0, fields.get("NodeList", ""))
    except (KeyError, ValueError):
        return None


def ending(job: SlurmJob) -> Ending:
    """An ended job as a worker's exit."""
    code, sig = job.exit_status >> 8, job.exit_status & 0x7F
    if job.state in SLURM_ENDINGS:
        kind, message = SLURM_ENDINGS[job.state]
        return Ending(-sig if sig else (code or 1), kind, f"{message} (Slurm job {job.job_id}, state {job.state})")
    if job.state == "CANCELLED":
        return Ending(-(sig or 15))
    if job.state == "COMPLETED":
        return Ending(0)
    return Ending(-sig if sig else code or 1)  # FAILED, SPECIAL_EXIT, ...: the worker's own exit
