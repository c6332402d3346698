"""Confinement: who the workers run as, who may submit, and where job paths may lead.

* ``worker_identity``: workers never run as root unless the configuration says so. A daemon
  running as root runs them as ``[worker] user`` (uid, primary gid and supplementary groups of
  that account) or refuses to start; a daemon running as its own user runs them as itself.
* ``submitter_problem``: a spool file must be owned by root, the daemon's user, the worker user,
  or a member of ``[jobs] submit_group`` (membership is looked up again for every file).
* ``escaped_paths``: just before a worker starts, every path its job names must still resolve
  under ``[jobs] allowed_roots`` (a symlink may have been swapped since the job was validated).
* ``hand_over``: a root daemon gives the directories it made for a job to the worker user.
"""

from __future__ import annotations

import errno
import glob as globmod
import grp
import os
import pwd
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon.core.config import Config
from oddaemon.core.errors import OddaemonError, OperationError
from oddaemon.core.job_paths import under_roots
from oddaemon.core.jobspec import JobSpec
from oddaemon.formats.pipeline_paths import effective_paths, read_config


class ConfinementError(OddaemonError):
    """The daemon would run its workers with more privilege than it was told it may."""


@dataclass(frozen=True)
class Identity:
    """A user the workers run as (the daemon being root): for Popen(user=, group=, extra_groups=)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _in(config: Config) -> str:
    return f" in {config.path}" if config.path else ""


def lookup_user(name: str, config: Config) -> Identity:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfinementError(f"[worker] user = \"{name}\"{_in(config)}: there is no such user on this system; "
                               f"create it (useradd --system {name}) or change the setting") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return Identity(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def worker_identity(config: Config, euid: int) -> Identity | None:
    """Who the workers run as: an Identity to switch to, or None for the daemon's own user.

    Raises ConfinementError (the daemon does not start) when that would be root without
    ``[worker] allow_root = true``, or names a user the daemon cannot become."""
    wanted = config.worker_user
    if euid != 0:
        if wanted:
            me = user_name(euid)
            identity = lookup_user(wanted, config)
            if identity.uid != euid:
                raise ConfinementError(
                    f"[worker] user = \"{wanted}\"{_in(config)}, but oddaemon runs as user {me} (uid {euid}) and "
                    f"cannot switch users; remove the setting (the workers then run as {me}), set it to \"{me}\", "
                    f"or start oddaemon as root to run its workers as {wanted}")
        return None
    if not wanted:
        if config.worker_allow_root:
            return None
        raise ConfinementError(
            "oddaemon is running as root and would run its training workers as root; run it as its own user "
            "(the systemd unit does: User=oddaemon), or set [worker] user = \"oddaemon\"" + _in(config)
            + " to run the workers as that user, or (containers, throwaway machines) set [worker] allow_root = true")
    identity = lookup_user(wanted, config)
    if identity.uid == 0:
        if config.worker_allow_root:
            return None
        raise ConfinementError(f"[worker] user = \"{wanted}\"{_in(config)} is root (uid 0), so the workers would run "
                               "as root; name an unprivileged user, or set [worker] allow_root = true")
    return identity


def _permits(st: os.stat_result, identity: Identity, bit: int) -> bool:
    """Whether ``identity`` has permission ``bit`` (4 read, 2 write, 1 execute/search) on a file."""
    if st.st_uid == identity.uid:
        return bool(st.st_mode >> 6 & bit)
    if st.st_gid == identity.gid or st.st_gid in identity.groups:
        return bool(st.st_mode >> 3 & bit)
    return bool(st.st_mode & bit)


def reach_problem(identity: Identity, path: str, what: str, execute: bool = False) -> str | None:
    """Why ``identity`` cannot get to ``path`` (search permission on every directory on the way,
    symlinks followed, and execute permission on the file itself when ``execute``), or None."""
    steps: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        step = start
        while step not in steps:
            steps.append(step)
            step = os.path.dirname(step)
    for step in sorted(steps, key=len):
        try:
            st = os.stat(step)
        except OSError:
            continue  # missing: whatever uses it reports that itself
        if (stat.S_ISDIR(st.st_mode) or execute) and not _permits(st, identity, 1):
            return (f"the worker user {identity.name} cannot reach {what} {path}: {step} (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}, owned by {user_name(st.st_uid)}) does not let it in; "
                    f"chmod o+x {step}, or choose another [worker] user")
    return None


def check_reachable(identity: Identity | None, work_dir: str, worker_python: str) -> None:
    """At start: the worker user must be able to reach the job work directories and run both the
    lifeline interpreter (the daemon's own) and the worker interpreter."""
    if identity is None:
        return
    problems = [reach_problem(identity, work_dir, "the job work directory"),
                reach_problem(identity, sys.executable, "the daemon's Python (it starts each worker)", execute=True)]
    if os.path.isabs(worker_python):
        problems.append(reach_problem(identity, worker_python, "the [worker] python", execute=True))
    problems = [p for p in problems if p]
    if problems:
        raise ConfinementError("; ".join(problems))


def hand_over(identity: Identity | None, *paths: str, inside: tuple[str, ...], keep: tuple[str, ...] = ()) -> None:
    """Give files and directories the daemon made (it owns them) to the worker user, so a worker
    running as that user can read and write them. What is actually opened must lie ``inside``
    these directories (a parent swapped for a symlink meanwhile is refused, never chowned); a
    symlink, a missing path, one owned by anyone else, or one whose real path is in ``keep`` (e.g.
    the allowed roots themselves) is left alone."""
    if identity is None:
        return
    euid = os.geteuid()
    places = tuple(os.path.realpath(p) for p in inside)
    kept = {os.path.realpath(k) for k in keep}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                continue  # missing, or a symlink: not something the daemon made
            raise OperationError(path, f"open (to hand it to the worker user {identity.name})", exc) from exc
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not under_roots(real, places):
                raise OperationError(path, f"hand to the worker user {identity.name}",
                                     f"it now leads to {real}, outside {', '.join(inside)}")
            st = os.fstat(fd)
            if real not in kept and st.st_uid == euid and (st.st_uid, st.st_gid) != (identity.uid, identity.gid):
                os.fchown(fd, identity.uid, identity.gid)
        except OSError as exc:
            raise OperationError(path, f"chown to the worker user {identity.name}", exc) from exc
        finally:
            os.close(fd)


def submitter_problem(uid: int, group: str, trusted: set[int]) -> str | None:
    """Why the owner ``uid`` of a spool file may not submit, or None when it may.

    Root, the daemon's and the worker's users (``trusted``) and members of ``group`` (primary
    group or listed member, looked up now: a user added to the group can submit at once) may.
    ``group == ""`` turns the check off; a group that does not exist admits nobody else."""
    if not group or uid in trusted:
        return None
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return (f"owned by uid {uid}, which has no user account on this system, so it cannot be a member of the "
                f"submit group '{group}'; submit it as a member of that group")
    name = entry.pw_name
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return (f"owned by user {name} (uid {uid}); the submit group '{group}' does not exist on this system, so "
                f"only root and the daemon's user may submit; ask an administrator to create it "
                f"(groupadd {group}) and add you (usermod -aG {group} {name})")
    if gid in os.getgrouplist(name, entry.pw_gid):
        return None
    return (f"owned by user {name} (uid {uid}), who is not a member of the submit group '{group}'; "
            f"ask an administrator to add you (usermod -aG {group} {name})")


def group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def escaped_paths(spec: JobSpec, allowed_roots: tuple[str, ...],
                  realpath: Callable[[str], str] = os.path.realpath,
                  glob: Callable[[str], list[str]] = globmod.glob) -> list[str]:
    """Every path of ``spec`` that no longer resolves under the allowed roots, each saying where it
    leads now (empty: all is well). The same rules as validation, applied again at worker start."""
    roots = tuple(realpath(r) for r in allowed_roots)
    named = [("pipeline_config", spec.pipeline_config), ("model_dir", spec.model_dir)]
    edits = spec.pipeline
    if edits.fine_tune_checkpoint:
        named += [("[pipeline] fine_tune_checkpoint", edits.fine_tune_checkpoint),
                  ("[pipeline] fine_tune_checkpoint", edits.fine_tune_checkpoint + ".index")]
    if edits.label_map_path:
        named.append(("[pipeline] label_map_path", edits.label_map_path))
    for key in ("train_input_path", "eval_input_path"):
        for pattern in getattr(edits, key) or ():
            named.append((f"[pipeline] {key}", pattern))
            named += [(f"[pipeline] {key} ({pattern} matches)", match) for match in sorted(glob(pattern))]
    try:  # what only pipeline.config names (and no [pipeline] key replaces), where it leads now
        from_config = effective_paths(spec.pipeline_config, read_config(spec.pipeline_config), edits)
    except OSError:
        from_config = []  # (unreadable: the worker says so itself)
    for found in from_config:
        named.append((found.label, found.path))
        if found.kind == "checkpoint":
            named.append((found.label, found.path + ".index"))
        elif found.kind == "glob":
            named += [(f"{found.label} ({found.path} matches)", match) for match in sorted(glob(found.path))]
    escaped = []
    for label, path in named:
        real = realpath(path)
        if not under_roots(real, roots):
            escaped.append(f"{label} {path} now resolves to {real}, outside the allowed roots "
                           f"{', '.join(allowed_roots)}")
    if escaped:
        escaped.append("was a path replaced by a symbolic link after the job was submitted? "
                       "The worker was not started")
    return escaped
