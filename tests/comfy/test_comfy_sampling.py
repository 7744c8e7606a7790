"""Speculative Cache through ComfyUI's real sampler (comfy.sample) on ComfyUI's own
model classes at tiny sizes, on the CPU."""

from __future__ import annotations

import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import cached, forget_warnings, live_tensor_count, random_double_block_mlp

pytestmark = pytest.mark.comfy

BLOCK_MODELS = ["flux", "hunyuan_video", "chroma"]


class BlockCounter:
    """Counts real forward calls of every transformer block (torch hooks, independent
    of the pack)."""

    def __init__(self, patcher):
        dm = patcher.model.diffusion_model
        self.first = dm.double_blocks[0]
        self.counts = {"first": 0, "all": 0}
        self.handles = [self.first.register_forward_hook(lambda *a: self._hit("first"))]
        for blk in list(dm.double_blocks) + list(dm.single_blocks):
            self.handles.append(blk.register_forward_hook(lambda *a: self._hit("all")))

    def _hit(self, k):
        self.counts[k] += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def models(spec_nodes):
    return {name: tm.build(name, seed=3) for name in BLOCK_MODELS}


@pytest.mark.parametrize("name", BLOCK_MODELS)
def test_threshold_zero_is_bit_identical(spec_nodes, models, stats_log, name):
    m = models[name]
    ref = tm.sample(m, name, steps=12)
    out = tm.sample(cached(spec_nodes, m, threshold=0.0), name, steps=12)
    assert torch.equal(out, ref)
    assert stats_log[-1]["forecast"] == 0 and stats_log[-1]["computed"] == 12


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_rejected_forecasts_are_recomputed_exactly(spec_nodes, models, stats_log, name):
    """A threshold no forecast can meet: every speculated step is verified, rejected and
    recomputed ("redo"), so the output must still be the uncached one, bit for bit."""
    m = models[name]
    ref = tm.sample(m, name, steps=12)
    out = tm.sample(cached(spec_nodes, m, threshold=1e-9, warmup_steps=2, final_full_steps=1), name, steps=12)
    assert torch.equal(out, ref)
    s = stats_log[-1]
    assert s["verified"] == s["rejected"] >= 1   # every probed forecast rejected and recomputed
    assert s["eval_computed"] == 12
    # back-off: the wasted probes stay within 2 % of the uncached run (or one probe: 1 of the 4
    # blocks of one of 12 steps, 2.1 %), instead of one probe per step (+19 %)
    assert s["compute_fraction"] <= 1 + max(0.02, 1 / (4 * 12)) + 1e-9
    assert s["forecast"] == 0 and s["compute_fraction"] > 1.0  # the probes cost something


@pytest.mark.parametrize("name", BLOCK_MODELS)
def test_forecasts_skip_real_block_evaluations(spec_nodes, models, stats_log, name):
    m = models[name]
    steps = 16
    ref = tm.sample(m, name, steps=steps)
    counter = BlockCounter(m)
    try:
        out = tm.sample(cached(spec_nodes, m, threshold=5.0, warmup_steps=2, max_forecast_steps=3,
                               final_full_steps=1), name, steps=steps)
    finally:
        counter.close()
    s = stats_log[-1]
    n_blocks = len(m.model.diffusion_model.double_blocks) + len(m.model.diffusion_model.single_blocks)
    # counted by torch hooks: block 0 runs only on computed steps
    assert counter.counts["first"] == s["eval_computed"] == s["computed"] < steps
    assert s["forecast"] >= steps // 2
    # every block on computed steps, plus the one verification block per verified forecast
    assert counter.counts["all"] == s["eval_computed"] * n_blocks + s["verified"]
    assert s["compute_fraction"] == pytest.approx(counter.counts["all"] / (steps * n_blocks), abs=1e-3)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel


def test_cond_and_uncond_are_separate_streams(spec_nodes, models, stats_log):
    m = models["flux"]
    ref = tm.sample(m, "flux", steps=14, cfg=4.0)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "flux", steps=14, cfg=4.0)
    s = stats_log[-1]
    assert s["streams"] == 2 and s["forecast"] > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_cfg_one_runs_only_cond(spec_nodes, models, stats_log):
    m = models["flux"]
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "flux", steps=12, cfg=1.0)
    s = stats_log[-1]
    assert s["streams"] == 1 and s["forecast"] > 0 and torch.isfinite(out).all()


