"""A booted Debian 12 container for the systemd tests: build (and cache) a rootfs with
debootstrap, boot it with ``systemd-nspawn -b``, run commands inside with ``nsenter``.

Also runnable by hand: ``python3 tests/systemd/nspawn.py build`` builds the cached rootfs.

Layout:
* ``/var/cache/oddaemon-test/rootfs-bookworm``: the debootstrapped base, never booted; its
  ``.oddaemon-packages`` stamp holds the hash of the package list (a different list rebuilds it).
* each test session boots a throw-away copy-on-write view of it (``--volatile=overlay`` is not
  used: it keeps /var, /etc in tmpfs but hides /usr writes; instead an overlayfs mount with an
  upper dir in a temporary folder, or a plain copy where overlayfs is not available).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("ODDAEMON_TEST_CACHE", "/var/cache/oddaemon-test")
ROOTFS = os.path.join(CACHE_DIR, "rootfs-bookworm")
SUITE = "bookworm"
MIRROR = os.environ.get("ODDAEMON_TEST_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "sudo", "procps", "ca-certificates", "iproute2",
    "python3", "python3-venv", "python3-dev", "gcc", "pkg-config", "libgirepository1.0-dev", "libcairo2-dev",
)
STAMP = ".oddaemon-packages"


def packages_hash() -> str:
    text = "\n".join([SUITE, MIRROR, *sorted(PACKAGES)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def rootfs_is_current(path: str = ROOTFS) -> bool:
    try:
        with open(os.path.join(path, STAMP)) as f:
            return f.read().strip() == packages_hash()
    except OSError:
        return False


def build_rootfs(path: str = ROOTFS, log=sys.stderr) -> float:
    """Debootstrap the base rootfs unless the cached one matches the package list.
    Returns the seconds spent (0.0 when the cache was used)."""
    if rootfs_is_current(path):
        return 0.0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for leftover in os.listdir(os.path.dirname(path)):  # from an interrupted build
        if leftover.startswith("rootfs-building-"):
            shutil.rmtree(os.path.join(os.path.dirname(path), leftover), ignore_errors=True)
    started = time.monotonic()
    staging = tempfile.mkdtemp(prefix="rootfs-building-", dir=os.path.dirname(path))
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, staging, MIRROR]
    print(f"nspawn: building {path}: {' '.join(cmd)}", file=log, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"debootstrap {SUITE} into {staging} failed (exit {result.returncode}):\n"
                           f"{result.stdout[-4000:]}")
    # A container needs no apt caches; keep the cached tree small.
    shutil.rmtree(os.path.join(staging, "var/cache/apt/archives"), ignore_errors=True)
    os.makedirs(os.path.join(staging, "var/cache/apt/archives/partial"), exist_ok=True)
    with open(os.path.join(staging, STAMP), "w") as f:
        f.write(packages_hash() + "\n")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(staging, path)
    return time.monotonic() - started


def _overlay_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return "overlay" in f.read()
    except OSError:
        return False


@dataclass
class Container:
    """One booted container. ``boot()``, then ``sh()``/``run()``, always ``stop()``."""

    base: str = ROOTFS
    binds_ro: dict[str, str] = field(default_factory=dict)  # host path -> container path
    workdir: str = ""
    root: str = ""
    nspawn: subprocess.Popen | None = None
    leader: int = 0
    boot_seconds: float = 0.0
    _mounted: bool = False
    _log_path: str = ""

    def boot(self, timeout: float = 120.0) -> None:
        self.workdir = tempfile.mkdtemp(prefix="oddaemon-nspawn-")
        self.root = os.path.join(self.workdir, "root")
        os.makedirs(self.root)
        started = time.monotonic()
        if _overlay_supported():
            upper, work = os.path.join(self.workdir, "upper"), os.path.join(self.workdir, "work")
            os.makedirs(upper)
            os.makedirs(work)
            result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                     f"lowerdir={self.base},upperdir={upper},workdir={work}", self.root],
                                    capture_output=True, text=True)
            self._mounted = result.returncode == 0
        if not self._mounted:
            subprocess.run(["cp", "-a", "--reflink=auto", f"{self.base}/.", self.root], check=True)
        self._log_path = os.path.join(self.workdir, "console.log")
        machine = f"oddaemon-test-{os.getpid()}"
        cmd = ["systemd-nspawn", "-D", self.root, "-b", "--register=no", "--keep-unit", f"--machine={machine}",
               "--console=passive", "--resolv-conf=copy-host", "--timezone=off"]
        for host, guest in self.binds_ro.items():
            cmd.append(f"--bind-ro={host}:{guest}")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["SYSTEMD_NSPAWN_TMPFS_TMP"] = "0"  # keep /tmp on the overlay, not a tiny tmpfs
        self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self._log_path, "wb"),
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode} while booting:\n"
                                   f"{self.console_tail()}")
            self.leader = self.leader or self._find_leader()
            if self.leader:
                state = self.sh("systemctl is-system-running 2>/dev/null || true", check=False, timeout=30).stdout.strip()
                if state in ("running", "degraded"):
                    self.boot_seconds = time.monotonic() - started
                    return
            time.sleep(0.5)
        raise RuntimeError(f"container did not finish booting within {timeout:.0f}s:\n{self.console_tail()}")

    def _find_leader(self) -> int:
        """The container's PID 1: the child of systemd-nspawn whose command is systemd."""
        try:
            with open(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            return 0
        for pid in children:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "systemd":
                        return pid
            except OSError:
                continue
        return 0

    def console_tail(self, chars: int = 4000) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no console log)"

    def run(self, argv: list[str], check: bool = True, timeout: float = 120.0, input: str | None = None,
            user: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the container (all its namespaces, its root, a clean environment)."""
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container, {' '.join(argv)} exited {result.returncode}:\n"
                                 f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def copy_in(self, host_path: str, guest_path: str) -> None:
        """Copy a host tree into the container (through the root directory, before or after boot)."""
        dest = os.path.join(self.root, guest_path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        subprocess.run(["cp", "-a", "--no-preserve=ownership", host_path, dest], check=True)

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off (then kill nspawn if it lingers) and remove the throw-away root."""
        try:
            if self.nspawn is not None and self.nspawn.poll() is None:
                if self.leader:
                    subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "systemctl", "--no-block",
                                    "poweroff"], capture_output=True, timeout=15)
                try:
                    self.nspawn.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                    self.nspawn.wait(10)
        finally:
            if self.leader:
                try:
                    os.kill(self.leader, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self._mounted:
                for _ in range(20):
                    if subprocess.run(["umount", self.root], capture_output=True).returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    subprocess.run(["umount", "-l", self.root], capture_output=True)
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        spent = build_rootfs()
        print(f"rootfs {ROOTFS}: {f'built in {spent:.0f}s' if spent else 'cached'}")
    else:
        print(__doc__)
