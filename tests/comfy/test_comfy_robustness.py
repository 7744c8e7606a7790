"""How people really run the node (issue: never breaks a real workflow): every sampler
ComfyUI lists, LoRA before the node, fp8 weights; through ComfyUI's real sampler on
ComfyUI's own FLUX class at a tiny size."""

from __future__ import annotations

import pytest
import torch

from devkit import tiny_models as tm
from conftest import forget_warnings, options, simple, with_context_windows

pytestmark = pytest.mark.comfy


def _samplers():
    try:
        from devkit import comfy_env
        comfy_env.setup_comfyui()
        import comfy.samplers
        return list(comfy.samplers.KSampler.SAMPLERS)
    except Exception:          # no ComfyUI: the module's tests skip (or fail under CI) in spec_nodes
        return ["euler"]


SAMPLERS = _samplers()
# These choose their own steps instead of the schedule's (DPM-Solver fast / adaptive).
OWN_STEPS = {"dpm_fast", "dpm_adaptive"}


@pytest.fixture(scope="module")
def flux(spec_nodes):
    return tm.build("flux", seed=3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_comfyui_lists_runs_and_is_identical_when_off(spec_nodes, flux, stats_log, sampler):
    """Each entry of KSampler's sampler_name: at speed 0 bit-identical to the model without the
    node; at a speed that forecasts, finite, every step accounted for, and near the uncached
    result."""
    steps = 6
    ref = tm.sample(flux, "flux", steps=steps, sampler=sampler)
    off = tm.sample(simple(spec_nodes, flux, speed=0.0), "flux", steps=steps, sampler=sampler)
    assert torch.equal(off, ref)
    assert stats_log[-1]["forecast"] == 0
    on = tm.sample(simple(spec_nodes, flux, speed=1.0), "flux", steps=steps, sampler=sampler)
    s = stats_log[-1]
    assert torch.isfinite(on).all()
    assert s["internal_error"] == ""
    if sampler in OWN_STEPS:
        assert s["evaluations"] > 0 and s["timeline"].rstrip(".") and "." not in s["timeline"].rstrip(".")
    else:
        assert s["computed"] + s["forecast"] == s["steps"] == steps, (s["timeline"], s["evaluations"])
    assert ((on - ref).norm() / ref.norm()).item() < 0.5


@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_weights_cast_on_the_fly(spec_nodes, stats_log, weight_dtype):
    """UNETLoader's weight_dtype fp8: weights stored in fp8, computed in float32 (ComfyUI's
    manual cast). Off is bit-identical, on forecasts and stays close; the cache keeps the
    compute dtype, not fp8."""
    m = tm.build("flux", seed=3, weight_dtype=getattr(torch, weight_dtype))
    assert m.model.diffusion_model.img_in.weight.dtype == getattr(torch, weight_dtype)
    ref = tm.sample(m, "flux", steps=10)
    assert torch.equal(tm.sample(simple(spec_nodes, m, speed=0.0), "flux", steps=10), ref)
    on = tm.sample(simple(spec_nodes, m, speed=1.0), "flux", steps=10)
    s = stats_log[-1]
    assert s["forecast"] > 0 and s["internal_error"] == "" and s["cache_bytes"] > 0
    assert torch.isfinite(on).all() and ((on - ref).norm() / ref.norm()).item() < 0.1


def _lora(model, rank=4, seed=11):
    """A LoRA for every linear weight of the tiny FLUX, in the kohya key format ComfyUI reads."""
    import comfy.lora
    g = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    lora = {}
    for key, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if not key.startswith("lora_unet_") or weights[target].dim() != 2:
            continue
        out_f, in_f = weights[target].shape
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.05
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.05
        lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_before_the_node(spec_nodes, flux, stats_log):
    """LoraLoaderModelOnly before the node: the LoRA changes the picture, the node at speed 0
    gives the LoRA'd picture bit for bit, and forecasting stays near it. The base model is
    left as it was."""
    import comfy.sd
    base = tm.sample(flux, "flux", steps=10)
    lora = _lora(flux)
    assert len(lora) > 30
    patched, _ = comfy.sd.load_lora_for_models(flux, None, lora, 1.0, 0)
    with_lora = tm.sample(patched, "flux", steps=10)
    assert ((with_lora - base).norm() / base.norm()).item() > 0.01        # the LoRA is applied
    assert torch.equal(tm.sample(simple(spec_nodes, patched, speed=0.0), "flux", steps=10), with_lora)
    on = tm.sample(simple(spec_nodes, patched, speed=1.0), "flux", steps=10)
    assert stats_log[-1]["forecast"] > 0
    assert ((on - with_lora).norm() / with_lora.norm()).item() < 0.1
    assert torch.equal(tm.sample(flux, "flux", steps=10), base)          # nothing left on the base model


def _hooked_conditioning(lora, keyframes):
    """Conditioning whose positive carries a LoRA hook (Create Hook LoRA + Set Hook
    Keyframes + Cond Set Props); keyframes: (start_percent, strength) pairs or None."""
    import comfy.hooks
    positive, negative = tm.conditioning("flux")
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=0.0)
    if keyframes:
        group = comfy.hooks.HookKeyframeGroup()
        for percent, strength in keyframes:
            group.add(comfy.hooks.HookKeyframe(strength=strength, start_percent=percent))
        hooks.set_keyframes_on_hooks(group)
    return comfy.hooks.set_conds_props([positive], 1.0, "default", hooks=hooks)[0], negative


