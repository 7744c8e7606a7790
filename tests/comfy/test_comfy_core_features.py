"""What ComfyUI core gained after 0.8, chained with the Speculative Cache through the real
sampler: FluxKVCache (0.29: the reference-image tokens leave the model's input after the first
step) and an attention override of the kind BlockSparseAttention installs (re-installed on top of
the hook every step from ON_PREPARE_STATE, statistics kept per block from the previous step,
reset on ON_CLEANUP)."""

from __future__ import annotations

import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import options, simple

pytestmark = pytest.mark.comfy

STEPS = 16


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def runs(spec_nodes):
    """The final stats of every Speculative Cache run during the test."""
    ctx = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    seen = []
    listener = lambda node_id, stats, final: final and seen.append(stats)  # noqa: E731
    ctx.STEP_CACHE.listeners.append(listener)
    yield seen
    ctx.STEP_CACHE.listeners.remove(listener)


# ---- FluxKVCache ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kontext(spec_nodes):
    """A tiny FLUX.2 without guidance embedding (as FLUX.2 klein; FluxKVCache's zero-timestep
    reference path needs it), conditioning that carries a reference latent, and the model
    through ComfyUI's FluxKVCache node."""
    nodes_flux = importlib.import_module("comfy_extras.nodes_flux")
    if not hasattr(nodes_flux, "FluxKVCache"):
        pytest.skip(f"ComfyUI {comfy_env.comfyui_version(comfy_env.find_comfyui())} has no FluxKVCache "
                    f"(it came after 0.8.0; 0.29.0 has it)")
    model = tm.build("flux2", seed=3, depth=3, single=3, guidance_embed=False)
    positive, negative = tm.conditioning("flux2")
    reference = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(5))
    for cond in (positive, negative):
        cond[0][1]["reference_latents"] = [reference]
    with_kv = nodes_flux.FluxKVCache.execute(model).result[0]
    return model, with_kv, positive, negative


def test_flux_kv_cache_is_exact_and_the_cache_forecasts_over_it(spec_nodes, kontext, runs):
    """Over FluxKVCache the default mode forecasts (it looks back on the model output, whose
    token count never changes) and gives what it gives without FluxKVCache; speed 0 changes
    nothing."""
    model, with_kv, positive, negative = kontext
    reference = tm.sample(with_kv, "flux2", steps=STEPS, positive=positive, negative=negative)
    assert rel(reference, tm.sample(model, "flux2", steps=STEPS, positive=positive, negative=negative)) < 1e-5
    off = tm.sample(simple(spec_nodes, with_kv, mode="auto", speed=0.0, start_percent=0.0, end_percent=1.0),
                    "flux2", steps=STEPS, positive=positive, negative=negative)
    assert torch.equal(off, reference) and runs[-1]["computed"] == STEPS
    cached = tm.sample(simple(spec_nodes, with_kv, mode="auto", speed=0.5, start_percent=0.0, end_percent=1.0),
                       "flux2", steps=STEPS, positive=positive, negative=negative)
    over_kv = runs[-1]
    without_kv = tm.sample(simple(spec_nodes, model, mode="auto", speed=0.5, start_percent=0.0, end_percent=1.0),
                           "flux2", steps=STEPS, positive=positive, negative=negative)
    assert over_kv["forecast"] > 0 and over_kv["internal_error"] == ""
    assert over_kv["timeline"] == runs[-1]["timeline"]
    assert rel(cached, without_kv) < 1e-4
    assert torch.isfinite(cached).all() and rel(cached, reference) < 0.05


def test_flux_kv_cache_token_drop_restarts_the_block_histories_once(spec_nodes, kontext, runs):
    """The probe forecasts block features, whose token count falls after the first step: each
    stream's history starts over once (counted in the stats), histories of the two token counts
    are never mixed, and the run still forecasts within the error it has without FluxKVCache."""
    model, with_kv, positive, negative = kontext
    reference = tm.sample(with_kv, "flux2", steps=STEPS, positive=positive, negative=negative)
    loose = options(spec_nodes, threshold=5.0)        # a threshold the tiny random model passes
    cached = tm.sample(simple(spec_nodes, with_kv, mode="probe", speed=0.5, start_percent=0.0, end_percent=1.0,
                              options=loose), "flux2", steps=STEPS, positive=positive, negative=negative)
    stats = runs[-1]
    assert stats["internal_error"] == "" and stats["forecast"] > 0
    assert stats["shape_changes"] == 2                 # cond and uncond, once each, after step 1
    plain = tm.sample(simple(spec_nodes, model, mode="probe", speed=0.5, start_percent=0.0, end_percent=1.0,
                             options=loose), "flux2", steps=STEPS, positive=positive, negative=negative)
    assert runs[-1]["shape_changes"] == 0
    plain_error = rel(plain, tm.sample(model, "flux2", steps=STEPS, positive=positive, negative=negative))
    assert rel(cached, reference) <= 2 * plain_error + 1e-3


