"""A PyTorch stand-in worker for GPU isolation checks on NVIDIA hosts.

``python -m oddaemon.testing.torch_probe train --job JOB.json`` records what the process can see
(CUDA_VISIBLE_DEVICES, torch's device count and each visible device's UUID), allocates a tensor on
every visible GPU, holds them for ``hold_seconds`` and writes ``model_dir/probe.json``.
Used by ``scripts/gpu_check.py``; never imported by the daemon.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    job_path = argv[argv.index("--job") + 1]
    with open(job_path) as f:
        job = json.load(f)
    model_dir = job["spec"]["model_dir"]
    os.makedirs(model_dir, exist_ok=True)
    started = time.time()
    import torch  # noqa: PLC0415

    count = torch.cuda.device_count()
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    tensors = [torch.ones(1024, 1024, device=f"cuda:{i}") for i in range(count)]
    print(f"probe: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} devices={count} uuids={uuids}",
          flush=True)
    time.sleep(2.0)
    result = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device_count": count, "uuids": uuids,
              "sum": [float(t.sum()) for t in tensors], "started": started, "ended": time.time(),
              "assigned": job.get("gpus"), "env_keys": sorted(os.environ)}
    with open(os.path.join(model_dir, "probe.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
