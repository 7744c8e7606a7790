"""What keeps the pack working as ComfyUI moves: the API contract of every ComfyUI name it
uses, block granularity on blocks that take their modulation from ``vec`` (ComfyUI 0.8.0's
Chroma and FLUX.2), and errors inside the cache that must never stop a sampler. Runs on
every ComfyUI version CI tests (0.3.64 and 0.8.0)."""

from __future__ import annotations

import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import cached

pytestmark = pytest.mark.comfy


def pack(module):
    return importlib.import_module(f"{comfy_env.PACK_MODULE}.{module}")


def test_every_comfyui_name_the_pack_uses_exists(spec_nodes):
    compat = pack("nodes.runtime.compat")
    assert compat.missing() == []


def test_the_contract_check_names_what_is_gone(spec_nodes, monkeypatch):
    compat = pack("nodes.runtime.compat")
    monkeypatch.setattr(compat, "NAMES", compat.NAMES + [("comfy.patcher_extension", "WrappersMP.NO_SUCH_HOOK")])
    monkeypatch.setattr(compat, "SIGNATURES", compat.SIGNATURES + [
        ("comfy.samplers", "calc_cond_batch", [(3, "sigma")])])
    gone = compat.missing()
    assert any("WrappersMP.NO_SUCH_HOOK" in g for g in gone)
    assert any("calc_cond_batch: parameter 3 is no longer 'sigma'" in g for g in gone)
    assert len(gone) == 2


@pytest.fixture(scope="module")
def vec_models(spec_nodes):
    return {name: tm.build(name, seed=3) for name in ("chroma", "flux2") if tm.available(name)}


@pytest.mark.parametrize("name", ["chroma", "flux2"])
def test_block_granularity_on_blocks_modulated_through_vec(spec_nodes, vec_models, stats_log, name, caplog):
    """ComfyUI 0.8.0 builds Chroma's and FLUX.2's blocks from FLUX's classes without their own
    modulation layers (the model passes the modulation in ``vec``). Block granularity must
    forecast there (or, where the blocks are not FLUX's classes, fall back to stack with a
    warning), never raise."""
    if name not in vec_models:
        pytest.skip(f"{name} is not in ComfyUI {comfy_env.comfyui_version(comfy_env.find_comfyui())}")
    blockwise = pack("nodes.step_cache.blockwise")
    m = vec_models[name]
    block_level = blockwise.supports(m.model.diffusion_model)
    ref = tm.sample(m, name, steps=12)
    with caplog.at_level("WARNING", logger="speculative_cache"):
        out = tm.sample(cached(spec_nodes, m, threshold=5.0, granularity="block"), name, steps=12)
    s = stats_log[-1]
    assert torch.isfinite(out).all() and s["forecast"] > 0 and not s["internal_error"]
    assert s["mode"] == ("block" if block_level else "stack")
    if not block_level:
        assert any("block granularity is not available" in r.message for r in caplog.records)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    # every forecast rejected and recomputed: bit-identical
    strict = tm.sample(cached(spec_nodes, m, threshold=1e-9, granularity="block"), name, steps=12)
    assert torch.equal(strict, ref) and stats_log[-1]["rejected"] == stats_log[-1]["verified"] > 0


def test_flux2_is_recognised_at_block_level_on_new_comfyui(spec_nodes, vec_models, stats_log):
    if "flux2" not in vec_models:
        pytest.skip("FLUX.2 came with ComfyUI 0.8.0")
    m = vec_models["flux2"]
    ref = tm.sample(m, "flux2", steps=10)
    assert torch.equal(tm.sample(cached(spec_nodes, m, threshold=0.0), "flux2", steps=10), ref)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "flux2", steps=10)
    s = stats_log[-1]
    assert s["mode"] == "stack" and s["verified"] > 0 and s["forecast"] > 0 and s["compute_fraction"] < 1.0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def _raise(*_a, **_k):
    raise RuntimeError("injected failure")


# Where an error is injected: inside a block patch while the model runs (the verification,
# the recording of a computed step), and in the wrappers around the model call.
INJECTIONS = {
    "verify_in_block_patch": ("cache_core.run", "Chunk", "verify"),
    "record_after_real_block": ("cache_core.run", "Chunk", "record"),
    "decide_at_evaluation_start": ("cache_core.policy", "Policy", "decide"),
    "predict_at_forecast": ("cache_core.run", "Chunk", "predict"),
}


@pytest.mark.parametrize("where", list(INJECTIONS))
@pytest.mark.parametrize("granularity", ["stack", "block"])
def test_an_error_inside_the_cache_ends_in_an_uncached_run_not_a_crash(spec_nodes, stats_log, monkeypatch,
                                                                       caplog, where, granularity):
    m = tm.build("flux", seed=3)
    ref = tm.sample(m, "flux", steps=10)
    module, cls, attr = INJECTIONS[where]
    original = getattr(getattr(pack(module), cls), attr)
    calls = {"n": 0}

    def fails_on_the_third_call(*a, **k):
        # a few normal calls first, so the failure lands in the middle of a run
        calls["n"] += 1
        if calls["n"] >= 3:
            _raise()
        return original(*a, **k)

    monkeypatch.setattr(getattr(pack(module), cls), attr, fails_on_the_third_call)
    with caplog.at_level("WARNING", logger="speculative_cache"):
        out = tm.sample(cached(spec_nodes, m, threshold=5.0, granularity=granularity), "flux", steps=10)
    s = stats_log[-1]
    assert calls["n"] >= 3, "the injected failure never fired"
    assert "injected failure" in s["internal_error"]
    assert any("internal error" in r.message for r in caplog.records)
    # Until the failure every forecast was verified or computed; after it the run is uncached.
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    if s["forecast"] == 0:
        assert torch.equal(out, ref)
    monkeypatch.undo()
    tm.sample(cached(spec_nodes, m, threshold=5.0, granularity=granularity), "flux", steps=10)
    assert not stats_log[-1]["internal_error"] and stats_log[-1]["forecast"] > 0   # the next run is cached again


def test_comfyui_interrupt_passes_through_the_cache(spec_nodes, stats_log, monkeypatch):
    import comfy.model_management as mm
    run_mod = pack("cache_core.run")
    m = tm.build("flux", seed=3)

    def interrupt(*a, **k):
        raise mm.InterruptProcessingException()

    monkeypatch.setattr(run_mod.Chunk, "verify", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        tm.sample(cached(spec_nodes, m, threshold=5.0), "flux", steps=10)
    assert stats_log[-1]["internal_error"] == ""
