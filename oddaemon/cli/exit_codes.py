"""The CLI's exit statuses, and the one an error reply of each kind gets."""

from __future__ import annotations

from oddaemon.core.errors import ErrorKind

EXIT_OK = 0  # done
EXIT_REFUSED = 1  # the daemon refused (no such job, job already finished, ...) or doctor found problems
EXIT_USAGE = 2  # usage or configuration error
EXIT_UNREACHABLE = 3  # the daemon is not reachable
EXIT_REJECTED = 4  # the submitted file was rejected


def exit_status_of(kind: ErrorKind) -> int:
    """The exit status for the daemon's error reply of ``kind``."""
    return EXIT_UNREACHABLE if kind is ErrorKind.UNAVAILABLE else EXIT_REFUSED
