"""A real one-node Slurm cluster for tests: ``munged``, ``slurmctld`` and ``slurmd`` (Debian 12's
22.05) started as root in a temporary directory with their own socket, ports and state, and stopped
at the end. Two partitions, ``train`` and ``eval``, on the one node ``localhost``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from tests.support.harness import wait_for

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing() -> str | None:
    """Why a real Slurm cannot run here (None when it can)."""
    absent = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing; Debian: slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.sock")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.cpus = cpus
        self.procs: list[str] = []  # pid files of what we started

    def start(self) -> SlurmCluster:
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        r = self.root
        subprocess.run([_binary("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log",
                        f"--seed-file={r}/munge/seed"], check=True, capture_output=True, timeout=30)
        self.procs.append(f"{r}/munge/munged.pid")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=oddtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
KillWait=5
MpiDefault=none
NodeName=localhost CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName=train Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=eval Nodes=ALL MaxTime=INFINITE State=UP
""")
        subprocess.run([_binary("slurmctld"), "-i"], env=self.env, check=True, capture_output=True, timeout=30)
        self.procs.append(f"{r}/slurmctld.pid")
        subprocess.run([_binary("slurmd")], env=self.env, check=True, capture_output=True, timeout=30)
        self.procs.append(f"{r}/slurmd.pid")
        wait_for(self.idle, 60, what="the test Slurm node to be idle")
        return self

    def idle(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%T", "-p", "train").stdout.strip()
        return out.startswith("idle")

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60, check=False)

    def jobs(self) -> dict[int, dict]:
        """Every job the controller knows, from squeue --json."""
        import json  # noqa: PLC0415 - only this helper reads JSON

        out = self.run("squeue", "--json")
        return {j["job_id"]: j for j in json.loads(out.stdout)["jobs"]} if out.returncode == 0 else {}

    def stop(self) -> None:
        """Cancel what is left, stop the daemons (slurmd, slurmctld, munged), and wait for them."""
        self.run("scancel", "--full", "--user=root")
        for pidfile in reversed(self.procs):
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()
