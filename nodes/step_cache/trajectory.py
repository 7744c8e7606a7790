"""The trajectory correction's place in ComfyUI (cache_core/correction.py does the maths):
a post-CFG function, the one point where the sampler's own x and the denoised output it
is about to step with are both in hand (after CFG, so one correction serves cond and uncond
together)."""

from __future__ import annotations

import logging

from ...cache_core.correction import TrajectoryCorrection
from ...cache_core.stats import FORECAST
from ..runtime import guard
from .run_context import run_context
from .serving import is_flow_model

log = logging.getLogger("speculative_cache")


def for_run(config, model_sampling) -> TrajectoryCorrection | None:
    """The run's correction, when its settings ask for one (lookback runs only: the
    correction needs to know which steps were forecast as a whole)."""
    if not (config.trajectory_correction and config.looks_back):
        return None
    return TrajectoryCorrection(flow=is_flow_model(model_sampling), degree=config.trajectory_correction)


def post_cfg(args):
    """ComfyUI's ``sampler_post_cfg_function``: the denoised output, corrected at a computed
    step after forecast ones when the sampler takes Euler steps."""
    denoised = args["denoised"]
    ctx = run_context((args.get("model_options") or {}).get("transformer_options"))
    run = getattr(ctx, "run", None)
    correction = getattr(run, "correction", None)
    if correction is None or not correction.active:
        return denoised
    try:
        step = run.step_index
        sigmas = ctx.sample_sigmas
        sigma_next = sigmas[step + 1] if 0 <= step < len(sigmas) - 1 else None
        # a cond-only step's uncond is derived, not computed (cond_only.py): not a point to correct from
        computed = run.current_outcome() != FORECAST and step not in run.stats.cond_only_steps
        served = correction.observe(args["input"], denoised, run.sigma, sigma_next, computed)
    except Exception as e:
        # The containment rule: this step keeps the denoised output the model gave, and the run
        # continues uncached.
        guard.give_up(ctx, "trajectory correction", e)
        return denoised
    run.note_correction()
    return served


def install(patcher) -> None:
    """Add ``post_cfg`` to the patcher's post-CFG functions (once)."""
    functions = patcher.model_options.get("sampler_post_cfg_function", [])
    if not any(f is post_cfg for f in functions):
        patcher.set_model_sampler_post_cfg_function(post_cfg)
