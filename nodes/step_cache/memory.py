"""The step cache's memory for one run, on ComfyUI's side: the model's numbers and the device's
free memory for the estimate and the budget of ``cache_core/memory_plan.py`` (which says how a run
steps down when its history does not fit). The budget is the Options node's ``memory_budget_mb``;
by default 40 % of the free memory of the device the model runs on."""

from __future__ import annotations

import torch

from ...cache_core.memory_plan import estimate_cache_bytes, fit_to_budget, memory_warning
from ..runtime.device_memory import budget_bytes, warning_limit
from ..runtime.log import warn_once
from .adapters import model_width, patch_size

def text_tokens(guider) -> int:
    """Text tokens of the positive prompt (the conds are not processed yet when a run
    starts: their text embedding is still under "cross_attn"); 512 when unknown."""
    try:
        cond = guider.conds["positive"][0]
        if "cross_attn" in cond:
            return int(cond["cross_attn"].shape[1])
        return int(cond["model_conds"]["c_crossattn"].cond.shape[1])
    except Exception:
        return 512


def feature_element_size(patcher) -> int:
    """Bytes per element of the features the model computes (an fp8 model computes in its
    manual-cast dtype, and that is what the cache stores)."""
    model = patcher.model
    dtype = getattr(model, "manual_cast_dtype", None) or patcher.model_dtype()
    return torch.empty((), dtype=dtype).element_size()


def plan_run_memory(guider, adapter, config, noise, budget_mb: int = 0):
    """The config this run can afford, and its cache estimate in bytes (None: unknown).
    Warns once when the estimate is large or the budget changed the settings."""
    try:
        patcher = guider.model_patcher
        dm = patcher.get_model_object("diffusion_model")
        streams = 1 if float(getattr(guider, "cfg", 1.0)) == 1.0 else 2
        element = feature_element_size(patcher)
        shape, txt = tuple(noise.shape), text_tokens(guider)

        hidden, patch = model_width(dm), patch_size(dm)

        def estimate_for(cfg):
            return estimate_cache_bytes(adapter.plan, hidden, patch, cfg, shape, txt, streams, element)

        budget = budget_bytes(budget_mb, patcher.load_device)
        before = estimate_for(config)
        fitted, steps = fit_to_budget(config, estimate_for, budget)
        estimate = estimate_for(fitted)
    except Exception as e:
        # Without an estimate no budget can be applied: say so, with the reason (the run goes on
        # with the settings as they are).
        warn_once(f"Speculative Cache: could not plan this run's cache memory ({type(e).__name__}: {e}); "
                  "the memory budget is not applied to this run.")
        return config, None
    if steps:
        warn_once(f"Speculative Cache: the forecast history would need about {before / 2**20:.0f} MiB, above the "
                  f"memory budget of {budget / 2**20:.0f} MiB; this run uses " + ", ".join(steps) +
                  f" (about {estimate / 2**20:.0f} MiB). Raise memory_budget_mb on the Options node to keep "
                  "the settings.")
    else:
        message = memory_warning(estimate, fitted, warning_limit(patcher.load_device))
        if message:
            warn_once(message)
    return fitted, estimate
