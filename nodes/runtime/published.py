"""What the pack's features tell each other, through ``transformer_options`` only.

A feature never imports another. When one needs to know what another does on the same
model, the other publishes it under one of these keys, and the reader treats a missing key
as "that feature is not on this model":

* ``EDITS_REGION`` (Edit Region, at install): True while an Edit Region node is on the model.
  The step cache then probes its forecasts on the region's tokens instead of looking back.
* ``VERIFICATION_ROWS`` (Edit Region, during a run): a function ``args -> rows | None`` of a
  block patch's arguments: the token rows a verification should read (the region's tokens;
  the others' residuals are served from the last refresh and say nothing of a forecast).
* ``STEP_CACHE_ACTIVE`` (step cache, during a run): a function ``() -> bool``: whether the step
  cache still forecasts in this run (a failure turns it off mid-run). The Edit Region then
  serves the outside tokens' residuals, so the features the step cache records stay continuous.
"""

EDITS_REGION = "speculative_cache.edits_region"
VERIFICATION_ROWS = "speculative_cache.verification_rows"
STEP_CACHE_ACTIVE = "speculative_cache.step_cache_active"


def verification_rows(transformer_options, args):
    """The rows a verification of this block call should read (None: every row)."""
    rows_of = (transformer_options or {}).get(VERIFICATION_ROWS)
    return rows_of(args) if rows_of is not None else None


def step_cache_active(transformer_options) -> bool:
    active = (transformer_options or {}).get(STEP_CACHE_ACTIVE)
    return bool(active is not None and active())
