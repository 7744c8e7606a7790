"""The pack's logger and its once-per-process warnings."""

from __future__ import annotations

import logging

log = logging.getLogger("speculative_cache")

_warned: set = set()


def warn_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per process (at ``level``)."""
    if message not in _warned:
        _warned.add(message)
        log.log(level, message)
