"""What the control commands (``list``, ``status``, ``cancel``, ``retry``) need of the configuration:
the state directory (where the control socket is) and the D-Bus bus the daemon publishes on.

Read with ``tomllib`` alone, without ``oddaemon.core.config``'s full validation (which imports the
job-spec checks and costs more than the whole answer): the file must be valid TOML and these two
values valid, with the same rules and defaults as ``Config``; anything else wrong in the file is the
daemon's concern (``serve``, ``submit`` and ``doctor`` read the whole file). When the file cannot be
read or one of these values is wrong, the full ``load_config`` runs, so the error is exactly the one
every other command prints (``ConfigError``, naming the file and every problem).
"""

from __future__ import annotations

import os

DEFAULT_STATE_DIR = "/var/lib/oddaemon"  # Config.state_dir
DEFAULT_DBUS_BUS = "system"  # Config.dbus_bus


class ControlSettings:
    """The configuration as far as the control commands read it (``Config`` has the same attributes)."""

    __slots__ = ("path", "state_dir", "dbus_bus")

    def __init__(self, path: str | None, state_dir: str = DEFAULT_STATE_DIR, dbus_bus: str = DEFAULT_DBUS_BUS):
        self.path = path
        self.state_dir = state_dir
        self.dbus_bus = dbus_bus

    def __repr__(self) -> str:
        return f"ControlSettings(path={self.path!r}, state_dir={self.state_dir!r}, dbus_bus={self.dbus_bus!r})"


def _valid_path(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _valid_bus(value: object) -> bool:
    return isinstance(value, str) and (value in ("system", "session", "none") or ":" in value)


def _lean(path: str) -> ControlSettings | None:
    """The two settings, or None when the file or one of them is not right (the full reader says why)."""
    import tomllib  # noqa: PLC0415 (only when there is a file)

    try:
        with open(path, "rb") as f:
            doc = tomllib.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError):
        return None
    paths, daemon = doc.get("paths", {}), doc.get("daemon", {})
    if not isinstance(paths, dict) or not isinstance(daemon, dict):
        return None
    state_dir, bus = paths.get("state_dir", DEFAULT_STATE_DIR), daemon.get("dbus", DEFAULT_DBUS_BUS)
    if not _valid_path(state_dir) or not _valid_bus(bus):
        return None
    if "state_dir" in paths:  # relative to the config file's directory, as Config resolves it
        state_dir = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), state_dir))
    return ControlSettings(path, state_dir, bus)


def control_settings(path: str | None):
    """``ControlSettings`` for the config file at ``path`` (None: the built-in defaults); raises
    ``ConfigError`` as ``load_config`` does when the file or these values are not right."""
    if path is None:
        return ControlSettings(None)
    settings = _lean(path)
    if settings is not None:
        return settings
    from oddaemon.core.config import load_config  # noqa: PLC0415

    return load_config(path)  # raises the ConfigError that names every problem (a Config otherwise)
