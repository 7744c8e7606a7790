"""The Edit Region node (EEdit) through ComfyUI's real sampler with a real noise mask, on
the trained reference model (ComfyUI's Flux class) and ComfyUI's own tiny models."""

from __future__ import annotations

import gc
import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm

pytestmark = pytest.mark.comfy

STEPS = 12
LABELS, SEEDS = [0, 3], [1000, 1003]


def square(lo, hi):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., lo:hi, lo:hi] = 1
    return mask


@pytest.fixture(scope="module")
def env(spec_nodes):
    from devkit import reference_model as rm
    edit = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.edit_region.region")
    return rm, edit, rm.load_reference()


@pytest.fixture
def edit_stats(env):
    _, edit, _ = env
    seen = []
    listener = lambda node_id, stats, final: seen.append(stats)  # noqa: E731
    edit.EDIT.listeners.append(listener)
    yield seen
    edit.EDIT.listeners.remove(listener)


def with_region(env, **kw):
    _, edit, model = env
    return comfy_env.pack_nodes().SpeculativeCacheEditRegion.execute(model, **kw).result[0]


def inpaint(env, patcher, mask, labels=LABELS, seeds=SEEDS, steps=STEPS):
    rm = env[0]
    return rm.inpaint(patcher, labels, seeds, mask, steps=steps)