def test_lora_hook_keyframes_start_the_history_over(spec_nodes, flux, stats_log):
    """A LoRA hook on the positive whose strength drops from 1 to 0 at 45 % (hook keyframes):
    the weights change mid-run, so the cond stream's history is dropped there and the step
    where the keyframe takes effect is computed, not forecast from the old weights."""
    import comfy.samplers
    steps, keyframes = 12, [(0.0, 1.0), (0.45, 0.0)]   # 0.45: between two steps
    lora = _lora(flux)
    base = tm.sample(flux, "flux", steps=steps)
    positive, negative = _hooked_conditioning(lora, keyframes)
    reference = tm.sample(flux, "flux", steps=steps, positive=positive, negative=negative)
    positive, negative = _hooked_conditioning(lora, None)
    constant = tm.sample(flux, "flux", steps=steps, positive=positive, negative=negative)
    assert ((reference - constant).norm() / constant.norm()).item() > 0.01     # the keyframe acts

    def run(speed):
        positive, negative = _hooked_conditioning(lora, keyframes)
        return tm.sample(simple(spec_nodes, flux, speed=speed), "flux", steps=steps,
                         positive=positive, negative=negative)

    assert torch.equal(run(0.0), reference)
    on = run(1.0)
    stats = stats_log[-1]
    model_sampling = flux.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", steps)
    switch = next(i for i, s in enumerate(sigmas) if float(s) <= float(model_sampling.percent_to_sigma(0.45)))
    assert 0 < switch < steps - 1
    assert stats["weight_changes"] == 1                       # the cond stream, once
    assert stats["timeline"][switch] == "C", stats["timeline"]
    assert stats["forecast"] > 0
    assert ((on - reference).norm() / reference.norm()).item() < 0.01
    assert torch.equal(run(1.0), on)                          # the next run starts from the keyframes' start
    assert torch.equal(tm.sample(flux, "flux", steps=steps), base)     # no hook weights left behind


