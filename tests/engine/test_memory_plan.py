"""Engine tests (cache_core, no ComfyUI): the memory estimate and the budget."""

from __future__ import annotations

from importlib import import_module


def test_fit_to_budget_order_of_steps(core):
    memory = import_module(core.__name__ + ".memory_plan")
    # bytes: 4 (float32) or 2, x 10 per stored tensor, x (order + 1) points, x 6 tensors at block level
    def estimate(c):
        return (2 if c.storage_dtype else 4) * 10 * (c.order + 1) * (6 if c.granularity == "block" else 1)
    cfg = core.CacheConfig(granularity="block", order=3)
    assert memory.fit_to_budget(cfg, estimate, 10_000) == (cfg, [])
    fitted, steps = memory.fit_to_budget(cfg, estimate, 60)
    assert steps == ["history stored in bfloat16", "stack granularity", "order 2"]
    assert (fitted.storage_dtype, fitted.granularity, fitted.order) == ("bfloat16", "stack", 2)
    off, steps = memory.fit_to_budget(cfg, estimate, 10)
    assert steps[-1] == "no forecasting in this run" and not off.enabled


def test_cache_memory_estimate_matches_flux_at_1024_and_warns(core):
    """FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens, hidden 3072, 19 + 38 blocks) in
    bf16, one stream: order-2 block granularity needs about 6.45 GB (the SpeCa reference code's
    per-module cache, research notes 5); stack granularity about 255 MB."""
    memory = import_module(core.__name__ + ".memory_plan")
    plan = core.StackPlan([(("double_block", i), ("img", "txt")) for i in range(19)] +
                          [(("single_block", i), ("img",)) for i in range(38)])
    latent = (1, 16, 128, 128)
    block = core.CacheConfig(granularity="block", order=2)
    stack = core.CacheConfig(order=2)
    est_block = memory.estimate_cache_bytes(plan, 3072, [2, 2], block, latent, 512, 1, 2)
    est_stack = memory.estimate_cache_bytes(plan, 3072, [2, 2], stack, latent, 512, 1, 2)
    assert est_block == 76 * 4608 * 3072 * 3 * 2 and abs(est_block / 1e9 - 6.45) < 0.01
    assert est_stack == 3 * 4608 * 3072 * 3 * 2
    message = memory.memory_warning(est_block, block)
    assert "6.0 GiB" in message and "granularity=stack" in message
    assert memory.memory_warning(est_stack, stack) is None
