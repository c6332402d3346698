"""The D-Bus API: ``io.github.oddaemon1.Manager`` at ``/io/github/oddaemon1`` on the system bus.

Server side: ``publish(commands, bus)`` exports a ``Service`` (pydbus, served by the GLib main
loop the daemon already runs) wrapping the same ``Commands`` object as the control socket.
Client side: ``oddaemon.cli.dbus_client.Client.connect(bus)`` for the CLI.

Types:
* ``ListJobs() -> aa{sv}``, ``GetJob(name) -> a{sv}`` and ``GetSweep(name) -> a{sv}``: the job
  views (and a sweep's, ``core.sweep.sweep_view``) as typed dictionaries
  (``busctl``, ``gdbus`` and every binding show and decode them without a JSON parser, and new
  view keys need no interface change). D-Bus has no null: a None value is left out, at any
  depth, and its key path is listed under ``null_keys`` (``aas``), from which ``Client``
  rebuilds views equal to the control socket's.
* ``Submit(path)`` / ``SubmitText(text, filename) -> (name, state, queue_position)``, with
  ``queue_position`` 0 when the job is not waiting in the queue.
* ``CheckpointEvaluated(name, step, metrics_json)``: metric names vary by model, so the metrics
  travel as one JSON object.

Errors are D-Bus errors named after the error's kind (``oddaemon.core.errors.dbus_error_name``):
``io.github.oddaemon1.Error.NotFound`` (no such job), ``.Invalid`` (a job file that fails
validation or that the scheduler rejects, an unreadable path), ``.Refused`` (the scheduler said
no: cancel a finished job, retry a running one), ``.Internal``, and
``org.freedesktop.DBus.Error.AccessDenied`` (a caller who is not root, the daemon's user, nor a
member of the submit group calls a method that changes something; the bus policy denies them
first, this is the second line). The bus names live in ``oddaemon.adapters.dbus_bus``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable

from oddaemon.adapters.confine import submitter_problem
from oddaemon.adapters.dbus_bus import BUS_NAME, INTERFACE, OBJECT_PATH, glib_message, open_connection, resolve_bus
from oddaemon.adapters.dbus_variants import view_to_vardict
from oddaemon.core.errors import CommandError, ErrorKind, dbus_error_name, error_kind, error_text

log = logging.getLogger("oddaemon.dbus")

INTROSPECTION = f"""
<node>
  <interface name="{INTERFACE}">
    <method name="ListJobs"><arg name="jobs" type="aa{{sv}}" direction="out"/></method>
    <method name="GetJob">
      <arg name="name" type="s" direction="in"/><arg name="job" type="a{{sv}}" direction="out"/>
    </method>
    <method name="GetSweep">
      <arg name="name" type="s" direction="in"/><arg name="sweep" type="a{{sv}}" direction="out"/>
    </method>
    <method name="Submit">
      <arg name="path" type="s" direction="in"/>
      <arg name="name" type="s" direction="out"/><arg name="state" type="s" direction="out"/>
      <arg name="queue_position" type="u" direction="out"/>
    </method>
    <method name="SubmitText">
      <arg name="text" type="s" direction="in"/><arg name="filename" type="s" direction="in"/>
      <arg name="name" type="s" direction="out"/><arg name="state" type="s" direction="out"/>
      <arg name="queue_position" type="u" direction="out"/>
    </method>
    <method name="Cancel">
      <arg name="name" type="s" direction="in"/><arg name="state" type="s" direction="out"/>
    </method>
    <method name="Finish">
      <arg name="name" type="s" direction="in"/><arg name="state" type="s" direction="out"/>
    </method>
    <method name="SetPriority">
      <arg name="name" type="s" direction="in"/><arg name="priority" type="i" direction="in"/>
      <arg name="state" type="s" direction="out"/><arg name="queue_position" type="u" direction="out"/>
    </method>
    <method name="Retry">
      <arg name="name" type="s" direction="in"/><arg name="state" type="s" direction="out"/>
    </method>
    <method name="Reload"/>
    <property name="Version" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="QueueLength" type="u" access="read"/>
    <property name="GPUs" type="a(us)" access="read"/>
    <signal name="JobStateChanged">
      <arg name="name" type="s"/><arg name="old_state" type="s"/><arg name="new_state" type="s"/>
      <arg name="reason" type="s"/>
    </signal>
    <signal name="CheckpointEvaluated">
      <arg name="name" type="s"/><arg name="step" type="x"/><arg name="metrics_json" type="s"/>
    </signal>
  </interface>