@pytest.mark.parametrize("order", ["compile_then_cache", "cache_then_compile"])
def test_torch_compile_before_or_after_the_node(spec_nodes, flux, stats_log, order):
    """ComfyUI's TorchCompileModel path (its set_torch_compile_wrapper), before or after the
    node. The backend is Dynamo's "eager": Dynamo traces the model and our hooks exactly as
    with inductor (that tracing is what breaks other caches), without inductor's minutes of
    C++ code generation on the CPU runners. Off: the uncompiled, uncached result; on: the
    cache still forecasts, with no internal error."""
    from comfy_api.torch_helpers import torch_compile   # in every supported version (0.3.64 on)
    import torch._dynamo

    def compiled(m):
        m = m.clone()
        torch_compile.set_torch_compile_wrapper(model=m, backend="eager")
        return m

    def chain(speed):
        if order == "compile_then_cache":
            return simple(spec_nodes, compiled(flux), speed=speed)
        return compiled(simple(spec_nodes, flux, speed=speed))

    torch._dynamo.reset()
    ref = tm.sample(flux, "flux", steps=8)
    off = tm.sample(chain(0.0), "flux", steps=8)
    assert torch.allclose(off, ref, atol=1e-5, rtol=1e-5)
    on = tm.sample(chain(1.0), "flux", steps=8)
    s = stats_log[-1]
    assert s["forecast"] > 0 and s["internal_error"] == ""
    assert torch.isfinite(on).all() and ((on - ref).norm() / ref.norm()).item() < 0.1
    torch._dynamo.reset()


