"""The process-wide trace lock (torch.export is not thread-safe); see graftlib.safety.exclusive_trace."""
from __future__ import annotations

import threading

__all__ = ["TRACE_LOCK"]

TRACE_LOCK = threading.RLock()
