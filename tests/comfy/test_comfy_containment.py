"""One containment rule on every path (nodes/runtime/guard.py), through ComfyUI's real sampler:

* an error raised by the pack's own code at any hook point of any node and mode ends that feature
  for the run: the prompt completes, the calls from the failing one on are computed as without
  the pack, the console says so once, nothing stays in memory, and the next run is cached again;
* an error raised by the model or ComfyUI (a shape error of the graph, out of memory) or an
  interrupt reaches the user unchanged and the call is never run a second time;
* a call computed again after an error of ours gets its own inputs, intact (ComfyUI's U-Net pops
  the ControlNet residuals it applies);
* an error in our cleanup never replaces the user's interrupt."""

from __future__ import annotations

import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import cached, forget_warnings, live_tensor_count, options, simple, with_context_windows

pytestmark = pytest.mark.comfy

STEPS = 10


def pack(module):
    return importlib.import_module(f"{comfy_env.PACK_MODULE}.{module}")


class Injected(RuntimeError):
    pass


RUN_CLASSES = {"RunContext", "SpeculativeRun", "EditRun", "PruningRun", "EditCall", "BlockCall", "BlockwiseCall"}


def open_runs() -> int:
    """The pack's run objects still alive (a run, its calls, and through them its caches)."""
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ in RUN_CLASSES
               and type(o).__module__.startswith(comfy_env.PACK_MODULE))


