"""The cache's memory for one run: the estimate printed before it, and the budget it keeps.

Before a run starts, the forecast history it will hold is estimated from the model's width,
the latent's token count, the stored tensors, the history points and the streams. When the
estimate is above the budget (the Options node's ``memory_budget_mb``; by default 40 % of
the free memory of the device the model runs on), the run's settings step down until it
fits, in this order, and one warning says which steps were taken:

1. store the history in bfloat16 (half of a float32 model's bytes);
2. stack granularity instead of block granularity (a few tensors per stream instead of two
   per block; the SpecDiff token tiers, which need block granularity, turn off with it);
3. fewer history points: a lower forecast order, down to 1 (linear);
4. no forecasting for this run (the output is then the uncached one).

CPU offload of the history is not done: on the devices ComfyUI runs on, moving every
forecast point across PCIe each step costs more than the steps it saves."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .adapters import cache_memory_warning, estimate_cache_bytes, warn_once

log = logging.getLogger("speculative_cache")

AUTO_BUDGET_FRACTION = 0.4       # of the free memory on the model's device


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


def budget_bytes(budget_mb: int, device) -> int | None:
    """The budget in bytes: ``budget_mb`` when set, else a fraction of the free memory of
    ``device`` (None when that cannot be read)."""
    if budget_mb and budget_mb > 0:
        return int(budget_mb) * 2**20
    try:
        import comfy.model_management as mm
        return int(AUTO_BUDGET_FRACTION * mm.get_free_memory(device))
    except Exception:
        return None


def fit_to_budget(config, estimate_for, budget: int | None):
    """(config, steps taken): the config, stepped down until ``estimate_for(config)`` fits
    ``budget`` (see the module docstring)."""
    estimate = estimate_for(config)
    if estimate is None or budget is None or estimate <= budget or not config.enabled:
        return config, []
    steps = []

    def apply(**changes):
        nonlocal config, estimate
        config = dataclasses.replace(config, **changes)
        estimate = estimate_for(config)

    if config.storage_dtype not in ("bfloat16", "float16") and estimate_for(
            dataclasses.replace(config, storage_dtype="bfloat16")) < estimate:
        apply(storage_dtype="bfloat16")
        steps.append("history stored in bfloat16")
    if estimate > budget and config.block_level and config.method != "clusca":
        tiers = config.token_tiers
        apply(granularity="stack", token_compute=0.0, token_reuse=0.0)
        steps.append("stack granularity" + (" without token tiers" if tiers else ""))
    while estimate > budget and config.order > 1 and config.method != "reuse":
        apply(order=config.order - 1)
        steps.append(f"order {config.order}")
    if estimate > budget:
        apply(method="speca", threshold=0.0)
        steps.append("no forecasting in this run")
    return config, steps


def plan_run_memory(guider, adapter, config, noise, budget_mb: int = 0):
    """The config this run can afford, and its cache estimate in bytes (None: unknown).
    Warns once when the estimate is large or the budget changed the settings."""
    try:
        patcher = guider.model_patcher
        dm = patcher.get_model_object("diffusion_model")
        streams = 1 if float(getattr(guider, "cfg", 1.0)) == 1.0 else 2
        element = feature_element_size(patcher)
        shape, txt = tuple(noise.shape), text_tokens(guider)

        def estimate_for(cfg):
            return estimate_cache_bytes(adapter, dm, cfg, shape, txt, streams, element)

        budget = budget_bytes(budget_mb, patcher.load_device)
        before = estimate_for(config)
        fitted, steps = fit_to_budget(config, estimate_for, budget)
        estimate = estimate_for(fitted)
    except Exception:
        log.debug("Speculative Cache: no cache memory estimate", exc_info=True)
        return config, None
    if steps:
        warn_once(f"Speculative Cache: the forecast history would need about {before / 2**20:.0f} MiB, above the "
                  f"memory budget of {budget / 2**20:.0f} MiB; this run uses " + ", ".join(steps) +
                  f" (about {estimate / 2**20:.0f} MiB). Raise memory_budget_mb on the Options node to keep "
                  "the settings.")
    else:
        message = cache_memory_warning(estimate, fitted, patcher.load_device)
        if message:
            warn_once(message)
    return fitted, estimate
