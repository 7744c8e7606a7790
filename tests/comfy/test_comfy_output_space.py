"""What accepted forecast steps serve: the forecast of the model output (``serve_output``),
in noise space for flow models (``output_space="noise"``), and the samplers that turn it
off; through ComfyUI's real sampler on ComfyUI's own model classes."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import forget_warnings, simple

pytestmark = pytest.mark.comfy


def with_engine(patched, **fields):
    """``patched`` with these CacheConfig fields replaced (engine settings)."""
    to = patched.model_options["transformer_options"]
    settings = to["speculative_cache"]
    out = patched.clone()
    out.model_options["transformer_options"] = dict(to, speculative_cache=dataclasses.replace(
        settings, config=dataclasses.replace(settings.config, **fields)))
    return out


def with_probe(patched):
    """``patched`` with the per-step probe instead of lookback (the twin config the node keeps
    for runs that share the model with an Edit Region node)."""
    settings = patched.model_options["transformer_options"]["speculative_cache"]
    assert settings.config_with_edit_region is not None
    return with_engine(patched, **{f.name: getattr(settings.config_with_edit_region, f.name)
                                   for f in dataclasses.fields(settings.config_with_edit_region)})


def test_noise_space_serves_another_close_forecast_on_the_reference_model(spec_nodes, stats_log):
    """Speed target 3x on the 6-block reference model, the output forecast served: in noise
    space the forecasts give other pictures, as close to the uncached ones (how much closer
    on average is the benchmark's business: README)."""
    from devkit import reference_model as rm
    ref_model = rm.load_reference()
    labels, seeds = [0, 1], [1000, 1001]
    uncached = rm.sample(ref_model, labels, seeds, steps=28)
    target = with_probe(simple(spec_nodes, ref_model, mode="speed_target", speed=0.5))
    assert target.model_options["transformer_options"]["speculative_cache"].config.serve_output
    results = {}
    for space in ("model", "noise"):
        images = rm.sample(with_engine(target, output_space=space), labels, seeds, steps=28)
        runs = stats_log[-2:]
        assert all(r["forecast"] > 10 and not r["internal_error"] for r in runs)
        results[space] = (images, [r["timeline"] for r in runs])
    assert not torch.equal(results["model"][0], results["noise"][0])
    model_psnr, noise_psnr = (rm.psnr(results[s][0], uncached) for s in ("model", "noise"))
    assert noise_psnr > 30 and noise_psnr > model_psnr - 1.0


def test_noise_space_at_the_output_level(spec_nodes, stats_log):
    """A flow model the cache reaches only at the output level (Lumina 2): its forecasts in
    noise space give another, finite picture; with every step computed, the same one as
    without the cache (recording in noise space changes no output)."""
    m = tm.build("lumina2", seed=3)
    uncached = tm.sample(m, "lumina2", steps=16)
    patched = with_probe(simple(spec_nodes, m, speed=1.0))      # fixed-interval forecasts
    model_space = tm.sample(patched, "lumina2", steps=16)
    noise = tm.sample(with_engine(patched, output_space="noise"), "lumina2", steps=16)
    assert stats_log[-1]["mode"] == "output" and stats_log[-1]["forecast"] > 3
    # the same schedule, but for steps at sigma above 0.99 (Lumina 2 shifts its schedule far
    # up): computed, as the way back from noise would divide by less than 0.01
    assert stats_log[-2]["forecast"] - 2 <= stats_log[-1]["forecast"] <= stats_log[-2]["forecast"]
    assert torch.isfinite(noise).all() and not torch.equal(noise, model_space)
    # bounded: on this random-weight model the velocity barely moves, so model space is closer
    assert (noise - uncached).abs().mean() < 0.01 * uncached.abs().mean()
    computed = tm.sample(with_engine(patched, output_space="noise", warmup_steps=100), "lumina2", steps=16)
    assert stats_log[-1]["forecast"] == 0 and torch.equal(computed, uncached)


@pytest.mark.parametrize("name, speed_mode", [("sd15", "auto"), ("wan21_i2v", "speed_target")])
def test_noise_space_leaves_other_models_as_they_are(spec_nodes, stats_log, name, speed_mode):
    """Where noise space does not apply the run is the model-space run, bit for bit: SD 1.5
    predicts noise already (not a flow model), and Wan image-to-video's input has 36 channels
    (image conditioning concatenated) for 16 out, so x does not give the noise."""
    m = tm.build(name, seed=3)
    patched = with_probe(simple(spec_nodes, m, mode=speed_mode, speed=1.0))
    images, forecasts = {}, []
    for space in ("model", "noise"):
        images[space] = tm.sample(with_engine(patched, output_space=space), name, steps=12)
        assert not stats_log[-1]["internal_error"]
        forecasts.append(stats_log[-1]["forecast"])
    assert forecasts[0] > 0 and forecasts[0] == forecasts[1]
    assert stats_log[-1]["mode"] == ("output" if name == "sd15" else "stack")
    assert torch.equal(images["model"], images["noise"])


ADD_NOISE = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
             "dpmpp_3m_sde", "ddpm", "lcm", "res_multistep_ancestral", "er_sde", "sa_solver_pece"]
