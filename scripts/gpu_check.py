#!/usr/bin/env python3
"""GPU isolation check for a host with NVIDIA GPUs (run by hand or on a lent GPU machine).

Starts the real daemon (GPU discovery "auto") with the PyTorch probe worker, submits GPU and
CPU jobs, and checks that each job's process saw exactly the GPUs it was allocated (by UUID,
compared with NVML), that GPU jobs never overlapped on one GPU, and that workers did not
inherit NOTIFY_SOCKET. Prints a JSON report; exit status 0 when every check passed.
    python3 scripts/gpu_check.py [REPORT.json]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import pynvml  # noqa: PLC0415 - optional dependency (nvidia-ml-py), only on GPU hosts

    pynvml.nvmlInit()
    nvml = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
    nvml = [u.decode() if isinstance(u, bytes) else u for u in nvml]
    root = tempfile.mkdtemp(prefix="oddaemon-gpu-")
    cfg = os.path.join(root, "oddaemon.toml")
    with open(cfg, "w") as f:
        f.write(f'[paths]\nspool_dir = "{root}/spool"\nstate_dir = "{root}/state"\nlog_dir = "{root}/logs"\n'
                f'[gpus]\ndevices = "auto"\n[metrics]\nlisten = ""\n'
                f'[jobs]\nallowed_roots = ["{root}"]\nmax_cpu_jobs = 2\n'
                f'[worker]\npython = "{sys.executable}"\nmodule = "oddaemon.testing.torch_probe"\nallow_root = true\n'
                f'[daemon]\nevent_loop = "auto"\n')
    with open(os.path.join(root, "pipeline.config"), "w") as f:
        f.write("train_config { num_steps: 1 }\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               NOTIFY_SOCKET="/run/should-not-leak", SECRET_TOKEN="should-not-leak")
    daemon = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", cfg, "serve"], env=env,
                              stdout=open(os.path.join(root, "daemon.log"), "wb"), stderr=subprocess.STDOUT)
    jobs = {"gpu_count": "gpus = 1", "gpu_ids": "gpus = [0]", "cpu": "gpus = 0"}
    if len(nvml) > 1:
        jobs["gpu_two"] = "gpus = 2"
    try:
        time.sleep(2)
        os.makedirs(f"{root}/spool/tmp", exist_ok=True)
        for name, gpus in jobs.items():
            with open(f"{root}/spool/tmp/{name}.toml", "w") as f:
                f.write(f'pipeline_config = "{root}/pipeline.config"\nmodel_dir = "{root}/models/{name}"\n'
                        f'[train]\n{gpus}\n')
            os.rename(f"{root}/spool/tmp/{name}.toml", f"{root}/spool/new/{name}.toml")
        deadline = time.time() + 240
        while time.time() < deadline and not all(os.path.exists(f"{root}/models/{n}/probe.json") for n in jobs):
            time.sleep(0.5)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    report = {"nvml_uuids": nvml, "jobs": {}, "checks": []}
    ok = True

    def check(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        report["checks"].append({"check": name, "passed": passed, "detail": detail})

    intervals = []
    for name in jobs:
        path = f"{root}/models/{name}/probe.json"
        if not os.path.exists(path):
            check(f"{name} ran", False, "no probe.json")
            continue
        probe = json.load(open(path))
        report["jobs"][name] = probe
        assigned = probe["assigned"]
        expected = ["GPU-" + u if not u.startswith("GPU-") else u for u in probe["uuids"]]
        check(f"{name} sees exactly its GPUs", probe["device_count"] == len(assigned)
              and expected == [nvml[i] for i in assigned],
              f"assigned {assigned}, CUDA_VISIBLE_DEVICES={probe['cuda_visible_devices']!r}, saw {probe['uuids']}")
        check(f"{name} environment is clean", "NOTIFY_SOCKET" not in probe["env_keys"]
              and "SECRET_TOKEN" not in probe["env_keys"], ",".join(probe["env_keys"]))
        for g in assigned:
            intervals.append((g, probe["started"], probe["ended"], name))
    overlaps = [(a[3], b[3]) for a in intervals for b in intervals
                if a[3] < b[3] and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]]
    check("no two jobs on one GPU at once", not overlaps, f"overlaps: {overlaps}")
    report["daemon_log_tail"] = open(os.path.join(root, "daemon.log")).read()[-3000:]
    out = json.dumps(report, indent=1)
    print(out)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(out)
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
