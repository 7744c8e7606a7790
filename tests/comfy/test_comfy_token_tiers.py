"""SpecDiff's token tiers (CacheConfig.token_compute / token_reuse: an engine setting the
benchmark measures; no node input, see the README's methods table) through the real sampler,
on ComfyUI's Flux and HunyuanVideo classes at tiny size."""

from __future__ import annotations

import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from benchmarks.run_benchmark import engine
from conftest import random_double_block_mlp

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def models(spec_nodes):
    return {name: tm.build(name, seed=3) for name in ("flux", "hunyuan_video")}


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_rejected_forecasts_with_token_tiers_are_bit_identical(spec_nodes, models, stats_log, name):
    """Every forecast fails (threshold 1e-9, "redo"): the attention measurement at the
    computed steps must not change what the blocks compute, so the output is the uncached one."""
    m = models[name]
    ref = tm.sample(m, name, steps=12)
    out = tm.sample(engine(threshold=1e-9, warmup_steps=2, token_compute=0.25, token_reuse=0.25)(m), name, steps=12)
    assert torch.equal(out, ref)
    s = stats_log[-1]
    assert s["mode"] == "block" and s["verified"] == s["rejected"] > 0
    assert s["token_tiers"]["computed"] > 0          # the tiers ran on the rejected forecasts


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_token_tier_counts_match_the_fractions(spec_nodes, models, stats_log, name):
    m = models[name]
    dm = m.model.diffusion_model
    n_double = len(dm.double_blocks)
    mlp_rows = []
    handles = [blk.img_mlp.register_forward_hook(lambda mod, i, o: mlp_rows.append(i[0].numel() // i[0].shape[-1]))
               for blk in dm.double_blocks]
    try:
        out = tm.sample(engine(method="taylorseer", max_forecast_steps=2, token_compute=0.25, token_reuse=0.5,
                               final_full_steps=0)(m), name, steps=12)
    finally:
        for handle in handles:
            handle.remove()
    s = stats_log[-1]
    assert torch.isfinite(out).all() and s["eval_forecast"] > 0
    tiers = s["token_tiers"]
    total = tiers["computed"] + tiers["forecast"] + tiers["reused"]
    # every image token of every double block, cond and uncond row, at every forecast evaluation
    tokens = total // (s["eval_forecast"] * n_double * 2)
    assert total == s["eval_forecast"] * n_double * 2 * tokens and tokens > 0
    assert tiers["computed"] == s["eval_forecast"] * n_double * 2 * round(0.25 * tokens)
    assert tiers["reused"] == s["eval_forecast"] * n_double * 2 * round(0.5 * tokens)
    # the image MLPs really ran on every token at computed steps and on the tier at forecast steps
    assert sum(mlp_rows) == n_double * 2 * (s["eval_computed"] * tokens + s["eval_forecast"] * round(0.25 * tokens))


def test_token_tiers_use_the_attention_history_and_chain_an_existing_override(spec_nodes, models, monkeypatch):
    """The score gets the attention received at the last computed step (once one was
    measured), and an attention override already in the model's options still runs for every
    attention call."""
    tiers = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.token_tiers")
    histories = []
    original = tiers.importance
    monkeypatch.setattr(tiers, "importance", lambda h, c: histories.append(h) or original(h, c))
    m = models["flux"].clone()
    calls = []

    def counting(func, *a, **kw):
        calls.append(a[0].shape)
        return func(*a, **kw)
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting
    tm.sample(m, "flux", steps=10)
    uncached_calls = len(calls)
    out = tm.sample(engine(method="taylorseer", max_forecast_steps=1, token_compute=0.2)(m),
                    "flux", steps=10)
    assert torch.isfinite(out).all()
    assert histories and all(h is not None and torch.isfinite(h).all() for h in histories)
    assert all(h.shape[0] == 2 and (h >= 0).all() for h in histories)   # cond and uncond rows
    cached_calls = len(calls) - uncached_calls
    assert 0 < cached_calls < uncached_calls          # the override ran at every computed block


def test_computed_tier_is_the_block_mlp_of_those_tokens(spec_nodes):
    """The compute tier's tokens get exactly what the block's own image MLP gives them on
    this residual stream and modulation (ComfyUI's DoubleStreamBlock, random weights)."""
    blockwise = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.blockwise")
    blk, img, mod2, full = random_double_block_mlp(32, 12)
    with torch.no_grad():
        idx = torch.tensor([[3, 0, 7], [11, 5, 6]])
        got = blockwise.image_mlp_on_tokens(blk, img, idx, mod2)
        assert torch.allclose(got, torch.stack([full[0, idx[0]], full[1, idx[1]]]), atol=1e-6)


def test_memory_budget_turns_the_token_tiers_off_with_block_granularity(spec_nodes):
    memory = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.memory")
    core = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core")
    config = core.CacheConfig(token_compute=0.25, token_reuse=0.25, storage_dtype="bfloat16")
    fitted, steps = memory.fit_to_budget(config, lambda c: 100 if c.block_level else 10, budget=50)
    assert not fitted.block_level and not fitted.token_tiers and fitted.enabled
    assert steps == ["stack granularity without token tiers"]


def test_the_benchmark_tokens_grid_installs_every_row(spec_nodes, models):
    """`run_benchmark --grid tokens` builds each row's cache; the SpecDiff rows carry their tiers."""
    from benchmarks.run_benchmark import tokens_grid
    hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    for method in tokens_grid()[1:]:
        config = method.apply(models["flux"]).model_options["transformer_options"][hooks.STEP_CACHE.name].config
        assert config.token_compute == method.settings.get("token_compute", 0.0)
        assert config.token_reuse == method.settings.get("token_reuse", 0.0)
        assert config.token_tiers == (method.method == "specdiff")