</node>
"""


# ---- errors --------------------------------------------------------------------------------------
class DBusError(Exception):
    """An error returned to the caller. pydbus 0.6.0 uses ``type(exc).__name__`` as the D-Bus error
    name when it contains a dot, so each kind is a class named after its D-Bus error name."""

    dbus_name = dbus_error_name(ErrorKind.INTERNAL)


ERROR_CLASSES: dict[ErrorKind, type[DBusError]] = {
    kind: type(dbus_error_name(kind), (DBusError,), {"dbus_name": dbus_error_name(kind)}) for kind in ErrorKind}
Invalid = ERROR_CLASSES[ErrorKind.INVALID]
AccessDenied = ERROR_CLASSES[ErrorKind.DENIED]


def dbus_error(exc: BaseException, logged: bool = False) -> DBusError:
    """Any exception as the D-Bus error the caller gets: its kind's name, its user text."""
    return ERROR_CLASSES[error_kind(exc)](error_text(exc, logged))


class _ExpectedErrorFilter(logging.Filter):
    """pydbus logs a traceback for every error it returns; refusals are normal replies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DBusError))


logging.getLogger("pydbus.registration").addFilter(_ExpectedErrorFilter())


# ---- server --------------------------------------------------------------------------------------
class _Subscription:
    def __init__(self, callbacks: list, callback):
        self.callbacks, self.callback = callbacks, callback

    def __exit__(self, *exc) -> None:
        if self.callback in self.callbacks:
            self.callbacks.remove(self.callback)


class _BoundSignal:
    def __init__(self) -> None:
        self.callbacks: list = []

    def connect(self, callback) -> _Subscription:
        self.callbacks.append(callback)
        return _Subscription(self.callbacks, callback)

    def __call__(self, *args) -> None:
        for callback in list(self.callbacks):
            callback(*args)


class _Signal:
    """What pydbus expects of a signal attribute (``.connect(cb)``, call to emit), per instance."""

    def __set_name__(self, owner, name: str) -> None:
        self.attr = f"_signal_{name}"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.attr, _BoundSignal())


class Service:
    dbus = INTROSPECTION
    JobStateChanged = _Signal()
    CheckpointEvaluated = _Signal()
    PropertiesChanged = _Signal()

    def __init__(self, commands, caller_check: CallerCheck | None = None):
        self.commands = commands
        self.caller_check = caller_check
        self.bus = None
        self._registration = None
        self._last_properties: dict = {}

    # -- methods (called by pydbus on the main-loop thread) --
    def ListJobs(self):
        return self._call(lambda: [view_to_vardict(v) for v in self.commands.list_jobs()])

    def GetJob(self, name):
        return self._call(lambda: view_to_vardict(self.commands.get_job(name)))

    def GetSweep(self, name):
        return self._call(lambda: view_to_vardict(self.commands.sweep(name)))

    def Submit(self, path, dbus_context=None):
        uid = self._authorize(dbus_context, "Submit")
        if uid is None or uid in (0, os.getuid()):
            return self._call(lambda: _submitted(self.commands.submit_file(path)))
        data = _read_for_caller(path, uid)
        return self._call(lambda: _submitted(self.commands.submit_text(data, os.path.basename(path))))

    def SubmitText(self, text, filename, dbus_context=None):
        self._authorize(dbus_context, "SubmitText")
        return self._call(lambda: _submitted(self.commands.submit_text(text, filename or "submitted.toml")))

    def Cancel(self, name, dbus_context=None):
        self._authorize(dbus_context, "Cancel")
        return self._call(lambda: self.commands.cancel(name))

    def Finish(self, name, dbus_context=None):
        self._authorize(dbus_context, "Finish")
        return self._call(lambda: self.commands.finish(name))

    def SetPriority(self, name, priority, dbus_context=None):
        self._authorize(dbus_context, "SetPriority")

        def set_it():
            done = self.commands.set_priority(name, int(priority))
            return str(done["state"]), int(done["queue_position"] or 0)
        return self._call(set_it)

    def Retry(self, name, dbus_context=None):
        self._authorize(dbus_context, "Retry")
        return self._call(lambda: self.commands.retry(name))

    def Reload(self, dbus_context=None):
        self._authorize(dbus_context, "Reload")
        self._call(self.commands.reload)

    # -- properties --
    @property
    def Version(self):
        return str(self.commands.version)

    @property
    def QueueLength(self):
        return int(self.commands.queue_length())

    @property
    def GPUs(self):
        gpus = self.commands.gpus()
        holders = {int(k): v for k, v in (gpus.get("holders") or {}).items()}
        return [(int(g), holders.get(int(g), "")) for g in gpus.get("total") or []]

    # -- what the daemon calls --
    def emit_job_state_changed(self, name: str, old: str | None, new: str, reason: str | None) -> None:
        self._emit(self.JobStateChanged, str(name), str(old or ""), str(new), str(reason or ""))
        self.refresh_properties()

    def emit_checkpoint_evaluated(self, name: str, step: int | None, metrics: dict | str) -> None:
        """``step`` None (not known) is sent as -1."""
        text = metrics if isinstance(metrics, str) else json.dumps(metrics, sort_keys=True, allow_nan=True)
        self._emit(self.CheckpointEvaluated, str(name), -1 if step is None else int(step), text)

    def refresh_properties(self) -> None:
        """Emit PropertiesChanged for QueueLength and GPUs when they differ from the last values."""
        try:
            current = {"QueueLength": self.QueueLength, "GPUs": self.GPUs}
        except Exception:
            log.exception("cannot read D-Bus properties")
            return
        changed = {k: v for k, v in current.items() if self._last_properties.get(k) != v}
        self._last_properties = current
        if changed:
            self._emit(self.PropertiesChanged, INTERFACE, changed, [])

    def _emit(self, sig, *args) -> None:
        if self.bus is None or self.bus.con.is_closed():
            return
        try:
            sig(*args)
        except Exception:
            log.exception("cannot emit a D-Bus signal %s", args[:1])

    def unpublish(self) -> None:
        if self._registration is not None:
            for undo in reversed(self._registration):
                try:
                    undo()
                except Exception:  # noqa: BLE001 - the bus may be gone already
                    pass
            self._registration = None
        if self.bus is not None:
            try:
                self.bus.con.close_sync(None)
            except Exception:  # noqa: BLE001
                pass

    # -- helpers --
    def _authorize(self, context, method: str) -> int | None:
        """The caller's uid once allowed (None when there is no check); AccessDenied otherwise."""
        if self.caller_check is None:
            return None
        return self.caller_check(context.sender if context is not None else "", method)

    def _call(self, operation):
        try:
            return operation()
        except DBusError:
            raise
        except CommandError as exc:
            raise dbus_error(exc) from None
        except Exception as exc:
            log.exception("D-Bus call failed")
            raise dbus_error(exc, logged=True) from None


