"""One booted Debian 12 container with oddaemon installed by scripts/install, shared by the
systemd tests of a session (``installed``). It is always powered off at the end."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import nspawn
import pytest
from nspawn import REPO

GUEST_SRC = "/root/oddaemon-src"
WHEELHOUSE_GUEST = "/run/oddaemon-wheelhouse"
# The host's TF stack (site-packages with tensorflow and object_detection), lent read-only to the
# container for the real-TF test: TF from PyPI would take many minutes per boot.
TF_SITE_GUEST = "/opt/oddaemon-host-tf-site-packages"

TEST_CONFIG = """\
[paths]
spool_dir = "/var/spool/oddaemon"
state_dir = "/var/lib/oddaemon"
log_dir = "/var/log/oddaemon"
[gpus]
devices = "none"
[metrics]
listen = ""
[restart]
max_restarts = 3
backoff_base_seconds = 0.5
backoff_cap_seconds = 2.0
[jobs]
allowed_roots = ["/srv/oddaemon", "/var/lib/oddaemon/models"]
max_cpu_jobs = 2
stop_grace_seconds = 5.0
submit_group = "oddaemon-submit"
[worker]
module = "oddaemon.testing.standin"
"""

# Short watchdog and restart delays so the watchdog test takes seconds; the shipped values are
# checked in test_units.py.
TEST_DROPIN = """\
[Service]
WatchdogSec=6
TimeoutAbortSec=5
RestartSec=1
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, nsenter)"
    missing = nspawn.missing_tools()
    if missing:
        return f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container util-linux)"
    return None


def wheelhouse() -> str | None:
    """Wheels for requirements-daemon.txt (+ the build backend), built once on the host (same
    Debian 12, same Python) so the container installs offline in seconds instead of compiling
    PyGObject each run. None: let the container's pip use PyPI (the host network is shared)."""
    if os.environ.get("ODDAEMON_TEST_PYPI"):
        return None
    with open(os.path.join(REPO, "requirements-daemon.txt"), "rb") as f:
        requirements = f.read()
    key = hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    path = os.path.join(nspawn.CACHE_DIR, f"wheels-{key}")
    if os.path.isfile(os.path.join(path, ".complete")):
        return path
    staging = path + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for cmd in (pip + ["wheel", "-w", staging, "-r", os.path.join(REPO, "requirements-daemon.txt")],
                pip + ["download", "-d", staging, "--only-binary=:all:", "setuptools>=68", "wheel"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"wheelhouse: {' '.join(cmd)} failed, the container will use PyPI:\n{result.stderr[-2000:]}",
                  file=sys.stderr)
            shutil.rmtree(staging, ignore_errors=True)
            return None
    open(os.path.join(staging, ".complete"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.rename(staging, path)
    return path


def host_tf_site() -> str | None:
    """The host directory holding both tensorflow and object_detection (the venv running pytest,
    tensorflow-cpu 2.15.1, Python 3.11 like the container's Debian 12), or None. Its compiled
    modules are manylinux cp311 wheels: they load in Debian's python3.11 as well. Lent as a
    directory on sys.path (a .pth line), never as a whole venv: a venv names its interpreter's
    path, and the host's (pyenv under /root) is not in the container and would be hidden by
    ProtectHome=yes anyway."""
    found = set()
    for module in ("tensorflow", "object_detection"):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        found.add(os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0])))
    return found.pop() if len(found) == 1 else None


