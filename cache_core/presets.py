"""Presets: settings per model family, and the papers' settings for reproducing them.

A preset is a dict of CacheConfig fields. How the node applies it (see
``resolve_settings``): with ``custom`` the inputs are taken as they are; with ``auto`` or a
family preset, every input still at its default takes the preset's value and inputs the
user changed win; a ``paper_*`` preset replaces every setting except the threshold, which
gives the paper's base threshold."""

from __future__ import annotations

from .config import CacheConfig

# SpeCa reference code, FLUX.1-dev (research/algorithms.md 2.2: speca-flux sample.py/cli.py):
# Taylor order 2 on the step axis, first_enhance 3, min/max taylor steps 2/8, base threshold
# 7.0 with decay 0.3 and floor 0.1, element-wise relative L1 on the last block, the step
# after a rejection computed fully, no final full steps, never two full steps in a row.
PAPER_FLUX = dict(method="speca", forecaster="taylor", order=2, time_axis="step", warmup_steps=3,
                  unverified_forecasts=2, max_forecast_steps=8, threshold_decay=0.3, threshold_floor=0.1,
                  metric="relative_l1", on_reject="next", final_full_steps=0, paper_schedule=True,
                  start_percent=0.0, end_percent=1.0, predict_errors=False, backoff=False,
                  max_overhead=float("inf"))
# SpeCa reference code, HunyuanVideo (cache_init.py): order 1, first_enhance 1, min/max 4/12,
# base 1.0, decay 0.1, floor 0.1. (It verifies every cached step but acts only from the
# min-th on; the decisions are the same.)
PAPER_HUNYUAN_VIDEO = dict(method="speca", forecaster="taylor", order=1, time_axis="step", warmup_steps=1,
                           unverified_forecasts=4, max_forecast_steps=12, threshold_decay=0.1,
                           threshold_floor=0.1, metric="relative_l1", on_reject="next", final_full_steps=0,
                           paper_schedule=True, start_percent=0.0, end_percent=1.0, predict_errors=False,
                           backoff=False, max_overhead=float("inf"))

# Our defaults per family (stack granularity; measured on the reference model, see README).
FAMILY = {
    "flux": dict(),
    "chroma": dict(),
    "hunyuan_video": dict(),
    # Block level with verification, not tuned on these models yet: the node's defaults (the
    # back-off keeps a run within 1.02x of uncached where the threshold does not fit).
    "wan": dict(),
    "qwen_image": dict(),
    "ltxv": dict(),
    "sd3": dict(),
    # No per-step verification at the output level: bounded fixed-interval forecasting.
    "generic": dict(max_forecast_steps=2, order=1),
}

PAPER = {"paper_flux": PAPER_FLUX, "paper_hunyuan_video": PAPER_HUNYUAN_VIDEO}
PRESETS = ("auto", "custom", *FAMILY.keys(), *PAPER.keys())


def resolve_settings(preset: str, family: str, inputs: dict, defaults: dict) -> CacheConfig:
    """The CacheConfig for ``inputs`` (node input values) under ``preset``.

    ``family`` is the detected model family (for ``auto``); ``defaults`` are the inputs'
    default values (to tell which ones the user changed)."""
    if preset not in PRESETS:
        raise ValueError(f"Speculative Cache: unknown preset {preset!r}; choose from {PRESETS}")
    if preset == "custom":
        return CacheConfig(**inputs)
    if preset in PAPER:
        return CacheConfig(**{**inputs, **PAPER[preset], "threshold": inputs.get("threshold", 7.0)})
    values = FAMILY.get(family if preset == "auto" else preset, FAMILY["generic"] if preset == "auto" else {})
    merged = dict(inputs)
    for key, value in values.items():
        if key not in inputs or inputs[key] == defaults.get(key):
            merged[key] = value
    return CacheConfig(**merged)