# ---- an attention override installed every step (BlockSparseAttention's way) ----------------

class PreviousStepAttention:
    """An attention override installed the way ComfyUI's BlockSparseAttention installs its own
    (that node needs CUDA kernels and is newer than 0.29.0): on top of whatever override is on
    the hook, at patch time and again from ON_PREPARE_STATE every step; it keeps, per (block,
    token count, conditioning), a statistic of the previous call's keys, and ON_CLEANUP clears
    them. The attention itself stays the one below it, so outputs can be compared exactly."""

    def __init__(self):
        self.installed = set()
        self.calls = 0
        self.cleanups = 0
        self.previous_keys = {}
        self.mismatched = 0          # a statistic from the previous step with another shape

    def install(self, transformer_options):
        current = transformer_options.get("optimized_attention_override")
        if current in self.installed:
            return

        def override(func, q, k, v, heads, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            key = (options.get("block_type"), options.get("block_index"), k.shape[-2],
                   tuple(options.get("uuids", ())))
            stat = k.float().mean(dim=-2)
            if key in self.previous_keys and self.previous_keys[key].shape != stat.shape:
                self.mismatched += 1
            self.previous_keys[key] = stat
            self.calls += 1
            if current is not None:
                return current(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)

        self.installed.add(override)
        transformer_options["optimized_attention_override"] = override

    def cleanup(self):
        self.cleanups += 1
        self.previous_keys = {}

    def apply(self, model):
        import comfy.patcher_extension as pe
        m = model.clone()
        self.install(m.model_options.setdefault("transformer_options", {}))

        def on_prepare_state(patcher, timestep, model_options=None):
            if model_options is not None:         # ComfyUI >= 0.8 passes the run's options
                self.install(model_options.setdefault("transformer_options", {}))
        m.add_callback(pe.CallbacksMP.ON_PREPARE_STATE, on_prepare_state)
        m.add_callback(pe.CallbacksMP.ON_CLEANUP, lambda patcher: self.cleanup())
        return m


@pytest.mark.parametrize("mode", ["auto", "probe"])
def test_an_attention_override_installed_every_step_runs_on_computed_steps(spec_nodes, runs, mode):
    """Chained with such an override (the cache applied after it, and before it): nothing
    raises, the output is the cache's own, the override runs on each computed step's blocks and
    on no forecast step's, and its state is cleared when sampling ends."""
    model = tm.build("flux", seed=3, depth=2, single=2)
    loose = options(spec_nodes, threshold=5.0)        # a threshold the tiny random model passes
    alone = PreviousStepAttention()
    reference = tm.sample(alone.apply(model), "flux", steps=STEPS)
    per_step = alone.calls / STEPS
    assert per_step == int(per_step) and per_step >= 4 and alone.cleanups >= 1 and alone.previous_keys == {}
    cache_only = tm.sample(simple(spec_nodes, model, mode=mode, speed=0.5, start_percent=0.0, end_percent=1.0,
                                  options=loose), "flux", steps=STEPS)
    expected = runs[-1]
    for order in ("override_first", "cache_first"):
        chained = PreviousStepAttention()
        if order == "override_first":
            patched = simple(spec_nodes, chained.apply(model), mode=mode, speed=0.5, start_percent=0.0,
                             end_percent=1.0, options=loose)
        else:
            patched = chained.apply(simple(spec_nodes, model, mode=mode, speed=0.5, start_percent=0.0,
                                           end_percent=1.0, options=loose))
        out = tm.sample(patched, "flux", steps=STEPS)
        stats = runs[-1]
        assert stats["internal_error"] == "" and stats["timeline"] == expected["timeline"], order
        assert torch.allclose(out, cache_only, atol=1e-6), order
        assert 0 < stats["forecast"] and stats["computed"] < STEPS
        if mode == "auto":
            # lookback: a forecast step runs no block, a computed step every block
            assert chained.calls == per_step * stats["computed"], order
        else:
            # the probe runs the first block(s) on forecast steps to check them
            assert per_step * stats["computed"] < chained.calls < per_step * STEPS, order
        assert chained.mismatched == 0 and chained.cleanups >= 1 and chained.previous_keys == {}, order
    assert torch.isfinite(cache_only).all() and rel(cache_only, reference) < 0.5