DETERMINISTIC = ["euler", "euler_cfg_pp", "heun", "dpm_2", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2m", "ipndm", "deis",
                 "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "ddim", "uni_pc", "uni_pc_bh2"]


def test_samplers_that_add_noise_are_told_apart(spec_nodes):
    import comfy.samplers
    output_space = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.output_space")
    known = set(comfy.samplers.SAMPLER_NAMES)
    noisy = {n for n in known if output_space.adds_noise(comfy.samplers.sampler_object(n))}
    assert {n for n in ADD_NOISE if n in known} <= noisy
    assert not noisy & set(DETERMINISTIC)
    # an ancestral sampler at eta 0 (SamplerEulerAncestral's input) adds none
    assert not output_space.adds_noise(comfy.samplers.ksampler("euler_ancestral", {"eta": 0.0}))
    assert not output_space.adds_noise(comfy.samplers.ksampler("dpmpp_2m_sde", {"s_noise": 0}))


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "euler_ancestral"])
def test_a_sampler_that_adds_noise_serves_the_stage_forecasts(spec_nodes, stats_log, caplog, sampler):
    """A probing speed target serves the output forecast, which cannot follow fresh noise in x: with
    such a sampler the run serves the stages' forecasts (and says so), and stays as close to
    the uncached picture as with the output forecast turned off by hand. The console warns
    that a target costs fidelity with such a sampler."""
    forget_warnings()
    m = tm.build("flux", seed=3)
    ref = tm.sample(m, "flux", steps=8, sampler=sampler)
    target = with_probe(simple(spec_nodes, m, mode="speed_target", speed=1.0))
    errors = []
    with caplog.at_level("WARNING", logger="speculative_cache"):
        tm.sample(target, "flux", steps=8, sampler=sampler)
    assert "adds fresh noise at every step" in caplog.text and "computes (the same picture" in caplog.text
    for patched in (target, with_engine(target, output_space="noise"), with_engine(target, serve_output=False)):
        out = tm.sample(patched, "flux", steps=8, sampler=sampler)
        s = stats_log[-1]
        assert s["forecast"] > 0 and not s["internal_error"]
        assert (s["serve_output"], s["output_space"]) == (False, "model")
        errors.append(((out - ref).norm() / ref.norm()).item())
    assert errors[0] == errors[1] == errors[2] < 0.05
    tm.sample(target, "flux", steps=8, sampler="euler")
    assert stats_log[-1]["serve_output"] is True
    # the node's own target looks back, in model space with such a sampler, and meets its budget
    tm.sample(simple(spec_nodes, m, mode="speed_target", speed=1.0), "flux", steps=8, sampler=sampler)
    s = stats_log[-1]
    assert (s["acceptance"], s["output_space"], s["forecast"] > 0) == ("lookback", "model", True)
