"""The daphne backpressure middleware, kept importable here for hosts that wired it by this path.

It lives in realtime_kit/backpressure.py: both apps stream through it.
"""

from __future__ import annotations

from realtime_kit.backpressure import DaphneBackpressure, WriteGate, twisted_request

__all__ = ["DaphneBackpressure", "WriteGate", "twisted_request"]
