"""NVIDIA GPU discovery for ``gpus = "auto"``: NVML (nvidia-ml-py) first, then ``nvidia-smi``, else none.

Returns the GPU indices as CUDA numbers them (the ids written into CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Discovery:
    ids: tuple[int, ...]
    source: str  # "nvml", "nvidia-smi", "config" or "none"
    detail: str = ""


def discover_nvml() -> Discovery | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return Discovery((), "none", f"NVML unavailable: {exc}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        return Discovery(tuple(range(count)), "nvml", f"{count} GPU(s) via NVML")
    finally:
        pynvml.nvmlShutdown()


def discover_nvidia_smi() -> Discovery | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Discovery((), "none", f"nvidia-smi failed: {exc}")
    if out.returncode != 0:
        return Discovery((), "none", f"nvidia-smi failed: {out.stderr.strip() or out.returncode}")
    ids = tuple(int(line) for line in out.stdout.split() if line.strip().isdigit())
    return Discovery(ids, "nvidia-smi", f"{len(ids)} GPU(s) via nvidia-smi")


def discover(setting: str | tuple[int, ...]) -> Discovery:
    if isinstance(setting, tuple):
        return Discovery(setting, "config", "listed in the configuration")
    reasons = []
    for probe in (discover_nvml, discover_nvidia_smi):
        found = probe()
        if found is None:
            continue
        if found.ids:
            return found
        reasons.append(found.detail)
    return Discovery((), "none", "; ".join(reasons) or "no NVML library and no nvidia-smi: no NVIDIA GPUs")
