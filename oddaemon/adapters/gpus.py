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
        import pynvml  # noqa: PLC0415 - optional dependency (nvidia-ml-py)
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure: NVMLError_LibraryNotFound, DriverNotLoaded, ...
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


def probe() -> Discovery | None:
    """What the driver says (NVML, then nvidia-smi), or None when nothing can tell (no NVIDIA
    library, no nvidia-smi, or neither works: e.g. no driver on this machine)."""
    reasons = []
    for source in (discover_nvml, discover_nvidia_smi):
        found = source()
        if found is None:
            continue
        if found.source != "none":
            return found
        reasons.append(found.detail)
    return None if not reasons else Discovery((), "none", "; ".join(reasons))


def discover(setting: str | tuple[int, ...], probe_gpus=probe) -> Discovery:
    found = probe_gpus()
    if isinstance(setting, tuple):
        return check_listed(setting, found)
    if found is not None and found.ids:
        return found
    reason = found.detail if found is not None else ""
    return Discovery((), "none", reason or "no NVML library and no nvidia-smi: no NVIDIA GPUs")


def check_listed(listed: tuple[int, ...], found: Discovery | None) -> Discovery:
    """GPUs listed in the configuration that the driver does not report are left out (with the
    reason in ``detail``): a job is never given a GPU that is gone. When the driver cannot be asked
    at all, the list is trusted as it is."""
    if found is None or found.source == "none":
        why = f" (not verified: {found.detail})" if found is not None else " (not verified: no NVML, no nvidia-smi)"
        return Discovery(listed, "config", "listed in the configuration" + why)
    gone = [g for g in listed if g not in found.ids]
    present = tuple(g for g in listed if g in found.ids)
    if not gone:
        return Discovery(listed, "config", f"listed in the configuration; all present ({found.detail})")
    return Discovery(present, "config", f"listed in the configuration, but GPU(s) {', '.join(map(str, gone))} "
                                        f"are gone ({found.detail}); left out until the daemon restarts with them back")
