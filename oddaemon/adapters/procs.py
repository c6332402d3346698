"""Supervised worker processes.

``spawn`` starts a worker:
* through ``lifeline.py`` (parent-death signal: if the daemon dies, the worker dies too);
* in its own session and process group (stop signals reach the whole group);
* with exactly the environment the daemon decides (no inherited secrets, no NOTIFY_SOCKET or
  WATCHDOG_* variables, no LD_PRELOAD, PYTHONSTARTUP, BASH_ENV, ...: an allow-list; job files
  cannot add to it) and ``CUDA_VISIBLE_DEVICES`` set to its GPUs ("" = CPU only);
* as the worker user (``identity``, see ``confine.py``) when the daemon runs as root: uid,
  primary gid and supplementary groups are set in the child before it execs the lifeline, which
  then arms the parent-death signal (a change of credentials would clear it if armed earlier);
* stdout and stderr into one pipe that the daemon pumps into a rotating log;
* in its own cgroup when asked (``place``: called with the pid after the fork, while the lifeline
  waits on a pipe for the daemon to be done, before it execs the worker; ``adapters/cgroups.py``);
* at a lower priority when asked (``nice``: a CPU evaluator beside a CPU trainer), its autogroup too,
  and with its compute threads limited by the environment (``thread_limits``).

Exit is observed through a pidfd (readable when the process exits), which plugs into the
event loop like any other fd: no SIGCHLD handler, no polling.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oddaemon.core.errors import OperationError

if TYPE_CHECKING:
    from oddaemon.adapters.confine import Identity

log = logging.getLogger("oddaemon.adapters.procs")
LIFELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lifeline.py")

# Variables a worker may inherit from the daemon's environment; everything else is dropped.
# (PYTHONPATH: set by whoever starts the daemon, which runs under it itself; some installations
# of object_detection need it. Nothing a job file says ever reaches a worker's environment.)
PASSTHROUGH_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "LD_LIBRARY_PATH",
                   "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_HOME", "XLA_FLAGS")


def worker_environment(base: dict[str, str], gpus: tuple[int, ...],
                       extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: base[k] for k in PASSTHROUGH_ENV if k in base}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "1")
    if extra:
        env.update(extra)
    return env


def thread_limits(threads: int) -> dict[str, str]:
    """The environment that holds TensorFlow (and OpenMP under it) to ``threads`` compute threads
    ({} for 0: as TF picks). Inter-op gets at least 2: one thread can deadlock ops that wait on others."""
    if threads <= 0:
        return {}
    return {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(max(2, threads)),
            "OMP_NUM_THREADS": str(threads)}


def lower_priority(pid: int, nice: int) -> None:
    """Give a worker that has just started the nice value ``nice``. It still has one thread (Python is
    starting; TF makes its threads later, and they inherit it). Its autogroup gets it too: each worker
    has a session of its own, and where the kernel groups the CPU by session (CONFIG_SCHED_AUTOGROUP,
    outside a cgroup with the cpu controller) nice acts only within the group. Best effort: logged."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as exc:
        log.warning("cannot set the nice value of worker %d to %d: %s", pid, nice, exc.strerror)
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError as exc:  # no autogroups here, or (not CAP_SYS_ADMIN) one change per 100 ms
        log.debug("cannot set the autogroup nice value of worker %d: %s", pid, exc.strerror)


@dataclass
class Worker:
    name: str
    role: str
    attempt: int
    pid: int
    pidfd: int
    output_fd: int
    started_at: float
    popen: subprocess.Popen = field(repr=False)
    stop_requested_at: float | None = None
    saving: bool = False  # asked to save and exit (SIGUSR2), not sent SIGTERM yet

    def poll_exit(self) -> int | None:
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        try:
            os.close(self.pidfd)
        except OSError:
            pass


def spawn(name: str, role: str, attempt: int, argv: list[str], env: dict[str, str], cwd: str, now: float,
          stdin: int | None = None, pass_fds: tuple[int, ...] = (), identity: Identity | None = None,
          nice: int = 0, place: Callable[[int], None] | None = None) -> Worker:
    """``stdin``: an fd the worker reads as its standard input (default /dev/null); ``pass_fds``:
    extra fds the worker inherits under the same numbers (the warm evaluator's reply pipe);
    ``identity``: the user to run it as (None: the daemon's own); ``nice``: its nice value;
    ``place(pid)``: put the process in its cgroup before it execs the worker (an OSError is logged)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    hold: tuple[int, int] | None = os.pipe2(os.O_CLOEXEC) if place is not None else None
    held = (f"--hold={hold[0]}",) if hold is not None else ()
    command = [sys.executable, "-I", "-S", LIFELINE, str(os.getpid()), *held, *argv]
    switch: dict = {}
    if identity is not None:
        switch = {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
        env = {**env, "HOME": identity.home, "USER": identity.name, "LOGNAME": identity.name}
    try:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=write_fd,
                                 stderr=write_fd, env=env, cwd=cwd, start_new_session=True, close_fds=True,
                                 pass_fds=(*pass_fds, *hold[:1]) if hold else pass_fds, **switch)
    except OSError as exc:
        os.close(read_fd)
        if hold is not None:
            os.close(hold[1])
        as_user = f" as user {identity.name}" if identity is not None else ""
        raise OperationError(argv[0], f"start {role} worker for job {name}{as_user} with", exc) from exc
    finally:
        os.close(write_fd)
        if hold is not None:
            os.close(hold[0])
    if hold is not None:
        try:
            place(popen.pid)
        except OSError as exc:
            log.warning("job %s: cannot put its %s worker (pid %d) in its cgroup: %s", name, role, popen.pid,
                        exc.strerror)
        finally:
            os.close(hold[1])
    if nice:
        lower_priority(popen.pid, nice)
    pidfd = os.pidfd_open(popen.pid)
    return Worker(name=name, role=role, attempt=attempt, pid=popen.pid, pidfd=pidfd, output_fd=read_fd,
                  started_at=now, popen=popen)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a pid apart from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19])


def kill_leftover(pid: int, start_time: int | None) -> bool:
    """Kill the process group of a worker left by an earlier daemon, if it is still that process."""
    if start_time is None or process_start_time(pid) != start_time:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
    return True
