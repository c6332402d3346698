"""Errors that carry path + operation + cause, and the one place that turns them into user messages."""

from __future__ import annotations


class OddaemonError(Exception):
    """Base class. ``str()`` is a complete sentence a user can act on."""


class OperationError(OddaemonError):
    """An I/O operation on a path failed.

    >>> str(OperationError("/x/y", "rename into spool", FileNotFoundError(2, "No such file")))
    'cannot rename into spool /x/y: No such file'
    """

    def __init__(self, path: str, operation: str, cause: BaseException | str):
        self.path = path
        self.operation = operation
        self.cause = cause
        super().__init__(path, operation, cause)

    def __str__(self) -> str:
        return f"cannot {self.operation} {self.path}: {describe_cause(self.cause)}"


class ConfigError(OddaemonError):
    """The daemon configuration file is invalid. Carries every problem found."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(path, problems)

    def __str__(self) -> str:
        lines = [f"invalid configuration in {self.path}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def describe_cause(cause: BaseException | str) -> str:
    if isinstance(cause, str):
        return cause
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def user_message(exc: BaseException) -> str:
    """The single conversion point from an exception to what a user reads."""
    if isinstance(exc, OddaemonError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"system error{where}: {describe_cause(exc)}"
    return f"internal error: {type(exc).__name__}: {exc}"