def test_batched_latent(spec_nodes, models, stats_log):
    m = models["hunyuan_video"]
    ref = tm.sample(m, "hunyuan_video", steps=12, batch=3)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "hunyuan_video", steps=12, batch=3)
    assert out.shape == ref.shape and stats_log[-1]["forecast"] > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_two_runs_in_a_row_are_identical(spec_nodes, models, stats_log):
    pm = cached(spec_nodes, models["flux"], threshold=0.5)
    a = tm.sample(pm, "flux", steps=14)
    b = tm.sample(pm, "flux", steps=14)
    assert torch.equal(a, b)
    assert stats_log[-1]["timeline"] == stats_log[-2]["timeline"]


def test_new_resolution_seed_and_batch_between_runs(spec_nodes, models, stats_log):
    pm = cached(spec_nodes, models["flux"], threshold=5.0)
    small = tm.sample(pm, "flux", steps=12, seed=1)
    big = tm.sample(pm, "flux", steps=12, seed=2, scale=2, batch=2)
    assert small.shape[-1] * 2 == big.shape[-1] and big.shape[0] == 2
    assert torch.isfinite(big).all()
    ref = tm.sample(models["flux"], "flux", steps=12, seed=2, scale=2, batch=2)
    assert ((big - ref).norm() / ref.norm()).item() < 0.05
    assert stats_log[-2]["forecast"] > 0  # the second run forecast too, from its own history


def test_no_cached_tensor_stays_alive(spec_nodes, models):
    pm = cached(spec_nodes, models["hunyuan_video"], threshold=5.0)
    tm.sample(pm, "hunyuan_video", steps=10)       # warm up lazy allocations
    before = live_tensor_count()
    out = tm.sample(pm, "hunyuan_video", steps=10)
    del out
    # a leak shows as growth (the count may also fall: an earlier test's objects, e.g. Dynamo's
    # compiled graphs, are freed late)
    assert live_tensor_count() <= before
    import gc
    gc.collect()
    ours = [o for o in gc.get_objects() if type(o).__name__ in ("SpeculativeRun", "StreamCache")]
    assert not any(getattr(o, "closed", True) is False for o in ours)          # no open run
    assert sum(o.nbytes() for o in ours if type(o).__name__ == "StreamCache") == 0   # nothing cached
    hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    assert hooks.STEP_CACHE.run_key not in pm.model_options["transformer_options"]


def test_interrupted_run_leaves_nothing_behind(spec_nodes, models, stats_log):
    import comfy.sample
    import comfy.model_management
    m = models["flux"]
    pm = cached(spec_nodes, m, threshold=5.0)
    ref = tm.sample(pm, "flux", steps=12)

    def stop(step, *args):
        if step == 6:
            raise comfy.model_management.InterruptProcessingException()

    lat = comfy.sample.fix_empty_latent_channels(pm, tm.latent("flux"))
    noise = comfy.sample.prepare_noise(lat, 42)
    pos, neg = tm.conditioning("flux")
    before = live_tensor_count()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(pm, noise, 12, 2.0, "euler", "simple", pos, neg, lat, callback=stop,
                            disable_pbar=True, seed=42)
    assert stats_log[-1]["evaluations"] == 7  # the run was closed and reported
    assert live_tensor_count() <= before
    assert torch.equal(tm.sample(pm, "flux", steps=12), ref)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral", "dpmpp_2m"])
def test_other_samplers(spec_nodes, models, stats_log, sampler):
    m = models["flux"]
    ref = tm.sample(m, "flux", steps=10, sampler=sampler)
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "flux", steps=10, sampler=sampler)
    s = stats_log[-1]
    assert s["steps"] == 10 and s["forecast"] > 0
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_nonfinite_forecast_falls_back_to_full_step(spec_nodes, models, stats_log, monkeypatch):
    core = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.run")
    m = models["flux"]
    ref = tm.sample(m, "flux", steps=10)
    monkeypatch.setattr(core.Chunk, "predict", lambda self, name: torch.full(
        self.run.streams[self.keys[0]].forecasters[name].predict(0.0).shape, float("nan")).repeat(
            len(self.keys), *([1] * (self.run.streams[self.keys[0]].forecasters[name].predict(0.0).dim() - 1))))
    out = tm.sample(cached(spec_nodes, m, threshold=5.0), "flux", steps=10)
    s = stats_log[-1]
    assert s["nonfinite"] > 0 and s["forecast"] == 0
    assert torch.equal(out, ref)


