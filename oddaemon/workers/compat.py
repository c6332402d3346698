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

_APPLIED: dict[str, str] = {}  # shim name -> "applied", "not needed" or "failed"

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


def _shim_control_flow_ops() -> str:
    import importlib

    from tensorflow.python.ops import control_flow_ops

    missing = [move for move in _CONTROL_FLOW_MOVES if not hasattr(control_flow_ops, move[0])]
    for name, module_name, attribute in missing:
        module = importlib.import_module(f"tensorflow.python.ops.{module_name}")
        setattr(control_flow_ops, name, getattr(module, attribute))
    if not all(hasattr(control_flow_ops, name) for name, _, _ in _CONTROL_FLOW_MOVES):
        return "failed"
    return "applied" if missing else "not needed"


def _shim_pillow() -> str:
    try:
        from PIL import ImageFont
    except ImportError:
        return "not needed"  # nothing to patch; object_detection's own import will complain

    def getsize(font, text, *args, **kwargs):
        left, top, right, bottom = font.getbbox(text, *args, **kwargs)
        return right - left, bottom - top

    patched = False
    for cls_name in ("FreeTypeFont", "ImageFont", "TransposedFont"):
        cls = getattr(ImageFont, cls_name, None)
        if cls is not None and not hasattr(cls, "getsize") and hasattr(cls, "getbbox"):
            cls.getsize = getsize
            patched = True
    return "applied" if patched else "not needed"


def apply() -> dict[str, str]:
    """Apply every shim (once); returns {shim name: "applied" | "not needed" | "failed"}."""
    if not _APPLIED:
        prepare_environment()
        _APPLIED["tf_slim_control_flow_ops"] = _shim_control_flow_ops()
        _APPLIED["pillow_getsize"] = _shim_pillow()
    return dict(_APPLIED)


def configure_logging() -> None:
    """TF's normal INFO logs on stderr, as ``model_main_tf2.py --logtostderr`` prints them: absl's
    handler on the root logger (``I1126 04:37:48.123456 12345 model_lib_v2.py:705] ...``) plus
    tensorflow's own ``INFO:tensorflow:...`` line. Call before object_detection is imported: its
    dependency ``lvis`` calls ``logging.basicConfig`` at import, which is a no-op once the root
    logger has a handler (otherwise every TF message would print a third time)."""
    import logging

    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["oddaemon.workers", "--logtostderr"], known_only=True)
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, absl_logging.ABSLHandler):
            root.removeHandler(handler)
    logging.getLogger("tensorflow").setLevel(logging.INFO)