def run_node(cls, **inputs):
    """A ComfyUI node's outputs, for V1 (FUNCTION) and V3 (execute) nodes alike."""
    if hasattr(cls, "define_schema"):
        return cls.execute(**inputs).result
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.mark.parametrize("schedule", ["custom_sigmas", "denoise_0.6"])
def test_sampler_custom_advanced_with_custom_sigmas_and_partial_denoise(spec_nodes, flux, stats_log, schedule):
    """SamplerCustomAdvanced with a hand-written non-uniform sigma list, and BasicScheduler at
    denoise 0.6 on a non-empty latent (img2img): off is bit-identical, on forecasts within
    the steps it runs."""
    import comfy_extras.nodes_custom_sampler as cs
    pos, neg = tm.conditioning("flux")
    start = torch.randn(tuple(tm.CONFIGS["flux"]["latent"]), generator=torch.Generator().manual_seed(5)) * 0.5
    if schedule == "custom_sigmas":
        sigmas = torch.tensor([1.0, 0.97, 0.9, 0.8, 0.68, 0.55, 0.42, 0.3, 0.18, 0.08, 0.0])
        latent = {"samples": torch.zeros_like(start)}
    else:
        (sigmas,) = run_node(cs.BasicScheduler, model=flux, scheduler="simple", steps=10, denoise=0.6)
        latent = {"samples": start}
    steps = len(sigmas) - 1

    def sample(model):
        (guider,) = run_node(cs.CFGGuider, model=model, positive=pos, negative=neg, cfg=2.0)
        (sampler,) = run_node(cs.KSamplerSelect, sampler_name="euler")
        (noise,) = run_node(cs.RandomNoise, noise_seed=9)
        out, _ = run_node(cs.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                          latent_image=latent)
        return out["samples"]

    ref = sample(flux)
    assert torch.equal(sample(simple(spec_nodes, flux, speed=0.0)), ref)
    assert stats_log[-1]["steps"] == steps and stats_log[-1]["forecast"] == 0
    on = sample(simple(spec_nodes, flux, speed=1.0))
    s = stats_log[-1]
    assert s["steps"] == steps and s["forecast"] > 0 and s["computed"] + s["forecast"] == steps
    assert ((on - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("settings", [dict(mode="probe"), dict(granularity="block"),
                                      dict(mode="probe", order=1, storage_dtype="bfloat16"),
                                      dict(mode="probe", cfg=1.0), dict(mode="probe", batch=2, scale=2),
                                      dict(mode="speed_target", granularity="block"), dict(mode="speed_target"),
                                      dict(), dict(batch=2, scale=2)],
                         ids=["stack", "block", "order1-bf16", "cfg1", "batch2-x2", "probing-target-serves-output",
                              "target-looks-back", "auto-looks-back", "auto-batch2-x2"])
def test_the_cache_estimate_is_within_20_percent_of_what_the_run_held(spec_nodes, flux, stats_log, settings):
    settings = dict(settings)
    sample_args = {k: settings.pop(k) for k in ("cfg", "batch", "scale") if k in settings}
    mode = settings.pop("mode", "auto")
    opts = spec_nodes.SpeculativeCacheOptions.execute(threshold=5.0, **settings).result[0]
    tm.sample(simple(spec_nodes, flux, mode=mode, options=opts), "flux", steps=10, **sample_args)
    s = stats_log[-1]
    # a probing speed target serves the output forecast; lookback forecasts only the output
    assert s["serve_output"] == (mode == "speed_target" and s["acceptance"] == "probe")
    assert s["acceptance"] == ("lookback" if mode in ("auto", "speed_target") and not settings else "probe")
    assert s["cache_bytes"] > 0 and s["forecast"] > 0
    assert s["cache_estimate_bytes"] == pytest.approx(s["cache_bytes"], rel=0.2)


def test_a_memory_budget_steps_the_settings_down_and_says_which(spec_nodes, flux, stats_log, caplog):
    """Block granularity at 4x the tiny model's resolution needs more than a 2 MiB budget: the
    run stores bfloat16, then uses stack granularity, holds less than the budget, still
    forecasts, and the console says so."""
    forget_warnings()
    unbounded = spec_nodes.SpeculativeCacheOptions.execute(threshold=5.0, granularity="block",
                                                           memory_budget_mb=1 << 20).result[0]
    tm.sample(simple(spec_nodes, flux, options=unbounded), "flux", steps=10, scale=4)
    big = stats_log[-1]["cache_bytes"]
    assert big > 2 * 2**20
    opts = spec_nodes.SpeculativeCacheOptions.execute(threshold=5.0, granularity="block", memory_budget_mb=2).result[0]
    with caplog.at_level("WARNING", logger="speculative_cache"):
        tm.sample(simple(spec_nodes, flux, options=opts), "flux", steps=10, scale=4)
    s = stats_log[-1]
    assert s["cache_bytes"] <= 2 * 2**20 and s["forecast"] > 0 and s["mode"] == "stack"
    warning = next(r.message for r in caplog.records if "memory budget" in r.message)
    assert "bfloat16" in warning and "stack granularity" in warning


@pytest.mark.parametrize("layers", [dict(double_layers="1", single_layers=""), dict(double_layers="", single_layers="0")])
def test_skip_layer_guidance_chained_before_the_node(spec_nodes, flux, stats_log, layers):
    """ComfyUI's SkipLayerGuidanceDiT: during its window it runs the model a second time per
    step with some blocks skipped (its own block patches). That extra call must run the
    skipped model for real (not a forecast of the full one) and not count as a step: off is
    bit-identical, on stays close to SLG without the cache."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT
    slg = SkipLayerGuidanceDiT.execute(flux, scale=3.0, start_percent=0.0, end_percent=0.6, **layers).result[0]
    ref = tm.sample(slg, "flux", steps=10)
    assert ((ref - tm.sample(flux, "flux", steps=10)).norm() / ref.norm()).item() > 1e-4   # SLG acts
    assert torch.equal(tm.sample(simple(spec_nodes, slg, speed=0.0), "flux", steps=10), ref)
    s = stats_log[-1]
    assert s["evaluations"] == 10 and s["internal_error"] == ""
    on = tm.sample(simple(spec_nodes, slg, speed=1.0), "flux", steps=10)
    s = stats_log[-1]
    assert s["forecast"] > 0 and s["internal_error"] == "" and s["evaluations"] == 10
    assert ((on - ref).norm() / ref.norm()).item() < 0.1


def test_a_pack_that_chains_after_the_node_keeps_it_caching(spec_nodes, flux, stats_log):
    """Another pack installs block patches after this node that chain to ours (the polite
    way): those are the run's own patches, not a foreign call, so the cache still forecasts
    and every call reaches both patches."""
    patched = simple(spec_nodes, flux, speed=1.0).clone()
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    calls = []
    for key, previous in list(dit.items()):
        def chained(args, extra, previous=previous):
            calls.append(1)
            return previous(args, extra)
        patched.set_model_patch_replace(chained, "dit", key[0], key[1])
    ref = tm.sample(flux, "flux", steps=10)
    out = tm.sample(patched, "flux", steps=10)
    s = stats_log[-1]
    assert s["forecast"] > 0 and s["evaluations"] == 10 and calls
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def _reference_controlnet(seed=5, scale=0.02):
    """ComfyUI's FLUX ControlNet class (XLabs layout: a pixel-space hint) sized to the
    reference model, weights N(0, scale): its residuals change the picture strongly."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    from devkit import reference_model as rm
    unet = {k: v for k, v in tm.complete_unet_config(rm.MODELS["reference"]["unet"]).items() if k != "image_model"}
    model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device="cpu",
                                                     dtype=torch.float32, **unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


@pytest.mark.parametrize("mode", ["probe", "auto"])
def test_controlnet_keeps_block_level_forecasting(spec_nodes, stats_log, mode):
    """A ControlNet adds its residuals between the blocks, outside the block patches. The
    probe stays at block level: each stage's residual is measured block by block without
    them, and the forward adds this step's real residuals on forecast steps. Without that,
    they counted twice and every verification failed (measured: no forecast accepted).
    auto forecasts the whole output, the ControlNet's effect included, and measures it."""
    import comfy.sample
    from devkit import reference_model as rm
    model = rm.load_reference()
    controlnet = _reference_controlnet()
    hint = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))

    def sample(patcher, control=True, steps=28, seed=1):
        latent = torch.zeros(1, 16, 32, 32)
        positive, negative = rm.conditioning(0), rm.conditioning(rm.NULL_CLASS)
        if control:   # what ControlNetApplyAdvanced does
            c = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
            positive, negative = ([[t, dict(d, control=c, control_apply_to_uncond=False)] for t, d in cond]
                                  for cond in (positive, negative))
        return comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, seed), steps, 2.0, "euler", "simple",
                                   positive, negative, latent, disable_pbar=True, seed=seed)

    reference = sample(model)
    assert rm.psnr(rm.decode(reference), rm.decode(sample(model, control=False))) < 30    # the ControlNet acts
    assert torch.equal(sample(simple(spec_nodes, model, mode=mode, speed=0.0)), reference)
    out = sample(simple(spec_nodes, model, mode=mode, speed=0.5))
    s = stats_log[-1]
    assert s["mode"] == ("stack" if mode == "probe" else "output") and not s["internal_error"], s
    assert s["forecast"] >= 4 and s["compute_fraction"] < 0.8, s["timeline"]
    assert rm.psnr(rm.decode(out), rm.decode(reference)) > 40