def test_chains_to_an_existing_block_patch(spec_nodes, models, stats_log):
    m = models["flux"].clone()
    calls = []

    def other_pack_patch(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    m.set_model_patch_replace(other_pack_patch, "dit", "single_block", 1)
    ref = tm.sample(m, "flux", steps=12)
    n_ref = len(calls)
    calls.clear()
    pm = cached(spec_nodes, m, threshold=0.0)
    assert torch.equal(tm.sample(pm, "flux", steps=12), ref)
    assert len(calls) == n_ref == 12


def test_through_the_ksampler_node(spec_nodes, models, stats_log):
    import nodes
    m = models["flux"]
    pos, neg = tm.conditioning("flux")
    lat = {"samples": tm.latent("flux")}
    (ref,) = nodes.KSampler().sample(m, 7, 12, 2.0, "euler", "simple", pos, neg, lat)
    (out,) = nodes.KSampler().sample(cached(spec_nodes, m, threshold=0.0), 7, 12, 2.0, "euler", "simple",
                                     pos, neg, lat)
    assert torch.equal(out["samples"], ref["samples"])


def test_legacy_schema_keeps_its_inputs_defaults_and_limits(spec_nodes):
    """The legacy node keeps its 18 widgets in their saved order (old graphs store them by
    position) and is marked deprecated."""
    node = spec_nodes.SpeculativeCache
    info = node.GET_NODE_INFO_V1()
    assert info["display_name"] == "Speculative Cache (legacy, all inputs)" and info["deprecated"]
    required = info["input"]["required"]
    assert list(required)[1:] == ["preset", "method", "threshold", "forecaster", "order", "warmup_steps",
                                  "max_forecast_steps", "start_percent", "end_percent", "final_full_steps",
                                  "on_reject", "metric", "threshold_decay", "threshold_floor", "storage_dtype",
                                  "granularity", "clusters", "gamma"]
    assert required["model"][0] == "MODEL"
    th = required["threshold"][1]
    assert th["display"] == "slider" and th["min"] == 0.0 and th["default"] > 0
    for name, spec in required.items():
        if name == "model":
            continue
        opts = spec[1] if len(spec) > 1 else {}
        assert "default" in opts, name
        assert opts.get("tooltip"), name
    methods = required["method"][0] if isinstance(required["method"][0], list) else required["method"][1]["options"]
    assert set(methods) == {"speca", "taylorseer", "reuse", "hicache", "foca", "spectrum", "clusca"}
    presets = required["preset"][0] if isinstance(required["preset"][0], list) else required["preset"][1]["options"]
    assert {"auto", "custom", "paper_flux"} <= set(presets)
    assert required["order"][1]["min"] == 0 and required["max_forecast_steps"][1]["min"] == 1
    assert info["output"] == ["MODEL"]


def test_pack_loads_under_any_folder_name_without_top_level_modules(spec_nodes):
    import sys
    other = comfy_env.load_pack("some_other_folder_name")
    assert other.WEB_DIRECTORY == "./web/js"
    assert "cache_core" not in sys.modules
    assert sys.modules["nodes"].__file__.endswith("nodes.py")  # ComfyUI's own, untouched


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
@pytest.mark.parametrize("settings", [
    dict(method="reuse"), dict(method="taylorseer", order=3), dict(method="hicache"), dict(method="foca"),
    dict(method="spectrum"), dict(method="speca", forecaster="hicache"), dict(method="speca", forecaster="foca"),
    dict(method="speca", forecaster="spectrum"),
    dict(method="taylorseer", order=2, preset="custom"), dict(preset="paper_flux", threshold=7.0),
    dict(preset="paper_hunyuan_video", threshold=1.0), dict(storage_dtype="bfloat16")],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_every_method_through_the_sampler(spec_nodes, models, stats_log, name, settings):
    m = models[name]
    steps = 16
    ref = tm.sample(m, name, steps=steps)
    counter = BlockCounter(m)
    try:
        out = tm.sample(cached(spec_nodes, m, **{"threshold": 5.0, **settings}), name, steps=steps)
    finally:
        counter.close()
    s = stats_log[-1]
    assert torch.isfinite(out).all()
    assert counter.counts["first"] == s["eval_computed"] < steps     # fewer real evaluations
    assert s["forecast"] > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("forecaster", ["taylor", "hicache", "foca", "spectrum"])
def test_speca_drafts_are_lossless_at_threshold_zero(spec_nodes, models, forecaster):
    m = models["flux"]
    ref = tm.sample(m, "flux", steps=10)
    assert torch.equal(tm.sample(cached(spec_nodes, m, threshold=0.0, forecaster=forecaster), "flux", steps=10), ref)


def test_clusca_token_subset_equals_the_full_block_mlp_when_every_token_is_a_representative(spec_nodes):
    blockwise = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.blockwise")
    h, n = 32, 12
    blk, rows, mod2, full = random_double_block_mlp(h, n)
    with torch.no_grad():
        labels = torch.arange(n).repeat(2, 1)                # every token its own cluster
        anchor = torch.zeros(2, n, h)
        for gamma in (0.0, 0.3):
            refreshed = blockwise.refresh_mlp_anchor(blk, rows, labels, n, 1 + mod2.scale, mod2.shift, anchor,
                                                     gamma, torch.Generator().manual_seed(1))
            assert torch.allclose(refreshed, full, atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
@pytest.mark.parametrize("settings", [dict(granularity="block"), dict(method="clusca"),
                                      dict(method="clusca", gamma=0.0, clusters=4)],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_block_granularity_and_clusca_through_the_sampler(spec_nodes, models, stats_log, name, settings):
    m = models[name]
    ref = tm.sample(m, name, steps=16)
    counter = BlockCounter(m)
    try:
        out = tm.sample(cached(spec_nodes, m, threshold=5.0, **settings), name, steps=16)
    finally:
        counter.close()
    s = stats_log[-1]
    assert torch.isfinite(out).all() and s["forecast"] > 0
    assert counter.counts["first"] == s["eval_computed"] < 16
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    again = tm.sample(cached(spec_nodes, m, threshold=5.0, **settings), name, steps=16)
    assert torch.equal(again, out)                           # seeded representatives: reproducible


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_block_granularity_redo_is_bit_identical(spec_nodes, models, stats_log, name):
    m = models[name]
    ref = tm.sample(m, name, steps=12)
    out = tm.sample(cached(spec_nodes, m, threshold=1e-9, granularity="block"), name, steps=12)
    assert torch.equal(out, ref) and stats_log[-1]["rejected"] == stats_log[-1]["verified"] > 0


def test_block_granularity_warns_with_the_number(spec_nodes, monkeypatch, caplog):
    device_memory = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.runtime.device_memory")
    monkeypatch.setattr(device_memory, "WARN_CACHE_BYTES", 1000)    # the tiny model's cache is small
    forget_warnings()
    m = tm.build("flux", seed=3)
    with caplog.at_level("WARNING", logger="speculative_cache"):
        tm.sample(cached(spec_nodes, m, threshold=5.0, granularity="block"), "flux", steps=6)
    assert any("GiB of forecast history" in r.message for r in caplog.records)


def test_a_failing_setup_samples_uncached_instead_of_crashing(spec_nodes, models, monkeypatch, caplog):
    glue = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.glue")
    m = models["flux"]
    pm = cached(spec_nodes, m, threshold=5.0)
    ref = tm.sample(m, "flux", steps=8)

    def broken(*a, **k):
        raise RuntimeError("simulated adapter failure")

    monkeypatch.setattr(glue, "select_adapter", broken)
    with caplog.at_level("ERROR", logger="speculative_cache"):
        out = tm.sample(pm, "flux", steps=8)
    assert torch.equal(out, ref)
    assert any("Speculative Cache: could not set up this run; sampling without it" in r.getMessage()
               for r in caplog.records)


def test_a_few_step_run_says_why_it_saves_little_and_costs_nothing(spec_nodes, models, stats_log, caplog):
    """A distilled model's 4 steps: the warm-up and the final step fill the run, the console
    says so in one line, and the run is the uncached one bit for bit, at compute 1.0."""
    from conftest import simple
    m = models["flux"]
    ref = tm.sample(m, "flux", steps=4)
    with caplog.at_level("INFO", logger="speculative_cache"):
        out = tm.sample(simple(spec_nodes, m), "flux", steps=4)
    assert torch.equal(out, ref)
    assert stats_log[-1]["compute_fraction"] == 1.0 and stats_log[-1]["forecast"] == 0
    notes = [r.getMessage() for r in caplog.records if "steps leave at most" in r.getMessage()]
    assert len(notes) == 1 and "4 steps leave at most 0 to forecast" in notes[0], notes
