"""Exec shim: ``python -I -S lifeline.py PARENT_PID [--hold=FD] PROGRAM ARGS...``.

Arms PR_SET_PDEATHSIG(SIGKILL) so that the worker dies when the daemon dies (no orphan keeps a
GPU), checks that the daemon did not already die before the signal was armed, then execs the
worker in place (the setting survives execve of a non-setuid program). ``--hold=FD``: first wait
for end-of-file on FD, which the daemon closes once it has put this process in the worker's cgroup
(``adapters/cgroups.py``): the worker, and all it starts, run inside it from the first instruction.

Note: the parent-death signal fires when the *thread* that forked the child exits; the daemon
forks workers from its main-loop thread only, which lives as long as the daemon.
Runs without site-packages and imports nothing from oddaemon so that it starts in milliseconds.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.stderr.write("usage: lifeline.py PARENT_PID PROGRAM [ARGS...]\n")
        raise SystemExit(2)
    parent = int(argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"lifeline: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}\n")
        raise SystemExit(127)
    if os.getppid() != parent:
        sys.stderr.write("lifeline: the daemon exited before the worker started; not starting\n")
        raise SystemExit(127)
    if argv[2].startswith("--hold="):
        hold = int(argv[2].removeprefix("--hold="))
        while os.read(hold, 64):
            pass
        os.close(hold)
        argv = argv[:2] + argv[3:]
    program = argv[2]
    try:
        os.execv(program, argv[2:])
    except OSError as exc:
        sys.stderr.write(f"lifeline: cannot execute {program}: {exc.strerror}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main(sys.argv)