TIMINGS: dict[str, float] = {}  # what the systemd tests measured, shown in pytest's summary


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("systemd tests, seconds (exposure: systemd-analyze security): "
                                    + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


class Installed:
    """The container plus what the tests measured and a few helpers."""

    config = TEST_CONFIG  # what the fixture writes to /etc/oddaemon/oddaemon.toml

    def __init__(self, container: nspawn.Container, tf_site: str | None = None):
        self.c = container
        self.timings = TIMINGS
        self.tf_site = tf_site  # TF_SITE_GUEST when the host lent its TF stack, else None

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.c.sh(script, **kwargs)

    def as_user(self, user: str, script: str, **kwargs) -> subprocess.CompletedProcess:
        return self.c.run(["/bin/sh", "-c", script], user=user, **kwargs)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show oddaemon.service -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.journal()}")
            time.sleep(interval)

    def journal(self, lines: int = 60) -> str:
        return self.sh(f"journalctl -u oddaemon.service --no-pager -o short-monotonic | grep -v 'new/pending-' "
                       f"| tail -n {lines}", check=False).stdout

    # ---- the journal from a point on, and what systemd received on the notification socket
    def cursor(self) -> str:
        """The journal's current end: pass it to entries() / notifications() for what comes after."""
        out = self.sh("journalctl --no-pager -q -n 0 --show-cursor").stdout
        match = re.search(r"^-- cursor: (\S+)", out, re.M)
        assert match, out
        return match.group(1)

    def entries(self, cursor: str) -> list[tuple[int, str]]:
        """(PID, message) of each journal entry of oddaemon.service after ``cursor``, in order:
        PID 1's own lines about the unit (UNIT=; without their "oddaemon.service: " prefix) and
        the daemon's output (_SYSTEMD_UNIT=)."""
        out = self.sh(f"journalctl --no-pager -q -u oddaemon.service --after-cursor='{cursor}' -o json "
                      "--output-fields=_PID,MESSAGE", check=False, timeout=60).stdout
        result = []
        for line in out.splitlines():
            record = json.loads(line)
            message = record.get("MESSAGE", "")
            if isinstance(message, list):  # journald stores non-UTF-8 or control characters as bytes
                message = bytes(message).decode("utf-8", "replace")
            pid = int(record.get("_PID", 0))
            if pid == 1 and message.startswith("oddaemon.service: "):
                message = message[len("oddaemon.service: "):]
            result.append((pid, message))
        return result

    def notifications(self, cursor: str) -> list[tuple[int, str]]:
        """(sender PID, fields) of each sd_notify message PID 1 received for the unit after
        ``cursor``, e.g. (412, "READY=1, STATUS=idle; no GPUs"). Logged only at debug level
        (manager_debug())."""
        found = []
        for pid, message in self.entries(cursor):
            match = re.match(r"Got notification message from PID (\d+) \((.*)\)$", message, re.S)
            if pid == 1 and match:
                found.append((int(match.group(1)), match.group(2)))
        return found

    @contextlib.contextmanager
    def manager_debug(self):
        """systemd's own log level at debug for a while (it logs each notification it receives)."""
        before = self.sh("systemd-analyze log-level").stdout.strip() or "info"
        self.sh("systemd-analyze log-level debug")
        try:
            yield
        finally:
            self.sh(f"systemd-analyze log-level {before}")

    def unit_usec(self, interface: str, prop: str) -> int:
        """A timestamp property of oddaemon.service in microseconds (systemctl show rounds to seconds)."""
        out = self.sh("busctl get-property org.freedesktop.systemd1 /org/freedesktop/systemd1/unit/oddaemon_2eservice "
                      f"org.freedesktop.systemd1.{interface} {prop}").stdout.split()
        assert out[0] == "t", out
        return int(out[1])

    def write_config(self, text: str) -> None:
        self.sh("cat > /etc/oddaemon/oddaemon.toml", input=text)

    def oddaemon(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.c.run(["/opt/oddaemon/.venv/bin/oddaemon", *args], check=check)

    def job(self, name: str) -> dict | None:
        result = self.oddaemon("status", "--json", name, check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def workers(self, role: str = "train") -> list[int]:
        """Stand-in worker processes of ``role`` ("" for any: the warm preflight, evaluators, ...)
        anywhere in the container."""
        # [.] keeps this shell's own command line from matching.
        out = self.sh(f"pgrep -f ' -m oddaemon[.]testing[.]standin {role}' || true").stdout
        return [int(p) for p in out.split()]

    def cgroup_of(self, pid: int) -> str:
        return self.sh(f"cat /proc/{pid}/cgroup 2>/dev/null || true").stdout.strip()

    def unit_pids(self) -> list[int]:
        """Every process of oddaemon.service (its cgroup's members)."""
        # cgroup v2 ("0::/system.slice/...") or, on a cgroup v1 host, the name=systemd hierarchy; with
        # per-job cgroups (Delegate=yes on v2) the daemon's leaf "daemon" and its workers' "job-NAME-ROLE"
        out = self.sh("grep -lE ':/system.slice/oddaemon.service(/[^/]+)?$' /proc/[0-9]*/cgroup 2>/dev/null "
                      "|| true").stdout
        return sorted(int(line.split("/")[2]) for line in out.split())


@pytest.fixture(scope="session")
def installed():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    built = nspawn.build_rootfs()
    wheels = wheelhouse()
    binds = {wheels: WHEELHOUSE_GUEST} if wheels else {}
    pip_env = ""
    if not wheels:
        # pip in the container reaches PyPI through the host's network (nspawn shares it), and
        # must trust what the host trusts (a TLS-inspecting proxy's CA, for one).
        ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(ca):
            binds[ca] = "/run/host-ca-certificates.crt"
            pip_env = "PIP_CERT=/run/host-ca-certificates.crt "
        pip_env += "".join(f"{k}={os.environ[k]} " for k in ("PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT") if k in os.environ)
    tf_site = host_tf_site()
    if tf_site:
        binds[tf_site] = TF_SITE_GUEST
    container = nspawn.Container(binds_ro=binds)
    inst = Installed(container, TF_SITE_GUEST if tf_site else None)
    inst.timings["debootstrap"] = built
    try:
        container.boot()
        inst.timings["boot"] = container.boot_seconds
        container.copy_in(REPO, GUEST_SRC)
        t = time.monotonic()
        inst.install_command = (f"{pip_env}{GUEST_SRC}/scripts/install --without-tf"  # stand-in workers here
                                + (f" --wheelhouse {WHEELHOUSE_GUEST}" if wheels else ""))
        result = inst.sh(inst.install_command, check=False, timeout=900)
        assert result.returncode == 0, f"scripts/install failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        inst.timings["install"] = time.monotonic() - t
        inst.install_output = result.stdout
        inst.sh("cat > /etc/oddaemon/oddaemon.toml", input=TEST_CONFIG)
        inst.sh("mkdir -p /etc/systemd/system/oddaemon.service.d && "
                "cat > /etc/systemd/system/oddaemon.service.d/test.conf", input=TEST_DROPIN)
        inst.sh("systemctl daemon-reload")
        # alice may submit, mallory may not.
        inst.sh("useradd -m -G oddaemon-submit alice && useradd -m mallory")
        yield inst
    finally:
        try:
            if container.leader:
                print("\n--- oddaemon journal (last lines) ---\n" + inst.journal(40), file=sys.stderr)
        finally:
            container.stop()
        inst.timings["total"] = time.monotonic() - started
