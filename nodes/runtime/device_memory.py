"""How much memory a feature may keep on the device the model runs on."""

from __future__ import annotations

import comfy.model_management as mm

from ...cache_core.memory_plan import WARN_CACHE_BYTES

AUTO_BUDGET_FRACTION = 0.4       # of the free memory on the model's device


def budget_bytes(budget_mb: int, device) -> int | None:
    """The budget in bytes: ``budget_mb`` when set, else a fraction of the free memory of
    ``device`` (None when that cannot be read)."""
    if budget_mb and budget_mb > 0:
        return int(budget_mb) * 2**20
    try:
        return int(AUTO_BUDGET_FRACTION * mm.get_free_memory(device))
    except Exception:
        return None


def warning_limit(device) -> int:
    """Bytes above which the estimate is worth a warning: 4 GiB, or 30 % of a GPU's free memory."""
    limit = WARN_CACHE_BYTES
    try:
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            limit = min(limit, int(0.3 * mm.get_free_memory(device)))
    except Exception:
        pass
    return limit