def test_context_windows_keep_a_history_per_window(spec_nodes, stats_log):
    """ComfyUI's context windows (long videos) call the model once per window of frames at each
    step, each on its own slice of x. All the windows of a step are one evaluation, and each
    window is forecast from its own past: with 4 windows (a tiny Wan, 9 frames, windows of 4
    overlapping by 2) the cached picture stays as close to the uncached one as without windows,
    for auto and for a planned 6x target (which, with windows, takes no cond-only step: one
    difference cannot stand for every window). Before, the windows shared one history and
    the 6x target's output was 51 times the uncached one's size."""
    import comfy.sample
    m = tm.build("wan21", seed=3)
    latent = torch.zeros(1, 16, 9, 8, 8)

    def sample(patcher, steps):
        noise = comfy.sample.prepare_noise(latent, 42)
        positive, negative = tm.conditioning("wan21")
        return comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=42)

    def error(out, ref):
        return ((out - ref).norm() / ref.norm()).item()

    target = options(spec_nodes, target_speedup=6.0)
    for inputs, steps in ((dict(), 12), (dict(mode="speed_target", options=target), 28)):
        patched = simple(spec_nodes, m, **inputs)
        plain = error(sample(patched, steps), sample(m, steps))
        alone = stats_log[-1]
        windowed = error(sample(with_context_windows(patched), steps), sample(with_context_windows(m), steps))
        s = stats_log[-1]
        assert s["evaluations"] == steps and s["forecast"] > 0 and not s["internal_error"], s
        assert windowed < 0.05 and windowed < 2 * plain + 1e-3, (inputs, windowed, plain)
    assert alone["cond_only_steps"] and not s["cond_only_steps"]
    assert s["timeline"] == alone["timeline"] and s["planned_steps"] == alone["planned_steps"]
