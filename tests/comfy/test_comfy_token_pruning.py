"""The Token Pruning node (DaTo) on ComfyUI's own U-Net (SD1.5 and SDXL config classes) at
tiny size, through the real sampler."""

from __future__ import annotations

import gc
import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm

pytestmark = pytest.mark.comfy

STEPS = 9


@pytest.fixture(scope="module")
def unets(spec_nodes):
    return {name: tm.build(name, seed=5) for name in ("sd15", "sdxl")}


@pytest.fixture
def pruning_stats(spec_nodes):
    module = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.token_pruning.pruning")
    seen = []
    listener = lambda node_id, stats, final: seen.append(stats)  # noqa: E731
    module.PRUNING.listeners.append(listener)
    yield seen
    module.PRUNING.listeners.remove(listener)


class AttentionRows:
    """Rows each self-attention's query and key projections see (torch hooks on ComfyUI's
    CrossAttention modules, independent of the pack)."""

    def __init__(self, patcher, which="attn1"):
        from comfy.ldm.modules.attention import BasicTransformerBlock
        self.rows = {"q": 0, "k": 0}
        self.handles = []
        for blk in patcher.model.diffusion_model.modules():
            if isinstance(blk, BasicTransformerBlock):
                attn = getattr(blk, which)
                self.handles.append(attn.to_q.register_forward_hook(lambda m, i, o: self._add("q", i[0])))
                self.handles.append(attn.to_k.register_forward_hook(lambda m, i, o: self._add("k", i[0])))

    def _add(self, name, x):
        self.rows[name] += x.numel() // x.shape[-1]

    def close(self):
        for h in self.handles:
            h.remove()


def pruned(spec_nodes, model, **kw):
    return spec_nodes.SpeculativeCacheTokenPruning.execute(model, **kw).result[0]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_off_settings_are_bit_identical(spec_nodes, unets, pruning_stats, name):
    m = unets[name]
    ref = tm.sample(m, name, steps=STEPS)
    assert pruned(spec_nodes, m, ratio=0.0) is m                     # ratio 0: the model as it came
    out = tm.sample(pruned(spec_nodes, m, ratio=0.5, refresh_interval=1), name, steps=STEPS)
    assert torch.equal(out, ref)
    assert pruning_stats[-1]["pruned_calls"] == 0 and pruning_stats[-1]["attention_calls"] > 0


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_pruned_steps_compute_fewer_queries_with_every_key(spec_nodes, unets, pruning_stats, name):
    m = unets[name]
    ref = tm.sample(m, name, steps=STEPS)
    counter = AttentionRows(m)
    try:
        tm.sample(m, name, steps=STEPS)
        full = dict(counter.rows)
        counter.rows = {"q": 0, "k": 0}
        out = tm.sample(pruned(spec_nodes, m, ratio=0.5, refresh_interval=3), name, steps=STEPS)
    finally:
        counter.close()
    s = pruning_stats[-1]
    # steps 0, 3, 6 and 8 compute every token, the other five half of them
    assert s["pruned_calls"] > 0 and not s["disabled"]
    share = counter.rows["q"] / full["q"]
    assert share == pytest.approx(s["computed_token_fraction"], rel=1e-6)
    assert share == pytest.approx((4 + 5 * 0.5) / STEPS, abs=0.01)
    assert counter.rows["k"] == full["k"]                # keys and values from every token
    # (random weights barely use attention: fidelity is checked on the trained U-Net below)
    assert not torch.equal(out, ref) and bool(torch.isfinite(out).all())


def test_on_the_trained_reference_unet_the_picture_stays_close(spec_nodes, pruning_stats):
    from devkit import reference_model as rm
    from devkit import reference_unet as ru
    model = ru.load()
    labels, seeds = [0, 3], [1000, 1003]
    ref = ru.sample(model, labels, seeds, steps=12)
    out = ru.sample(pruned(spec_nodes, model), labels, seeds, steps=12)
    assert pruning_stats[-1]["pruned_calls"] > 0
    assert 50.0 < rm.psnr(out, ref) < 100.0        # measured 62.3 dB (67.7 dB at 20 steps, 8 samples)


def test_cross_attention_too(spec_nodes, unets, pruning_stats):
    m = unets["sd15"]
    counter = AttentionRows(m, "attn2")
    try:
        tm.sample(m, "sd15", steps=STEPS)
        full = counter.rows["q"]
        counter.rows = {"q": 0, "k": 0}
        tm.sample(pruned(spec_nodes, m, ratio=0.5, layers="self- and cross-attention"), "sd15", steps=STEPS)
    finally:
        counter.close()
    assert counter.rows["q"] < 0.8 * full


def test_transformers_are_left_alone(spec_nodes):
    flux = tm.build("flux")
    assert pruned(spec_nodes, flux, ratio=0.5) is flux


def test_nothing_stays_behind(spec_nodes, unets, pruning_stats):
    m = unets["sd15"]
    p = pruned(spec_nodes, m, ratio=0.5)
    tm.sample(p, "sd15", steps=STEPS)
    module = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.token_pruning.pruning")
    gc.collect()
    runs = [o for o in gc.get_objects() if type(o).__name__ == "PruningRun"]
    assert all(not r.caches for r in runs)
    assert pruning_stats[-1]["cache_bytes"] > 0            # it did cache, and let go
    assert module.PRUNING.run_key not in p.model_options["transformer_options"]
    assert not m.model_options.get("transformer_options", {}).get("patches")


def test_a_second_node_replaces_the_first(spec_nodes, unets):
    m = unets["sd15"]
    twice = pruned(spec_nodes, pruned(spec_nodes, m, ratio=0.3), ratio=0.5)
    patches = twice.model_options["transformer_options"]["patches"]
    assert len(patches["attn1_patch"]) == 1 and len(patches["attn1_output_patch"]) == 1


def test_with_comfyui_tome_on_the_same_model(spec_nodes, unets, pruning_stats):
    """Core's ToMe merges tokens in the same patch lists. In either order the layers where it
    changes the token count are left to it (the token cache's shapes do not match there) and
    the others are pruned: sampling never breaks."""
    from comfy_extras.nodes_tomesd import TomePatchModel

    def tome(model):
        out = TomePatchModel.execute(model, ratio=0.3)
        return out.result[0] if hasattr(out, "result") else out[0]
    m = unets["sd15"]
    for patched in (pruned(spec_nodes, tome(m)), tome(pruned(spec_nodes, m))):
        out = tm.sample(patched, "sd15", steps=STEPS)
        assert bool(torch.isfinite(out).all())
        s = pruning_stats[-1]
        assert s["pruned_calls"] > 0 and not s["disabled"]


def test_bad_inputs_are_refused(spec_nodes, unets):
    with pytest.raises(ValueError, match="layers"):
        pruned(spec_nodes, unets["sd15"], layers="everything")