def fail_on_call(monkeypatch, owner, attr, on_call=1):
    """Make the ``on_call``-th call of ``owner.attr`` raise Injected; returns the counter."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise Injected(f"injected failure in {attr}")
        return original(*a, **k)
    monkeypatch.setattr(owner, attr, failing)
    return calls


@pytest.fixture
def said(monkeypatch):
    """The pack's log messages during the test, as text only: the logger stops propagating to
    pytest's handlers, whose records keep each traceback (and through its frames, the failed
    call's tensors) until the test ends."""
    import logging
    messages = []

    class Text(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = logging.getLogger("speculative_cache")
    handler = Text(level=logging.WARNING)
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    yield messages
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def flux(spec_nodes):
    return tm.build("flux", seed=3)


@pytest.fixture(scope="module")
def sd15(spec_nodes):
    return tm.build("sd15", seed=5)


@pytest.fixture(scope="module")
def wan21(spec_nodes):
    return tm.build("wan21", seed=3)


@pytest.fixture
def feature_stats(spec_nodes):
    """Final stats of every run of each feature during the test: {feature name: [stats, ...]}."""
    features = {"cache": pack("nodes.step_cache.run_context").STEP_CACHE,
                "edit": pack("nodes.edit_region.region").EDIT,
                "pruning": pack("nodes.token_pruning.pruning").PRUNING}
    seen = {name: [] for name in features}
    listeners = {}
    for name, feature in features.items():
        listeners[name] = (lambda n: lambda node_id, stats, final: final and seen[n].append(stats))(name)
        feature.listeners.append(listeners[name])
    yield seen
    for name, feature in features.items():
        feature.listeners.remove(listeners[name])


# ---- the paths ------------------------------------------------------------------------------

def _step_cache_path(mode, steps=STEPS, **opts):
    def run(spec_nodes, models, patched=True):
        m = models["flux"]
        if patched:
            m = simple(spec_nodes, m, mode=mode, speed=0.5, start_percent=0.0, end_percent=1.0,
                       options=options(spec_nodes, threshold=5.0, **opts) if mode != "speed_target"
                       else options(spec_nodes, **opts))
        return tm.sample(m, "flux", steps=steps)
    return run


def _legacy_path(spec_nodes, models, patched=True):
    m = models["flux"]
    return tm.sample(cached(spec_nodes, m, threshold=5.0) if patched else m, "flux", steps=STEPS)


def _pruning_path(spec_nodes, models, patched=True):
    m = models["sd15"]
    if patched:
        m = spec_nodes.SpeculativeCacheTokenPruning.execute(m, ratio=0.5, refresh_interval=3).result[0]
    return tm.sample(m, "sd15", steps=STEPS, cfg=5.0)


def _context_windows_path(spec_nodes, models, patched=True):
    """A tiny Wan over 9 frames through ComfyUI's Context Windows node (4 windows of 4 frames)."""
    import comfy.sample
    m = simple(spec_nodes, models["wan21"], options=options(spec_nodes, threshold=5.0)) if patched else models["wan21"]
    latent = torch.zeros(1, 16, 9, 8, 8)
    positive, negative = tm.conditioning("wan21")
    return comfy.sample.sample(with_context_windows(m), comfy.sample.prepare_noise(latent, 42), STEPS, 2.0, "euler",
                               "simple", positive, negative, latent, disable_pbar=True, seed=42)


PATHS = {
    "auto": ("cache", _step_cache_path("auto")),
    "probe": ("cache", _step_cache_path("probe")),
    "block granularity": ("cache", _step_cache_path("probe", granularity="block")),
    # 28 steps at 6x: 4 model calls and a cond-only step
    "planned target, cond-only step": ("cache", _step_cache_path("speed_target", steps=28, target_speedup=6.0)),
    "legacy node": ("cache", _legacy_path),
    "token pruning": ("pruning", _pruning_path),
    "context windows": ("cache", _context_windows_path),
}

# path -> hook points: (module, owner class or None, attribute); each is our code, reached at
# that point of a run
HOOKS = {
    "evaluation start (CALC_COND_BATCH)": ("cache_core.run", "SpeculativeRun", "begin_evaluation"),
    "decision": ("cache_core.policy", "Policy", "decide"),
    "forecast": ("cache_core.run", "Chunk", "predict"),
    "record / lookback (DIFFUSION_MODEL)": ("cache_core.run", "Chunk", "record"),
    "step callback (SAMPLER_SAMPLE)": ("cache_core.run", "SpeculativeRun", "end_evaluation"),
    "verification (probe)": ("cache_core.run", "Chunk", "verify"),
    "block patch": ("nodes.step_cache.block_call", "BlockCall", "block"),
    "block patch (block granularity)": ("nodes.step_cache.blockwise", "BlockwiseCall", "block"),
    "trajectory correction (post-CFG)": ("cache_core.correction", "TrajectoryCorrection", "observe"),
    "cond-only step": ("nodes.step_cache.cond_only", "GuidanceDifference", "needed_after"),
    "context window of a call": ("nodes.step_cache.context_windows", None, "window_key"),
    "pruning attention patch": ("nodes.token_pruning.pruning", None, "select_dynamic"),
    "pruning output patch": ("nodes.token_pruning.pruning", None, "served_output"),
}
CASES = {
    "auto": ["evaluation start (CALC_COND_BATCH)", "decision", "forecast", "record / lookback (DIFFUSION_MODEL)",
             "step callback (SAMPLER_SAMPLE)", "trajectory correction (post-CFG)"],
    "probe": ["decision", "forecast", "verification (probe)", "block patch", "record / lookback (DIFFUSION_MODEL)"],
    "block granularity": ["block patch (block granularity)", "verification (probe)", "forecast"],
    "planned target, cond-only step": ["cond-only step", "evaluation start (CALC_COND_BATCH)", "forecast"],
    "legacy node": ["verification (probe)", "block patch"],
    "token pruning": ["pruning attention patch", "pruning output patch"],
    "context windows": ["context window of a call", "evaluation start (CALC_COND_BATCH)", "forecast",
                        "record / lookback (DIFFUSION_MODEL)"],
}


@pytest.mark.parametrize("path, hook", [(p, h) for p, hooks in CASES.items() for h in hooks])
def test_an_error_of_ours_at_a_hook_point_leaves_the_prompt_to_complete_uncached(
        spec_nodes, flux, sd15, wan21, feature_stats, monkeypatch, said, path, hook):
    models = {"flux": flux, "sd15": sd15, "wan21": wan21}
    feature, run = PATHS[path]
    reference = run(spec_nodes, models, patched=False)
    module, owner, attr = HOOKS[hook]
    target = getattr(pack(module), owner) if owner else pack(module)
    calls = fail_on_call(monkeypatch, target, attr)
    forget_warnings()
    out = run(spec_nodes, models)
    assert calls["n"] >= 1, "the hook point was never reached"
    stats = feature_stats[feature][-1]
    told = [m for m in said if "injected failure" in m]
    assert len(told) == 1, told                                # said once, with what happened
    # from the failing call on the run is uncached: whatever differs from the uncached picture
    # comes from forecasts (pruned calls) served before the failure
    if feature == "cache":
        assert "injected failure" in stats["internal_error"]
        forecast_before = stats["forecast"] > 0
    else:
        assert "injected failure" in stats["disabled"]
        forecast_before = stats["pruned_calls"] > 0
    assert torch.isfinite(out).all()
    if not forecast_before:
        assert torch.equal(out, reference)                     # nothing served before the failure
    else:
        assert ((out - reference).norm() / reference.norm()).item() < 0.1
    del out
    assert open_runs() == 0                                    # nothing of the failed run stays
    monkeypatch.undo()
    run(spec_nodes, models)
    after = feature_stats[feature][-1]
    assert not after.get("internal_error") and not after.get("disabled")     # the next run works again


EDIT_HOOKS = {"region": ("EditRun", "region"), "block patch": ("EditCall", "block")}


@pytest.mark.parametrize("hook", list(EDIT_HOOKS))
def test_an_error_of_ours_in_the_edit_region_leaves_the_prompt_to_complete_uncached(
        spec_nodes, feature_stats, monkeypatch, caplog, hook):
    from devkit import reference_model as rm
    model = rm.load_reference()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    region = spec_nodes.SpeculativeCacheEditRegion.execute(model).result[0]
    reference = rm.inpaint(model, [0], [1000], mask, steps=8)
    owner, attr = EDIT_HOOKS[hook]
    calls = fail_on_call(monkeypatch, getattr(pack("nodes.edit_region.region"), owner), attr)
    forget_warnings()
    with caplog.at_level("WARNING", logger="speculative_cache"):
        out = rm.inpaint(region, [0], [1000], mask, steps=8)
    assert calls["n"] >= 1
    assert "injected failure" in feature_stats["edit"][-1]["disabled"]
    assert len([r for r in caplog.records if "injected failure" in r.getMessage()]) == 1
    assert torch.equal(out, reference)          # it failed on its first call: every call uncached


# ---- the model's errors pass through, never run twice ----------------------------------------

def _failing_block(monkeypatch, cls, on_call, error):
    calls = {"n": 0}
    original = cls.forward

    def forward(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise error
        return original(self, *a, **k)
    monkeypatch.setattr(cls, "forward", forward)
    return calls


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")


@pytest.mark.parametrize("error", [lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (graph)"), _oom],
                         ids=["shape error", "out of memory"])
@pytest.mark.parametrize("path", ["auto", "probe", "token pruning"])
def test_an_error_of_the_model_reaches_the_user_unchanged_and_is_not_run_twice(
        spec_nodes, flux, sd15, feature_stats, monkeypatch, path, error):
    import comfy.ldm.flux.layers as flux_layers
    from comfy.ldm.modules.attention import BasicTransformerBlock
    models = {"flux": flux, "sd15": sd15}
    feature, run = PATHS[path]
    exc = error()
    cls = BasicTransformerBlock if path == "token pruning" else flux_layers.DoubleStreamBlock
    calls = _failing_block(monkeypatch, cls, on_call=5, error=exc)
    with pytest.raises(type(exc)) as raised:
        run(spec_nodes, models)
    assert raised.value is exc                          # the same error, not one of ours
    assert calls["n"] == 5                              # the failed call was not made again
    stats = feature_stats[feature][-1]
    assert not stats.get("internal_error") and not stats.get("disabled")   # not blamed on the pack


@pytest.mark.parametrize("path", list(PATHS))
def test_an_interrupt_surfaces_even_when_our_cleanup_fails_and_nothing_stays(
        spec_nodes, flux, sd15, wan21, monkeypatch, caplog, path):
    """Every path interrupted mid-run (the Edit Region's: test_comfy_edit_region.py)."""
    import comfy.ldm.flux.layers as flux_layers
    import comfy.model_management as mm
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.wan.model import WanAttentionBlock
    models = {"flux": flux, "sd15": sd15, "wan21": wan21}
    feature, run = PATHS[path]
    run(spec_nodes, models)
    before = live_tensor_count()
    cls = {"token pruning": BasicTransformerBlock, "context windows": WanAttentionBlock}.get(
        path, flux_layers.DoubleStreamBlock)
    _failing_block(monkeypatch, cls, on_call=7, error=mm.InterruptProcessingException())
    finish_owner = (pack("nodes.token_pruning.pruning").PruningRun if feature == "pruning"
                    else pack("nodes.step_cache.run_context").RunContext)

    def broken_finish(self):
        raise Injected("injected failure in the cleanup")
    monkeypatch.setattr(finish_owner, "finish", broken_finish)
    with caplog.at_level("ERROR", logger="speculative_cache"):
        with pytest.raises(mm.InterruptProcessingException):
            run(spec_nodes, models)
    assert any("could not finish the run" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert live_tensor_count() <= before + 2         # (the traceback's frames let go of the rest)


# ---- a call made again gets its inputs intact ------------------------------------------------

def _sample_with_controlnet(patcher, name, controlnet, hint, **sample_kw):
    """6 steps of the tiny ``name`` with ``controlnet`` (None: none) on both conditionings."""
    positive, negative = tm.conditioning(name)
    if controlnet is not None:
        c = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        positive, negative = ([[t, dict(d, control=c, control_apply_to_uncond=True)] for t, d in cond]
                              for cond in (positive, negative))
    return tm.sample(patcher, name, steps=6, positive=positive, negative=negative, **sample_kw)


def _tiny_unet_controlnet(seed=9):
    """ComfyUI's U-Net ControlNet class (cldm) with the tiny SD1.5's layout, random weights
    large enough to move the picture."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    cfg = tm.complete_unet_config(tm.CONFIGS["sd15"]["unet"])
    keep = ("image_size", "in_channels", "model_channels", "num_res_blocks", "channel_mult",
            "transformer_depth", "context_dim", "use_linear_in_transformer", "num_head_channels",
            "use_spatial_transformer", "legacy", "transformer_depth_middle", "adm_in_channels")
    kwargs = {k: cfg[k] for k in keep if k in cfg}
    model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                       device="cpu", dtype=torch.float32, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), manual_cast_dtype=None)


def test_a_call_made_again_after_our_error_gets_the_controlnet_residuals_intact(
        spec_nodes, sd15, feature_stats, monkeypatch):
    """Token Pruning fails inside the U-Net's forward, after the U-Net has popped some of the
    ControlNet's residuals: the call made again without it applies every residual where it
    belongs, so the picture is the uncached one with the ControlNet."""
    controlnet = _tiny_unet_controlnet()
    hint = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))

    def sample(patcher, control=True):
        return _sample_with_controlnet(patcher, "sd15", controlnet if control else None, hint, cfg=5.0)

    reference = sample(sd15)
    assert not torch.equal(reference, sample(sd15, control=False))          # the ControlNet acts
    pruned = spec_nodes.SpeculativeCacheTokenPruning.execute(sd15, ratio=0.5, refresh_interval=3).result[0]
    # the first attention patch call of the run fails: deep inside the first forward, after the
    # input blocks consumed their residuals
    calls = fail_on_call(monkeypatch, pack("nodes.token_pruning.pruning"), "_prune_queries", on_call=3)
    out = sample(pruned)
    assert calls["n"] >= 3 and "injected failure" in feature_stats["pruning"][-1]["disabled"]
    assert torch.equal(out, reference)


# ---- warnings per run --------------------------------------------------------------------------

def test_a_fallback_warning_is_given_in_every_run_not_once_per_process(spec_nodes, flux, caplog):
    m = cached(spec_nodes, tm.build("wan21", seed=3), threshold=5.0, granularity="block")
    forget_warnings()
    with caplog.at_level("WARNING", logger="speculative_cache"):
        for _ in range(2):
            tm.sample(m, "wan21", steps=4)
    said = [r for r in caplog.records if "block granularity is not available" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in caplog.records]


def test_a_memory_plan_that_cannot_run_is_a_warning_with_the_reason(spec_nodes, flux, feature_stats,
                                                                     monkeypatch, caplog):
    memory = pack("nodes.step_cache.memory")
    fail_on_call(monkeypatch, memory, "fit_to_budget")
    forget_warnings()
    with caplog.at_level("WARNING", logger="speculative_cache"):
        tm.sample(simple(spec_nodes, flux, options=options(spec_nodes, threshold=5.0)), "flux", steps=STEPS)
    said = [r.getMessage() for r in caplog.records if "could not plan this run's cache memory" in r.getMessage()]
    assert len(said) == 1 and "injected failure" in said[0] and "not applied" in said[0]
    assert feature_stats["cache"][-1]["forecast"] > 0          # the run itself goes on cached


def _tiny_flux_controlnet(seed=11):
    """ComfyUI's FLUX ControlNet class (XLabs layout: a pixel hint) at the tiny FLUX's size,
    random weights large enough to move the picture."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    cfg = tm.complete_unet_config(tm.CONFIGS["flux"]["unet"])
    model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device="cpu",
                                                     dtype=torch.float32, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


def test_a_call_made_again_after_our_error_gets_the_flux_controlnet_residuals_intact(
        spec_nodes, flux, feature_stats, monkeypatch):
    """The step cache fails in its second block patch of the first model call, after the first
    block added its ControlNet residual: the call made again without it gets the ControlNet's
    residuals as they were, so the picture is the uncached one with the ControlNet."""
    controlnet = _tiny_flux_controlnet()
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))

    def sample(patcher, control=True):
        return _sample_with_controlnet(patcher, "flux", controlnet if control else None, hint)

    reference = sample(flux)
    assert not torch.equal(reference, sample(flux, control=False))          # the ControlNet acts
    probing = simple(spec_nodes, flux, mode="probe", options=options(spec_nodes, threshold=5.0))
    calls = fail_on_call(monkeypatch, pack("nodes.step_cache.block_call").BlockCall, "block", on_call=2)
    out = sample(probing)
    assert calls["n"] >= 2 and "injected failure" in feature_stats["cache"][-1]["internal_error"]
    assert torch.equal(out, reference)
