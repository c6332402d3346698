"""Test only: the daemon, with a way to stall its main loop in Python (tests/systemd).

    python -m oddaemon.testing.stall [the oddaemon command line, e.g. -c FILE serve]

runs ``oddaemon.cli.main.main`` unchanged, after installing a SIGUSR2 handler that never returns: once
the signal arrives, the main-loop thread spins in Python code (the handler runs on that thread,
between two bytecodes of whatever the loop was doing), so no callback runs any more and no
WATCHDOG=1 is sent, while the process stays alive and its C-level signal handlers still work.
That is what a runaway or deadlocked callback looks like to systemd, unlike ``kill -STOP``,
which also stops the signal handlers. The booted test runs the daemon through this module (a
unit drop-in's ExecStart) to see systemd's watchdog send SIGABRT, the daemon's faulthandler
print this stack to the journal, and systemd restart the service.

This module does not enable faulthandler itself: the stack in the journal must come from the
daemon's own set-up (``oddaemon.service.daemon.run``).
"""

from __future__ import annotations

import signal
import sys

MARK = "oddaemon.testing.stall: SIGUSR2: the main loop now spins in Python"


def stall_the_main_loop(signum, frame) -> None:  # a signal handler (both arguments unused)
    print(MARK, file=sys.stderr, flush=True)
    spin_forever()


def spin_forever() -> None:
    turns = 0
    while True:
        turns += 1


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR2, stall_the_main_loop)
    from oddaemon.cli.main import main as oddaemon_main  # noqa: PLC0415

    return oddaemon_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
