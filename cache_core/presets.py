"""The papers' settings for reproducing them, and the list of presets the Options node offers.

A preset is a dict of CacheConfig fields. Each family's own tuned preset is in its registry
entry (families.py); how presets combine with the user's settings is recipe.py. A ``paper_*``
preset replaces every setting except the threshold, which gives the paper's base threshold."""

from __future__ import annotations

from .families import FAMILIES, GENERIC

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

PAPER = {"paper_flux": PAPER_FLUX, "paper_hunyuan_video": PAPER_HUNYUAN_VIDEO}
# The Options node's preset choices: auto (the detected family's), custom (no family's), each
# block-level family's tuned settings, the output-level ones ("generic"), and the papers'.
PRESETS = ("auto", "custom", *(f.name for f in FAMILIES if f.block_level), GENERIC.name, *PAPER.keys())