def _submitted(result: dict) -> tuple[str, str, int]:
    return str(result["name"]), str(result["state"]), int(result.get("queue_position") or 0)


class CallerCheck:
    """The daemon's own check of who may change things: root, the daemon's user, or a member of
    ``submit_group``. ``uid_of(sender)`` asks the bus for the caller's uid."""

    def __init__(self, submit_group: str, uid_of: Callable[[str], int]):
        self.submit_group = submit_group
        self.uid_of = uid_of
        self._uids: dict[str, int] = {}  # unique bus names are never reused: safe to remember

    def __call__(self, sender: str, method: str) -> int:
        try:
            uid = self._uids.get(sender)
            if uid is None:
                uid = self.uid_of(sender)
                if len(self._uids) >= 256:
                    self._uids.clear()
                self._uids[sender] = uid
        except Exception as exc:  # noqa: BLE001
            raise AccessDenied(f"{method}: cannot tell who the caller {sender} is: {glib_message(exc)}") from None
        if uid in (0, os.getuid()) or self._in_group(uid):
            return uid
        raise AccessDenied(f"{method} is only for root and members of the group '{self.submit_group}' "
                           f"(caller uid {uid}); ask an administrator to add you to it")

    def _in_group(self, uid: int) -> bool:
        return submitter_problem(uid, self.submit_group, trusted=set()) is None  # the spool's own rule


