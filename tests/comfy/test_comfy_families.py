"""Every family in cache_core/families.py through ComfyUI's real sampler, with ComfyUI's own model
class at a tiny size: threshold 0 is bit-identical, forecasts are verified at block level,
compute drops, a threshold no forecast meets is bit-identical too (every probed forecast
recomputed), and nothing stays in memory. Families that only exist in newer ComfyUI run
where it has them; output-level families are checked to still lack block patches. The main node
at speed 0 and at its defaults on every model class: test_comfy_every_model_class.py."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import cached, finite, forget_warnings, live_tensor_count, same

pytestmark = pytest.mark.comfy

# tiny config -> family it must be recognised as
BLOCK_LEVEL = {"wan21": "wan", "wan21_i2v": "wan", "wan22": "wan", "qwen_image": "qwen_image", "ltxv": "ltxv", "sd3": "sd3",
               "hunyuan_video15": "hunyuan_video", "flux2": "flux", "auraflow": "auraflow",
               "mochi": "mochi", "wan21_vace": "wan_vace",
               "wan21_camera": "wan",
               # ComfyUI 0.29
               "wan21_scail": "wan", "joyimage": "joyimage", "lens": "lens_mageflow", "mage_flow": "lens_mageflow"}
OUTPUT_LEVEL = ["lumina2", "zimage", "kandinsky5",
                "ltxav",                    # its nested latent (video + audio): forecast at APPLY_MODEL
                "ernie", "krea2", "cogvideox", "boogu"]                  # ComfyUI 0.29


def _need(name):
    if not tm.available(name):
        pytest.skip(f"{name} is not in ComfyUI {comfy_env.comfyui_version(comfy_env.find_comfyui())}")


@pytest.mark.parametrize("name", list(BLOCK_LEVEL))
def test_family_forecasts_and_verifies_at_block_level(spec_nodes, stats_log, name):
    _need(name)
    adapters = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.adapters")
    m = tm.build(name, seed=3)
    adapter = adapters.select_adapter(m.get_model_object("diffusion_model"))
    assert adapter.mode == "stack" and adapter.family == BLOCK_LEVEL[name]
    steps = 12
    ref = tm.sample(m, name, steps=steps)
    assert torch.isfinite(ref).all()
    assert torch.equal(tm.sample(cached(spec_nodes, m, threshold=0.0), name, steps=steps), ref)
    assert stats_log[-1]["compute_fraction"] == 1.0

    pm = cached(spec_nodes, m, threshold=5.0)
    tm.sample(pm, name, steps=steps)                  # lazy allocations happen once
    before = live_tensor_count()
    out = tm.sample(pm, name, steps=steps)
    s = stats_log[-1]
    assert s["mode"] == "stack" and not s["internal_error"]
    assert s["verified"] > 0 and s["forecast"] > 0 and s["compute_fraction"] < 0.8
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    del out
    assert live_tensor_count() <= before                 # nothing cached survives the run (only growth is a leak: 19 fewer seen once)

    strict = tm.sample(cached(spec_nodes, m, threshold=1e-9), name, steps=steps)
    s = stats_log[-1]
    assert torch.equal(strict, ref) and s["rejected"] == s["verified"] >= 1


@pytest.mark.parametrize("name", OUTPUT_LEVEL)
def test_families_without_block_patches_forecast_the_output(spec_nodes, stats_log, name):
    _need(name)
    m = tm.build(name, seed=3)
    ref = tm.sample(m, name, steps=12)
    assert same(tm.sample(cached(spec_nodes, m, threshold=0.0), name, steps=12), ref)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), name, steps=12)
    s = stats_log[-1]
    assert s["mode"] == "output" and s["forecast"] > 0 and not s["internal_error"]
    assert finite(out)


def _class(path):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def test_the_registry_matches_the_running_comfyui(spec_nodes):
    """Each block-level family's forward still calls its block patches with the keys the
    registry names; an output-level entry whose model calls block patches says so (and why it
    stays at output level)."""
    families = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.families")
    checked = 0
    for fam in families.FAMILIES:
        for path in fam.classes:
            c = _class(path)
            if not fam.block_level:
                if c is not None and "blocks_replace" in inspect.getsource(c):
                    assert "block patches" in fam.notes, f"{path} now calls block patches: give it a block contract"
                continue
            if c is None:
                running = tuple(int(x) for x in comfy_env.comfyui_version(comfy_env.find_comfyui()).split("."))
                added = families.ADDED_IN.get(path)
                assert added is not None and running < tuple(int(x) for x in added.split(".")), f"{path} is gone"
                continue
            source = "".join(inspect.getsource(k) for k in c.__mro__ if k.__module__.startswith("comfy."))
            for bl in fam.blocks:
                assert f'("{bl.kind}", i)' in source, f"{fam.name}: {path} no longer calls {bl.kind} patches"
                for t in bl.carries:
                    assert f'out["{t}"]' in source, f"{fam.name}: {path} no longer reads {t!r} from its patches"
            checked += 1
    assert checked + sum(_class(p) is None for p in families.ADDED_IN) == sum(
        len(f.classes) for f in families.FAMILIES if f.block_level)
    kandinsky = _class("comfy.ldm.kandinsky5.model.Kandinsky5")
    if kandinsky is not None:
        source = inspect.getsource(importlib.import_module(kandinsky.__module__))
        assert 'block(x=args["x"]' in source, "Kandinsky 5's block-patch path changed: try it at block level"


def test_every_diffusion_model_class_of_this_comfyui_has_a_registry_entry(spec_nodes):
    """Every diffusion-model class ComfyUI's model_base builds (``unet_model=...``) is in the
    family registry, at block level or at output level, or is a subclass a block-level family
    takes in."""
    import comfy.model_base
    families = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.families")
    names = set(re.findall(r"unet_model=([A-Za-z_][\w.]*)", inspect.getsource(comfy.model_base))) - {"unet_model"}
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        obj = _class(name) if "." in name else getattr(comfy.model_base, name, None)
        assert obj is not None, name
        path = f"{obj.__module__}.{obj.__qualname__}"
        fam = next((f for f in families.FAMILIES if path in f.classes or
                    (f.subclasses and any(f"{k.__module__}.{k.__qualname__}" in f.classes for k in obj.__mro__))), None)
        if fam is None:
            missing.append(path)
    assert not missing, f"no registry entry (cache_core/families.py) for: {missing}"


def test_a_between_block_patch_keeps_qwen_image_at_output_level(spec_nodes, stats_log, caplog):
    """Qwen-Image applies transformer_options["patches"]["double_block"] after every block
    (model patches such as its ControlNet-style patches add features there): a stage
    forecast would count them twice, so such a run forecasts the output."""
    m = tm.build("qwen_image", seed=3).clone()
    seen = []

    def between(args):
        seen.append(1)
        return {"img": args["img"], "txt": args["txt"]}

    m.set_model_patch(between, "double_block")
    ref = tm.sample(m, "qwen_image", steps=10)
    with caplog.at_level("WARNING", logger="speculative_cache"):
        out = tm.sample(cached(spec_nodes, m, threshold=5.0), "qwen_image", steps=10)
    s = stats_log[-1]
    assert seen and s["mode"] == "output" and s["verified"] == 0 and s["forecast"] > 0
    assert any("between qwen_image blocks" in r.message for r in caplog.records)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def _two_experts(spec_nodes, high, low, steps, switch, **settings):
    """Wan 2.2's official graph: the high-noise expert runs steps [0, switch) and returns its
    leftover noise, the low-noise expert finishes [switch, steps), each through its own
    KSamplerAdvanced, each with its own Speculative Cache node when ``settings``."""
    import nodes
    if settings:
        high, low = cached(spec_nodes, high, **settings), cached(spec_nodes, low, **settings)
    pos, neg = tm.conditioning("wan22")
    lat = {"samples": tm.latent("wan22")}
    ks = nodes.KSamplerAdvanced()
    (mid,) = ks.sample(high, "enable", 5, steps, 3.0, "euler", "simple", pos, neg, lat, 0, switch, "enable")
    (out,) = ks.sample(low, "disable", 5, steps, 3.0, "euler", "simple", pos, neg, mid, switch, 10000, "disable")
    return out["samples"]


def test_wan22_two_experts_each_forecast_only_their_own_part(spec_nodes, stats_log):
    high, low = tm.build("wan22", seed=3), tm.build("wan22", seed=4)
    steps, switch = 20, 10       # (a run of 8 steps or fewer probes only once forecasts paid for it)
    ref = _two_experts(spec_nodes, high, low, steps, switch)
    assert torch.equal(_two_experts(spec_nodes, high, low, steps, switch, threshold=0.0), ref)
    n = len(stats_log)
    out = _two_experts(spec_nodes, high, low, steps, switch, threshold=5.0)
    first, second = stats_log[n:n + 2]
    # each run counts only the steps it samples, and starts from no history: its own warm-up
    assert first["steps"] == switch and second["steps"] == steps - switch
    assert len(first["timeline"]) == switch and len(second["timeline"]) == steps - switch
    assert first["timeline"].startswith("CCC") and second["timeline"].startswith("CCC")
    assert first["forecast"] > 0 and second["forecast"] > 0 and first["verified"] > 0 and second["verified"] > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_partial_denoise_counts_only_the_steps_it_runs(spec_nodes, stats_log):
    import nodes
    m = tm.build("wan21", seed=3)
    pos, neg = tm.conditioning("wan21")
    lat = {"samples": torch.randn(tm.latent("wan21").shape, generator=torch.Generator().manual_seed(2))}
    (ref,) = nodes.KSampler().sample(m, 3, 10, 2.0, "euler", "simple", pos, neg, lat, denoise=0.5)
    (out,) = nodes.KSampler().sample(cached(spec_nodes, m, threshold=5.0), 3, 10, 2.0, "euler", "simple",
                                     pos, neg, lat, denoise=0.5)
    s = stats_log[-1]
    assert s["steps"] == 10 and len(s["timeline"]) == 10 and "." not in s["timeline"] and s["forecast"] > 0
    assert ((out["samples"] - ref["samples"]).norm() / ref["samples"].norm()).item() < 0.05


def test_block_granularity_on_a_family_without_it_warns_and_uses_stack(spec_nodes, stats_log, caplog):
    forget_warnings()
    m = tm.build("sd3", seed=3)
    ref = tm.sample(m, "sd3", steps=10)
    with caplog.at_level("WARNING", logger="speculative_cache"):
        out = tm.sample(cached(spec_nodes, m, threshold=5.0, granularity="block"), "sd3", steps=10)
    s = stats_log[-1]
    assert any("block granularity is not available for sd3" in r.message for r in caplog.records)
    assert s["mode"] == "stack" and s["forecast"] > 0 and not s["internal_error"]
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_wan_vace_residuals_are_not_counted_twice(spec_nodes, stats_log):
    """VACE adds its blocks' outputs between the main blocks, outside the block patches:
    stage residuals are summed from what each main block added, and the forward adds this
    step's VACE residuals itself. Measured on this tiny model with linear forecasts, two in a row:
    4.7e-5 from uncached, against 1.2e-2 when the stage residuals held the VACE residuals too
    (counted twice)."""
    _need("wan21_vace")
    m = tm.build("wan21_vace", seed=3)
    ref = tm.sample(m, "wan21_vace", steps=12)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0, order=1, max_forecast_steps=2), "wan21_vace", steps=12)
    s = stats_log[-1]
    assert s["mode"] == "stack" and s["forecast"] >= 4
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3
