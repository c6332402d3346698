"""``python -m oddaemon.workers doctor [--root PATH ...]``: is this Python environment's TF stack the
one oddaemon's workers are known to work with?

Prints one line per check, ``OK`` or ``FIX: <the exact command>``: the versions of the packages that
break the TF2 Object Detection API when they drift (TensorFlow, Keras, protobuf, NumPy, Pillow, ...)
against the pins in requirements-tf.txt, whether the compatibility shims applied and
``object_detection.model_lib_v2`` imports, the GPUs TensorFlow sees (and whether it should see some),
and the free disk space under each ``--root``. Exit status 0 when everything is OK, else 1.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

TF_VERSION = "2.15.1"

@dataclass(frozen=True)
class Pin:
    """A package to check: the first of ``distributions`` that is installed counts; ``accept`` says
    whether its version works; ``fix`` is the exact command that makes it work."""

    label: str
    distributions: tuple[str, ...]
    accept: Callable[[str], bool]
    fix: str
    required: bool = True


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _tf_fix() -> str:
    if has_nvidia_gpu():
        return f"pip install 'tensorflow[and-cuda]=={TF_VERSION}'"
    return f"pip install 'tensorflow-cpu=={TF_VERSION}'"


PINS = (
    Pin("TensorFlow", ("tensorflow", "tensorflow-cpu", "tf-nightly"), lambda v: v == TF_VERSION, "<tf>"),
    Pin("Keras", ("keras",), lambda v: _major_minor(v)[:2] == (2, 15), "pip install 'keras==2.15.0'"),
    Pin("protobuf", ("protobuf",), lambda v: (3, 20) <= _major_minor(v)[:2] < (4, 26),
        "pip install 'protobuf==4.25.9'"),
    Pin("NumPy", ("numpy",), lambda v: _major_minor(v)[0] < 2, "pip install 'numpy<2'"),
    Pin("Pillow", ("Pillow", "pillow"), lambda v: _major_minor(v)[0] < 10, "pip install 'Pillow<10'"),
    Pin("OpenCV", ("opencv-python-headless", "opencv-python"), lambda v: _major_minor(v)[:2] < (4, 11),
        "pip install 'opencv-python-headless<4.11'"),
    Pin("tf-slim", ("tf-slim",), lambda v: v == "1.1.0", "pip install 'tf-slim==1.1.0'"),
    Pin("tensorflow-io", ("tensorflow-io",), lambda v: _major_minor(v)[:2] == (0, 37),
        "pip install 'tensorflow-io==0.37.1'"),
    Pin("TF OD API", ("tf-object-detection-api", "tf_object_detection_api", "object-detection"),
        lambda v: True, "pip install --no-deps 'tf-object-detection-api==0.1'"),
    Pin("tf-models-official", ("tf-models-official",), lambda v: _major_minor(v)[:2] == (2, 15),
        "pip install --no-deps 'tf-models-official==2.15.0'"),
    Pin("pycocotools", ("pycocotools",), lambda v: True, "pip install pycocotools"),
)


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (whether or not TensorFlow can use it)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def installed_version(distributions: tuple[str, ...]) -> tuple[str, str] | None:
    for name in distributions:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


class Checks:
    def __init__(self):
        self.lines: list[str] = []
        self.ok = True

    def line(self, label: str, value: str, fix: str | None = None) -> None:
        self.lines.append(f"{label:<22} {value:<34} {'OK' if fix is None else 'FIX: ' + fix}")
        print(self.lines[-1], flush=True)
        if fix is not None:
            self.ok = False

    def info(self, label: str, value: str) -> None:
        self.lines.append(f"{label:<22} {value}")
        print(self.lines[-1], flush=True)


def check_versions(checks: Checks) -> None:
    for pin in PINS:
        found = installed_version(pin.distributions)
        fix = _tf_fix() if pin.fix == "<tf>" else pin.fix
        if found is None:
            checks.line(pin.label, "not installed", fix if pin.required else None)
            continue
        name, version = found
        checks.line(pin.label, f"{version} ({name})", None if pin.accept(version) else fix)
    both = [n for n in ("tensorflow", "tensorflow-cpu") if installed_version((n,))]
    if len(both) == 2:
        checks.line("TensorFlow packages", "tensorflow and tensorflow-cpu both installed",
                    f"pip uninstall -y tensorflow tensorflow-cpu && {_tf_fix()}")


def check_imports(checks: Checks) -> bool:
    from oddaemon.workers import compat

    try:
        applied = compat.apply()
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        checks.line("shims", f"failed: {type(exc).__name__}: {exc}"[:60], _tf_fix())
        return False
    for name, status in applied.items():
        checks.line(f"shim {name}", status, None if status != "failed" else
                    f"pip install 'tf-slim==1.1.0' && {_tf_fix()}")
    try:
        import object_detection.model_lib_v2  # noqa: F401
        from object_detection import exporter_lib_v2  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        checks.line("object_detection", f"import failed: {type(exc).__name__}: {exc}"[:80],
                    "pip install -r requirements-tf.txt && pip install --no-deps -r requirements-tf-nodeps.txt")
        return False
    checks.line("object_detection", "model_lib_v2 imports")
    return True


def check_gpus(checks: Checks) -> None:
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        built_with_cuda = tf.test.is_built_with_cuda()
    except Exception as exc:  # noqa: BLE001
        checks.line("GPUs", f"cannot ask TensorFlow: {type(exc).__name__}", _tf_fix())
        return
    names = ", ".join(g.name for g in gpus) or "none"
    if has_nvidia_gpu() and not gpus:
        fix = _tf_fix() if not built_with_cuda else "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        checks.line("GPUs (TensorFlow)", "none, but an NVIDIA driver is present", fix)
    else:
        checks.info("GPUs (TensorFlow)", f"{len(gpus)}: {names}")


def check_disk(checks: Checks, roots: list[str], min_free_gb: float) -> None:
    for root in roots:
        try:
            usage = shutil.disk_usage(root)
        except OSError as exc:
            checks.line(f"disk {root}", f"cannot stat: {exc.strerror}", f"mkdir -p {root}")
            continue
        free_gb = usage.free / 2**30
        value = f"{free_gb:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
        checks.line(f"disk {root}", value, None if free_gb >= min_free_gb else
                    f"free space under {root} (below {min_free_gb:g} GiB; checkpoints and event files need room)")


def run(args) -> int:
    checks = Checks()
    checks.info("python", f"{sys.version.split()[0]} ({sys.executable})")
    check_versions(checks)
    if check_imports(checks):
        check_gpus(checks)
    check_disk(checks, args.root, args.min_free_gb)
    print("doctor: all OK" if checks.ok else "doctor: some checks need a FIX (see above)", flush=True)
    return 0 if checks.ok else 1
