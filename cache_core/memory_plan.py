"""The cache's memory for one run: the estimate printed before it, and the budget it keeps.

Before a run starts, the forecast history it will hold is estimated from the model's width,
the latent's token count, the stored tensors, the history points (the forecaster's own count,
``forecasters.history_points``) and the streams. When the estimate is above the budget, the
run's settings step down until it fits, in this order (``fit_to_budget``):

1. store the history in bfloat16 (half of a float32 model's bytes);
2. stack granularity instead of block granularity (a few tensors per stream instead of two
   per block; the SpecDiff token tiers, which need block granularity, turn off with it);
3. fewer history points: a lower forecast order, down to 1 (linear);
4. no forecasting for this run (the output is then the uncached one).

CPU offload of the history is not done: on the devices ComfyUI runs on, moving every
forecast point across PCIe each step costs more than the steps it saves."""

from __future__ import annotations

import dataclasses
import math

from .forecasters import history_points
from .stack import StackPlan

WARN_CACHE_BYTES = 4 * 2**30   # warn above this estimate (or above 30 % of free GPU memory)
STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_cache_bytes(plan: StackPlan, hidden: int | None, patch: list, config, latent_shape,
                         txt_tokens: int, streams: int, element_size: int) -> int | None:
    """Cache memory a run will need, from the model's size and the latent's resolution:
    tokens x hidden size x stored tensors x history points x streams x bytes. None when the
    model is not forecast block by block (``plan`` None) or its width is unknown."""
    spatial = list(latent_shape[2:])
    if plan is None or hidden is None or not spatial:
        return None
    img_tokens = 1
    for size, p in zip(spatial[::-1], patch[::-1]):
        img_tokens *= -(-size // p)
    for size in spatial[:len(spatial) - len(patch)]:
        img_tokens *= size
    batch = latent_shape[0]
    tokens = img_tokens + txt_tokens
    if config.block_level:
        tensors = sum(2 if k[0] == "double_block" else 1 for k in plan.keys) * tokens
    else:
        tensors = sum(tokens for _ in plan.stages)
    points = history_points(config)
    if config.storage_dtype:
        element_size = STORAGE_BYTES[config.storage_dtype]
    elements = tensors * hidden
    if config.looks_back:
        elements = math.prod(latent_shape[1:])        # only the model output is forecast
    elif config.serve_output:
        elements += math.prod(latent_shape[1:])       # the served output forecast: one latent
    return int(elements * points * streams * batch * element_size)


def memory_warning(estimate: int | None, config, limit: int = WARN_CACHE_BYTES) -> str | None:
    """The warning for an estimate above ``limit`` bytes (None: no warning)."""
    if estimate is None or estimate <= limit:
        return None
    how = ("granularity=stack, " if config.block_level else "") + "a lower order, or storage_dtype=bfloat16"
    return (f"Speculative Cache: this run will keep about {estimate / 2**30:.1f} GiB of forecast history "
            f"({'block' if config.block_level else 'stack'} granularity, {config.draft} order {config.order}) "
            f"for this model and resolution. Use {how} to reduce it.")


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