class BlockLinearMacs:
    """Multiply-accumulates of every linear layer inside the transformer blocks (torch
    hooks, independent of the pack): they scale with the tokens a block really sees."""

    def __init__(self, patcher):
        dm = patcher.model.diffusion_model
        self.total = 0
        self.handles = [m.register_forward_hook(self._count)
                        for blk in list(dm.double_blocks) + list(dm.single_blocks)
                        for m in blk.modules() if isinstance(m, torch.nn.Linear)]

    def _count(self, mod, inputs, output):
        x = inputs[0]
        self.total += (x.numel() // x.shape[-1]) * mod.in_features * mod.out_features

    def close(self):
        for h in self.handles:
            h.remove()


def test_refresh_every_step_is_bit_identical(env, edit_stats):
    mask = square(8, 24)
    ref = inpaint(env, env[2], mask)
    out = inpaint(env, with_region(env, refresh_interval=1), mask)
    assert torch.equal(out, ref)
    assert edit_stats[-1]["partial_calls"] == 0 and edit_stats[-1]["refresh_calls"] == STEPS   # cond and uncond share each call


def test_region_only_steps_keep_the_unmasked_picture_and_stay_close(env, edit_stats):
    mask = square(8, 24)
    ref = inpaint(env, env[2], mask)
    out = inpaint(env, with_region(env, margin=2, refresh_interval=3), mask)
    s = edit_stats[-1]
    assert not s["disabled"]
    assert s["partial_calls"] > s["refresh_calls"] > 0
    assert s["region_tokens"] == 12 * 12 and s["image_tokens"] == 256      # 8x8 tokens + 2 each side
    assert s["self_check_error"] < 1e-4                # the partial path equals the full block
    inside = torch.nn.functional.interpolate(mask, size=out.shape[-2:]).expand_as(out) > 0
    # Outside the mask the sampler keeps the source picture: exactly the uncached run's.
    assert torch.equal(out[~inside], ref[~inside])
    # Inside it: close to the uncached inpainting (measured 35.3 dB at these 12 steps; 45 dB at 28).
    err = (out[inside] - ref[inside]).pow(2).mean()
    assert 10 * torch.log10(1.0 / err) > 33.0
    assert not torch.equal(out, ref)                   # partial steps did change something


def test_compute_drops_in_proportion_to_the_region(env, edit_stats):
    """The blocks' linear work of a run is what the stats expect from the region's size:
    refresh calls at full cost, partial calls at (text + region tokens) / all tokens."""
    model = env[2]
    counter = BlockLinearMacs(model)
    try:
        inpaint(env, model, square(8, 24), labels=LABELS[:1], seeds=SEEDS[:1])
        full = counter.total
        fractions = {}
        half = torch.zeros(1, 1, 32, 32)
        half[..., :, :16] = 1
        for name, mask in (("small", square(12, 20)), ("quarter", square(8, 24)), ("half", half)):
            counter.total = 0
            inpaint(env, with_region(env, margin=0, refresh_interval=4), mask, labels=LABELS[:1], seeds=SEEDS[:1])
            fractions[name] = counter.total / full
            expected = edit_stats[-1]["compute_fraction"]
            assert fractions[name] == pytest.approx(expected, rel=0.01), name
    finally:
        counter.close()
    assert fractions["small"] < fractions["quarter"] < fractions["half"] < 1.0
    # 4 of 12 steps refresh; the others run 1/16, 1/4 and 1/2 of the image tokens (plus the text)
    assert fractions["small"] < 0.45


def test_without_a_noise_mask_nothing_changes(env, edit_stats):
    rm, _, model = env
    ref = rm.sample(model, LABELS, SEEDS, steps=STEPS)
    out = rm.sample(with_region(env), LABELS, SEEDS, steps=STEPS)
    assert torch.equal(out, ref)
    assert not edit_stats                                   # no run was set up


def test_a_region_that_does_not_match_the_full_block_turns_itself_off(env, edit_stats, monkeypatch):
    """The self-check at the first refresh step: if the region's tokens come out of the
    partial path differently from the full block, the node steps aside for the run."""
    _, edit, model = env
    original = edit.EditCall._partial

    def broken(self, key, args, run_block, double):
        out = original(self, key, args, run_block, double)
        return dict(out, img=out["img"] * 1.01)
    monkeypatch.setattr(edit.EditCall, "_partial", broken)
    mask = square(8, 24)
    ref = inpaint(env, model, mask)
    out = inpaint(env, with_region(env, refresh_interval=3), mask)
    assert edit_stats[-1]["disabled"].startswith("the region's tokens differ")
    assert edit_stats[-1]["partial_calls"] == 0
    assert torch.equal(out, ref)


def test_other_models_run_unchanged(env, edit_stats):
    """HunyuanVideo's blocks are FLUX's, but its tokens are laid out differently: not
    supported yet, so the node leaves it alone."""
    import comfy.sample
    _, edit, _ = env
    m = tm.build("hunyuan_video", seed=3)
    lat = comfy.sample.fix_empty_latent_channels(m, tm.latent("hunyuan_video"))
    mask = torch.zeros(lat.shape[0], 1, *lat.shape[2:])
    mask[..., : lat.shape[-1] // 2] = 1
    pos, neg = tm.conditioning("hunyuan_video")
    outs = []
    for patcher in (m, comfy_env.pack_nodes().SpeculativeCacheEditRegion.execute(m).result[0]):
        noise = comfy.sample.prepare_noise(lat, 7)
        outs.append(comfy.sample.sample(patcher, noise, 6, 2.0, "euler", "simple", pos, neg, lat, noise_mask=mask,
                                        disable_pbar=True, seed=7))
    assert torch.equal(outs[0], outs[1])
    assert not edit_stats


def test_with_the_step_cache_on_the_same_model(env, edit_stats, stats_log, spec_nodes):
    """Both nodes on one model, in either order: the step cache decides which steps run the
    blocks (and verifies its forecasts on the region's tokens), the edit region runs those
    blocks on the region between refreshes. The unmasked picture stays the source's, the
    masked part stays close, and the pair computes less than the step cache alone."""
    _, edit, model = env
    mask, steps = square(8, 24), 28        # on 12 steps the step cache backs off on this model
    target = dict(mode="speed_target", speed=0.25)
    ref = inpaint(env, model, mask, steps=steps)
    region_then_cache = spec_nodes.SpeculativeCacheSimple.execute(with_region(env), **target).result[0]
    cache_then_region = comfy_env.pack_nodes().SpeculativeCacheEditRegion.execute(
        spec_nodes.SpeculativeCacheSimple.execute(model, **target).result[0]).result[0]
    outs = []
    for patcher in (region_then_cache, cache_then_region):
        # the step cache's block patch is the outer one either way
        patch = patcher.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
        assert type(patch).__name__ == "BlockPatch" and type(patch.previous).__name__ == "EditBlockPatch"
        out = inpaint(env, patcher, mask, steps=steps)
        inside = torch.nn.functional.interpolate(mask, size=out.shape[-2:]).expand_as(out) > 0
        assert torch.equal(out[~inside], ref[~inside])
        err = (out[inside] - ref[inside]).pow(2).mean()
        assert 10 * torch.log10(1.0 / err) > 35.0            # measured 39.0 dB
        main, region = stats_log[-1], edit_stats[-1]
        assert main["forecast"] > 0 and not main["internal_error"] and main["mode"] == "stack"
        assert region["partial_calls"] > 0 and not region["disabled"]
        # the pair's compute (blocks really run, region-only ones at their share) is below the
        # step cache's own count, which takes every computed step as a full one
        assert region["compute_fraction"] < main["compute_fraction"] - 0.03
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_nothing_stays_behind(env, edit_stats):
    _, edit, model = env
    patched = with_region(env, refresh_interval=3)
    inpaint(env, patched, square(8, 24))
    gc.collect()
    runs = [o for o in gc.get_objects() if type(o).__name__ == "EditRun"]
    assert all(not r.context and r.active is None for r in runs)
    assert edit.EDIT.run_key not in patched.model_options["transformer_options"]
    assert edit.EDIT.run_key not in model.model_options.get("transformer_options", {})
    # the base model carries no patch of ours
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")


def test_bad_inputs_are_refused_clearly(env):
    with pytest.raises(ValueError, match="refresh_interval"):
        with_region(env, refresh_interval=0)


def _kept_bytes(run) -> int:
    return sum(t.numel() * t.element_size() for blocks in run.context.values() for kept in blocks.values()
               for _, *kv in kept for t in kv)


def test_the_budget_is_checked_before_the_context_is_kept(env, edit_stats, monkeypatch):
    """The planned context of a run's first refresh is what the refresh then keeps; with a
    budget below it the node steps aside before it keeps anything (the picture is the uncached
    one), and with a budget between one and two refreshes' worth it keeps one (reuse)."""
    _, edit, model = env
    mask = square(8, 24)
    planned, kept = [], []
    planner = edit._planned_context_bytes

    def planning(run, *a):
        planned.append(planner(run, *a[:2], 1, False))          # one refresh, the keys and values only
        return planner(run, *a)

    original_full = edit.EditCall._full

    def full(self, *a, **k):
        out = original_full(self, *a, **k)
        kept.append(_kept_bytes(self.run))
        return out
    monkeypatch.setattr(edit, "_planned_context_bytes", planning)
    monkeypatch.setattr(edit.EditCall, "_full", full)
    inpaint(env, with_region(env, context="reuse"), mask, labels=LABELS[:1], seeds=SEEDS[:1], steps=4)
    assert edit_stats[-1]["refresh_calls"] > 0 and not edit_stats[-1]["disabled"]
    blocks = len(model.model.diffusion_model.double_blocks) + len(model.model.diffusion_model.single_blocks)
    one_refresh = planned[0]
    assert kept[blocks - 1] == one_refresh                 # after the first refresh's last block: as planned

    kept.clear()
    monkeypatch.setattr(edit, "budget_bytes", lambda mb, device: one_refresh // 2)
    ref = inpaint(env, model, mask)
    out = inpaint(env, with_region(env), mask)
    assert "over the budget" in edit_stats[-1]["disabled"]
    assert kept == []                                      # nothing was kept, nothing allocated
    assert torch.equal(out, ref)

    monkeypatch.setattr(edit, "budget_bytes", lambda mb, device: one_refresh * 3 // 2)
    inpaint(env, with_region(env), mask)                   # linear context needs two refreshes' worth
    s = edit_stats[-1]
    assert not s["disabled"] and s["partial_calls"] > 0
    assert max(kept) <= one_refresh * 3 // 2


def test_an_interrupt_in_an_edit_region_run_surfaces_and_nothing_stays(env, edit_stats, monkeypatch):
    import comfy.ldm.flux.layers as flux_layers
    import comfy.model_management as mm
    from conftest import live_tensor_count
    _, edit, model = env
    mask = square(8, 24)
    patched = with_region(env)
    inpaint(env, patched, mask, steps=6)
    before = live_tensor_count()
    calls = {"n": 0}
    forward = flux_layers.SingleStreamBlock.forward

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20:                               # mid-run, inside a partial step's blocks
            raise mm.InterruptProcessingException()
        return forward(self, *a, **k)
    monkeypatch.setattr(flux_layers.SingleStreamBlock, "forward", interrupting)
    with pytest.raises(mm.InterruptProcessingException):
        inpaint(env, patched, mask, steps=6)
    monkeypatch.undo()
    assert calls["n"] == 20
    assert edit_stats[-1]["disabled"] == ""                # an interrupt is not the node's failure
    gc.collect()
    assert live_tensor_count() <= before + 2
