"""Errors that carry path + operation + cause, their kinds, and the one place that turns them into
user text, wire replies and D-Bus error names."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """What went wrong, as every transport tells it (the control socket's ``kind``, the D-Bus error name)."""

    NOT_FOUND = "not_found"  # no such job
    INVALID = "invalid"  # a bad job file, an unreadable path, a bad argument or request
    REFUSED = "refused"  # the scheduler or policy says no: a duplicate name, cancel a finished job, ...
    DENIED = "denied"  # the caller may not do this
    UNAVAILABLE = "unavailable"  # the daemon cannot be reached
    INTERNAL = "internal"  # a failure inside the daemon (details in its log)


class OddaemonError(Exception):
    """Base class. ``str()`` is a complete sentence a user can act on; ``kind`` says what went wrong."""

    kind: ErrorKind = ErrorKind.INTERNAL


class CommandError(OddaemonError):
    """A command that cannot be done (a refusal, no such job, a bad argument): an expected answer.

    >>> str(CommandError(ErrorKind.NOT_FOUND, "no job named 'x'"))
    "no job named 'x'"
    """

    def __init__(self, kind: ErrorKind, message: str):
        self.kind = kind
        super().__init__(message)


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

    kind = ErrorKind.INVALID

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


# ---- the one conversion point --------------------------------------------------------------------
LOGGED_NOTE = " (details in the daemon log)"
DBUS_ERROR_PREFIX = "io.github.oddaemon1.Error."
DBUS_ERROR_NAMES: dict[ErrorKind, str] = {
    ErrorKind.NOT_FOUND: DBUS_ERROR_PREFIX + "NotFound",
    ErrorKind.INVALID: DBUS_ERROR_PREFIX + "Invalid",
    ErrorKind.REFUSED: DBUS_ERROR_PREFIX + "Refused",
    ErrorKind.DENIED: "org.freedesktop.DBus.Error.AccessDenied",
    ErrorKind.UNAVAILABLE: DBUS_ERROR_PREFIX + "Unavailable",
    ErrorKind.INTERNAL: DBUS_ERROR_PREFIX + "Internal",
}


def user_message(exc: BaseException) -> str:
    """The single conversion point from an exception to what a user reads."""
    if isinstance(exc, OddaemonError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"system error{where}: {describe_cause(exc)}"
    return f"internal error: {type(exc).__name__}: {exc}"


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of any exception: its own for ours, ``internal`` for everything else."""
    return exc.kind if isinstance(exc, OddaemonError) else ErrorKind.INTERNAL


def error_text(exc: BaseException, logged: bool = False) -> str:
    """``user_message``, plus a pointer to the daemon log when the traceback was logged there."""
    return user_message(exc) + (LOGGED_NOTE if logged else "")


def error_reply(exc: BaseException, logged: bool = False) -> dict:
    """The wire form of a failed request (control socket, and the CLI's replies from D-Bus)."""
    return {"ok": False, "error": error_text(exc, logged), "kind": error_kind(exc).value}


def dbus_error_name(kind: ErrorKind) -> str:
    return DBUS_ERROR_NAMES[kind]


def kind_of_dbus_error(name: str) -> ErrorKind:
    """The inverse of ``dbus_error_name``; a name that is not ours is ``internal``."""
    for kind, known in DBUS_ERROR_NAMES.items():
        if known == name:
            return kind
    return ErrorKind.INTERNAL


def kind_of_reply(reply: dict) -> ErrorKind:
    """The kind of an error reply; a reply without one (an older daemon) counts as ``refused``."""
    try:
        return ErrorKind(reply.get("kind", ErrorKind.REFUSED))
    except ValueError:
        return ErrorKind.INTERNAL
