"""The slmkern logger and a log-once helper for fallbacks (never a silent slow path)."""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("slmkern")
_seen: set[str] = set()
_lock = threading.Lock()


def log_once(key: str, msg: str, level: int = logging.INFO) -> None:
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    logger.log(level, msg)
