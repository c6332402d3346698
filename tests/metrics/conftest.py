"""The metrics tests reuse the integration harness (a real daemon with the stand-in worker)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))
