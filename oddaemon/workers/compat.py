"""Compatibility shims for the TF2 Object Detection API on TensorFlow 2.15, applied in worker
processes only, before ``object_detection`` is imported. Idempotent: ``apply()`` may run many times.

* ``tf-slim`` 1.1.0 calls ``control_flow_ops.case``, ``.cond``, ``.while_loop`` and ``.Assert``,
  which TF 2.15 moved to ``control_flow_case``, ``cond``, ``while_loop`` and ``control_flow_assert``
  (used by the TFExample decoder, i.e. by every input pipeline). They are re-exported on
  ``tensorflow.python.ops.control_flow_ops``.
* Pillow 10 removed ``FreeTypeFont.getsize`` (and ``ImageFont.getsize``), which the eval image
  summaries (``visualization_utils``) call. The pin is Pillow<10; with a newer Pillow an equivalent
  based on ``getbbox`` is added so that evaluation does not crash (``doctor`` still says FIX).

``quiet_environment()`` sets the environment variables that must be in place before tensorflow is
imported (log level, no oneDNN banner noise is left as is: TF's normal logs are wanted).
"""

from __future__ import annotations

import os

_APPLIED: dict[str, bool] = {}

# (name on control_flow_ops, module under tensorflow.python.ops, attribute there)
_CONTROL_FLOW_MOVES = (
    ("case", "control_flow_case", "case"),
    ("cond", "cond", "cond"),
    ("while_loop", "while_loop", "while_loop"),
    ("Assert", "control_flow_assert", "Assert"),
)


def prepare_environment() -> None:
    """Environment for a worker process; call before importing tensorflow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def _shim_control_flow_ops() -> bool:
    import importlib

    from tensorflow.python.ops import control_flow_ops

    for name, module_name, attribute in _CONTROL_FLOW_MOVES:
        if hasattr(control_flow_ops, name):
            continue
        module = importlib.import_module(f"tensorflow.python.ops.{module_name}")
        setattr(control_flow_ops, name, getattr(module, attribute))
    return all(hasattr(control_flow_ops, name) for name, _, _ in _CONTROL_FLOW_MOVES)


def _shim_pillow() -> bool:
    try:
        from PIL import ImageFont
    except ImportError:
        return True  # nothing to patch; object_detection's own import will complain

    def getsize(font, text, *args, **kwargs):
        left, top, right, bottom = font.getbbox(text, *args, **kwargs)
        return right - left, bottom - top

    for cls_name in ("FreeTypeFont", "ImageFont", "TransposedFont"):
        cls = getattr(ImageFont, cls_name, None)
        if cls is not None and not hasattr(cls, "getsize") and hasattr(cls, "getbbox"):
            cls.getsize = getsize
    return True


def apply() -> dict[str, bool]:
    """Apply every shim (once); returns {shim name: applied/needed-and-working}."""
    if not _APPLIED:
        prepare_environment()
        _APPLIED["tf_slim_control_flow_ops"] = _shim_control_flow_ops()
        _APPLIED["pillow_getsize"] = _shim_pillow()
    return dict(_APPLIED)


def configure_logging() -> None:
    """TF's normal INFO logs on stderr, the way model_main_tf2.py --alsologtostderr prints them."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.set_stderrthreshold(absl_logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.INFO)
