"""A real one-node Slurm cluster for tests: ``munged``, ``slurmctld`` and ``slurmd`` (Debian 12's
22.05) started as root in a temporary directory with their own socket, ports and state, and stopped
at the end. Two partitions, ``train`` and ``eval``, on the one node ``localhost``.

``SlurmCluster(root, nodes=N)`` with N > 1: N compute nodes ``node1`` .. ``nodeN``, each a ``slurmd``
in a network namespace and a UTS namespace of its own (its own address and host name, as a machine
of a cluster: Debian's build is not made with ``--enable-multiple-slurmd``, so two ``slurmd`` must not
share one), joined to the controller by a veth pair on a bridge of this host with a private /24
(the controller listens on the bridge's ``.1``; node k is ``.(10+k)``). The file system, and with it
the munge socket and every model_dir, is the host's. ``stop`` removes the namespaces, the bridge,
``/etc/netns/<ns>`` and every process left in a namespace."""

from __future__ import annotations

import os
import random
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


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=check)


class _Network:
    """The bridge and one network namespace per node (several-node clusters)."""

    def __init__(self, nodes: int):
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.subnet = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
        self.bridge = f"odbr{tag}"[:15]
        self.names = [f"node{k}" for k in range(1, nodes + 1)]
        self.namespaces = [f"oddaemon-{tag}-{name}" for name in self.names]
        self.veths = [f"odv{tag}h{k}"[:15] for k in range(1, nodes + 1)]

    @property
    def controller(self) -> str:
        return f"{self.subnet}.1"

    def address(self, k: int) -> str:
        return f"{self.subnet}.{10 + k + 1}"  # k from 0

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.address(k)} {name}\n" for k, name in enumerate(self.names))
        for k, (ns, veth) in enumerate(zip(self.namespaces, self.veths)):
            _ip("netns", "add", ns)
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:  # bound over /etc/hosts in the node (``inside``)
                f.write(hosts)
            inner = f"{veth[:-2]}n{k + 1}"[:15]
            _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", inner, "netns", ns)
            for argv in (("addr", "add", f"{self.address(k)}/24", "dev", inner), ("link", "set", inner, "up"),
                         ("link", "set", "lo", "up"), ("route", "add", "default", "via", self.controller)):
                _ip("-n", ns, *argv)

    def inside(self, k: int, argv: list[str]) -> list[str]:
        """``argv`` run in node k's network namespace, with its own host name and /etc/hosts. Not
        ``ip netns exec``: it mounts a sysfs of its own, without /sys/fs/cgroup, and slurmd needs that."""
        ns = self.namespaces[k]
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c",
                f'hostname {self.names[k]} && mount --bind /etc/netns/{ns}/hosts /etc/hosts && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # what our slurmd started there (slurmstepd, a job's tasks)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # also removes its end of the veth pair, and so the pair
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2, slurmd_prefix: tuple[str, ...] = (), nodes: int = 1,
                 slurmd_timeout: int | None = None):
        self.root = root
        self.slurmd_timeout = slurmd_timeout  # seconds until a silent node is DOWN (None: Slurm's 300)
        self.nodes = nodes
        self.network = _Network(nodes) if nodes > 1 else None
        self.slurmd_prefix = slurmd_prefix  # e.g. unseen_writes.UnseenRoot.unseen_argv(): its jobs write unseen
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.sock")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.cpus = cpus
        self.procs: list[str] = []  # pid files of what we started

    def start(self) -> SlurmCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # what did start, and the network
            raise

    def _start(self) -> SlurmCluster:
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
        net = self.network
        if net is not None:
            net.create()
        node_lines = (f"NodeName=localhost CPUs={self.cpus} RealMemory=2000 State=UNKNOWN" if net is None else
                      "\n".join(f"NodeName={name} NodeAddr={net.address(k)} CPUs={self.cpus} RealMemory=2000 State=UNKNOWN"
                                for k, name in enumerate(net.names)))
        per_node = "" if net is None else "-%n"
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=oddtest
SlurmctldHost=localhost{'' if net is None else f'({net.controller})'}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{'' if net is None else '/%n'}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{per_node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
{f"SlurmdTimeout={self.slurmd_timeout}" if self.slurmd_timeout else ""}
MinJobAge=300
KillWait=5
MpiDefault=none
{node_lines}
PartitionName=train Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=eval Nodes=ALL MaxTime=INFINITE State=UP
""")
        subprocess.run([_binary("slurmctld"), "-i"], env=self.env, check=True, capture_output=True, timeout=30)
        self.procs.append(f"{r}/slurmctld.pid")
        if net is None:
            subprocess.run([*self.slurmd_prefix, _binary("slurmd")], env=self.env, check=True, capture_output=True,
                           timeout=30)
            self.procs.append(f"{r}/slurmd.pid")
        for k, name in enumerate(net.names if net else ()):
            os.makedirs(f"{r}/spool/{name}", exist_ok=True)
            subprocess.run([*self.slurmd_prefix, *net.inside(k, [_binary("slurmd")])], env=self.env, check=True,
                           capture_output=True, timeout=30)
            self.procs.append(f"{r}/slurmd-{name}.pid")
        wait_for(self.idle, 60, what="the test Slurm node(s) to be idle")
        return self

    def crash_node(self) -> int:
        """The one node dies as a machine does (one-node clusters): its slurmd, the job steps and every
        process of its jobs are killed at once (SIGKILL); only processes of this cluster (their
        SLURM_CONF) are touched. Returns how many were killed."""
        killed = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            ours = f"SLURM_CONF={self.conf}".encode() in environ
            if ours and (comm in ("slurmd", "slurmstepd") or any(v.startswith(b"SLURM_JOB_ID=") for v in environ)):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def restart_node(self) -> None:
        """slurmd again after ``crash_node``; ReturnToService=2 brings the node back into service."""
        subprocess.run([*self.slurmd_prefix, _binary("slurmd")], env=self.env, check=True, capture_output=True,
                       timeout=30)

    def idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%T", "-p", "train").stdout.split()
        return len(states) == self.nodes and all(s.startswith("idle") for s in states)

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
        if self.network is not None:
            self.network.remove()