def publish(commands, bus: str | None = "system", submit_group: str | None = None, loop=None) -> Service | None:
    """Export the Manager object and own the bus name. None (with a WARNING) when that is not
    possible: no bus, the name is taken or not allowed, or the event loop is not GLib's."""
    bus = resolve_bus(bus)
    if loop is not None and getattr(loop, "name", "glib") != "glib":
        log.warning("D-Bus API disabled: it needs the GLib event loop (PyGObject), this daemon runs the %s loop; "
                    "the CLI uses the control socket", loop.name)
        return None
    try:
        from gi.repository import GLib  # noqa: PLC0415

        con = open_connection(bus)
    except ImportError as exc:
        log.warning("D-Bus API disabled: %s (install PyGObject and pydbus); the CLI uses the control socket", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - GLib.Error and friends
        log.warning("D-Bus API disabled: cannot connect to the %s bus: %s; the daemon keeps running and the CLI "
                    "uses the control socket", bus, glib_message(exc))
        return None
    bus_obj = con.pydbus
    check = CallerCheck(submit_group, lambda sender: _caller_uid(con, sender)) if submit_group else None
    service = Service(commands, check)
    undo = []
    try:
        undo.append(bus_obj.register_object(OBJECT_PATH, service, None).__exit__)
        owner = bus_obj.request_name(BUS_NAME, allow_replacement=False, replace=False)
        undo.append(owner.__exit__)
    except (GLib.Error, RuntimeError) as exc:
        for step in reversed(undo):
            step(None, None, None)
        con.close_sync(None)
        log.warning("D-Bus API disabled: cannot own %s on the %s bus: %s; the daemon keeps running and the CLI "
                    "uses the control socket", BUS_NAME, bus, glib_message(exc))
        return None
    service.bus = bus_obj
    service._registration = [lambda f=f: f(None, None, None) for f in undo]
    con.connect("closed", _on_closed)
    service.refresh_properties()
    log.info("D-Bus API: %s %s on the %s bus", BUS_NAME, OBJECT_PATH, bus)
    return service


MAX_SUBMIT_READ = 64 * 1024 * 1024 + 1  # above the largest [jobs] max_file_bytes: the daemon rejects it


def _read_for_caller(path: str, uid: int) -> bytes:
    """Submit(path) from a non-root caller: the daemon reads only a file that the caller owns or
    that everyone may read, checked on the open file (no swap between check and read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise Invalid(f"Submit: cannot open {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != uid and not st.st_mode & 0o004:
            raise AccessDenied(f"Submit: {path} belongs to uid {st.st_uid} and is not readable by everyone; submit "
                               "its text instead (SubmitText; `oddaemon submit FILE` does that)")
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"Submit: {path} is not a regular file")
        return f.read(MAX_SUBMIT_READ)


def _on_closed(_con, remote_peer_vanished: bool, error) -> None:
    if remote_peer_vanished:
        log.warning("D-Bus connection lost%s; the D-Bus API is gone until the daemon restarts (the control socket "
                    "still works)", f": {error.message}" if error else "")


def _caller_uid(con, sender: str) -> int:
    from gi.repository import GLib  # noqa: PLC0415

    reply = con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)), GLib.VariantType("(u)"),
                          0, 5000, None)
    return int(reply.unpack()[0])

