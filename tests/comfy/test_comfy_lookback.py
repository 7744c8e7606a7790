"""Lookback acceptance (mode auto): the whole model output is forecast, nothing runs on a forecast step, and each
computed step measures how far the forecast of its own output was; through ComfyUI's real
sampler on the reference model and on ComfyUI's own model classes at tiny sizes."""

from __future__ import annotations

import logging

import pytest
import torch

from devkit import tiny_models as tm
from conftest import config_of, forget_warnings, live_tensor_count, options, simple

pytestmark = pytest.mark.comfy


def test_lookback_on_the_reference_model(spec_nodes, stats_log):
    """Off at speed 0; at the default speed most steps are forecast, none is probed, every
    computed step after the first measures the forecast, the picture stays close, nothing stays
    in memory; a tolerance no forecast meets computes every step (the same pictures)."""
    from devkit import reference_model as rm
    model = rm.load_reference()
    labels, seeds = [0, 1], [1000, 1001]
    uncached = rm.sample(model, labels, seeds, steps=28)
    assert torch.equal(rm.sample(simple(spec_nodes, model, speed=0.0), labels, seeds, steps=28),
                       uncached)
    assert stats_log[-1]["forecast"] == 0
    patched = simple(spec_nodes, model)
    rm.sample(patched, labels[:1], seeds[:1], steps=28)          # lazy allocations happen once
    before = live_tensor_count()
    images = rm.sample(patched, labels, seeds, steps=28)
    for s in stats_log[-2:]:
        assert s["acceptance"] == "lookback" and s["mode"] == "output" and s["output_space"] == "noise"
        assert s["verified"] == 0 and s["forecast"] >= 10 and s["compute_fraction"] < 0.6
        # every computed step from the second on measured its forecast (the first has no history)
        assert s["looked_back"] == s["computed"] - 1 and len(s["errors"]) == s["looked_back"]
        assert not s["internal_error"]
    assert rm.psnr(images, uncached) > 38
    del images
    # nothing of the run stays alive (a CI run once counted 19 tensors fewer after it than before:
    # something else let older tensors go; only growth is a leak)
    assert live_tensor_count() <= before
    strict = simple(spec_nodes, model, options=options(spec_nodes, threshold=1e-9))
    assert torch.equal(rm.sample(strict, labels, seeds, steps=28), uncached)
    s = stats_log[-1]
    assert s["forecast"] == 0 and s["looked_back"] == 27 and s["compute_fraction"] == 1.0


@pytest.mark.parametrize("name", ["flux", "wan21", "ltxv", "sd3", "lumina2"])
def test_lookback_on_tiny_families(spec_nodes, stats_log, name):
    """Block-level families, SD3 (APPLY_MODEL level on ComfyUI 0.3.64) and an output-level one
    (Lumina 2): forecasts are taken, measured, and the result stays within 2 % of uncached."""
    if not tm.available(name):
        pytest.skip(f"{name} is not in this ComfyUI")
    m = tm.build(name, seed=3)
    ref = tm.sample(m, name, steps=12)
    out = tm.sample(simple(spec_nodes, m), name, steps=12)
    s = stats_log[-1]
    assert s["acceptance"] == "lookback" and s["forecast"] > 0 and s["looked_back"] > 0 and s["verified"] == 0
    assert not s["internal_error"] and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.02


def test_lookback_with_a_sampler_that_adds_noise_computes_and_says_so(spec_nodes, stats_log, caplog):
    """Fresh noise at every step moves the model output in a way no forecast follows: lookback
    measures errors near 100 %, forecasts nothing (the same picture) and the console says why."""
    forget_warnings()
    m = tm.build("flux", seed=3)
    ref = tm.sample(m, "flux", steps=12, sampler="euler_ancestral")
    with caplog.at_level(logging.WARNING, logger="speculative_cache"):
        out = tm.sample(simple(spec_nodes, m), "flux", steps=12, sampler="euler_ancestral")
    s = stats_log[-1]
    assert s["output_space"] == "model" and s["looked_back"] == 11 and s["forecast"] == 0
    # (ComfyUI 0.3.64 adds no noise on the first step: the error at step 1 is small there)
    assert min(e[2] for e in s["errors"][1:]) > 0.4 and torch.equal(out, ref)
    assert any("lookback measures" in r.message for r in caplog.records)


def test_lookback_with_heun_two_evaluations_per_step(spec_nodes, stats_log):
    m = tm.build("flux", seed=3)
    ref = tm.sample(m, "flux", steps=12, sampler="heun")
    out = tm.sample(simple(spec_nodes, m), "flux", steps=12, sampler="heun")
    s = stats_log[-1]
    assert s["output_space"] == "noise" and s["forecast"] > 0 and s["looked_back"] > 0
    assert s["evaluations"] > s["steps"] and not s["internal_error"]
    assert ((out - ref).norm() / ref.norm()).item() < 0.02


def test_lookback_settings_and_what_the_options_node_changes(spec_nodes):
    m = tm.build("flux", seed=3)
    c = config_of(simple(spec_nodes, m))
    assert (c.acceptance, c.output_space, c.order, c.step_weighting, c.method) == ("lookback", "noise", 1, True, "speca")
    # the tolerance counts this run's one-step forecast errors (4 of them at speed 0.5)
    assert c.threshold == pytest.approx(4.0) and c.tolerance_unit == "run" and c.looks_back
    assert c.trajectory_correction == 2 and c.run_unit_cap == pytest.approx(0.05)
    assert config_of(simple(spec_nodes, m, speed=1.0)).threshold == pytest.approx(40.0)
    assert config_of(simple(spec_nodes, m, options=options(spec_nodes, trajectory_correction="off"))
                     ).trajectory_correction == 0
    target = config_of(simple(spec_nodes, m, mode="speed_target"))
    assert target.looks_back and target.trajectory_correction == 2
    assert config_of(simple(spec_nodes, m, options=options(spec_nodes, order=3))).order == 3
    # what only the probe does: another method, block granularity, a probe metric
    for asked in (dict(method="taylorseer"), dict(granularity="block"), dict(metric="relative_change")):
        c = config_of(simple(spec_nodes, m, options=options(spec_nodes, **asked)))
        assert c.acceptance == "probe" and not c.looks_back and c.trajectory_correction == 0, asked
    assert config_of(simple(spec_nodes, m, mode="probe")).acceptance == "probe"


def test_trajectory_correction_with_euler_and_off_for_other_samplers(spec_nodes, stats_log):
    """The reference model with euler: the computed steps after forecasts carry the correction
    and the picture is closer to the uncached one than the same schedule's without it (the
    Options switch). dpmpp_2m takes no Euler steps: the correction turns off before its first
    use, with the reason in the stats, and the tolerance falls back to 4/6.3 of itself: it forecasts
    no more than the switch turned off, which keeps the whole tolerance."""
    from devkit import reference_model as rm
    model = rm.load_reference()
    labels, seeds = [0, 1], [1000, 1001]
    uncached = rm.sample(model, labels, seeds, steps=28)
    corrected = rm.sample(simple(spec_nodes, model), labels, seeds, steps=28)
    on = stats_log[-2:]
    plain = rm.sample(simple(spec_nodes, model, options=options(spec_nodes, trajectory_correction="off")),
                      labels, seeds, steps=28)
    off = stats_log[-2:]
    for s in on:
        assert s["correction"] == "on" and s["corrected"] >= 5 and not s["internal_error"]
    assert all(s["correction"] == "" and s["corrected"] == 0 for s in off)
    # (the correction moves x, so the schedules may differ: compare per computed step)
    gain = rm.psnr(corrected, uncached) - rm.psnr(plain, uncached)
    per_step = (sum(s["compute_fraction"] for s in on) - sum(s["compute_fraction"] for s in off)) / 2
    assert gain > 2.0 and per_step < 0.05, (gain, per_step)

    with_2m = rm.sample(simple(spec_nodes, model), labels, seeds, steps=28, sampler="dpmpp_2m")
    for s in stats_log[-2:]:
        assert s["corrected"] == 0 and "not an Euler step" in s["correction"] and s["forecast"] > 0
        # the last step's tolerance, in each run's own unit: 4/6.3 of the euler run's (the same
        # step weight)
        last, last_euler = s["errors"][-1], on[0]["errors"][-1]
        assert last[1] == pytest.approx(last_euler[1])
        assert (last[3] / s["run_unit"]) / (last_euler[3] / on[0]["run_unit"]) == pytest.approx(0.04 / 0.063, rel=1e-3)
    fallback = stats_log[-2:]
    # the switch off keeps the full tolerance (nothing to fall back from): it forecasts at least as much
    plain_2m = rm.sample(simple(spec_nodes, model, options=options(spec_nodes, trajectory_correction="off")),
                         labels, seeds, steps=28, sampler="dpmpp_2m")
    assert sum(s["forecast"] for s in stats_log[-2:]) >= sum(s["forecast"] for s in fallback)
    assert rm.psnr(with_2m, uncached) >= rm.psnr(plain_2m, uncached) - 0.5
    # an exact tolerance set on the Options node stays exact
    assert config_of(simple(spec_nodes, model, options=options(spec_nodes, threshold=0.05))
                     ).uncorrected_threshold_scale == 1.0


def test_a_planned_speed_target_on_the_reference_model(spec_nodes, stats_log):
    """6x on 50 steps (the Options node's target_speedup; planned from 4x on): exactly the
    planned steps run the model (8 of 50, the first and the last among them, none verified), the
    second step is forecast in noise space (1 - sigma = 0.006, in float32), and the pictures
    stay closer to the uncached ones than the threshold loop's at the same target, which
    spends at least as much."""
    from devkit import reference_model as rm
    model = rm.load_reference()
    labels, seeds = [0, 1], [1000, 1001]
    uncached = rm.sample(model, labels, seeds, steps=50)
    planned = rm.sample(simple(spec_nodes, model, mode="speed_target",
                               options=options(spec_nodes, target_speedup=6.0)), labels, seeds, steps=50)
    for s in stats_log[-2:]:
        computed = [i for i, c in enumerate(s["timeline"]) if c == "C"]
        assert s["target_schedule"] == "planned" and computed == s["planned_steps"], s["timeline"]
        assert len(computed) == 8 and computed[0] == 0 and computed[-1] == 49 and s["timeline"][1] == "F"
        assert s["verified"] == 0 and s["compute_fraction"] == pytest.approx(8 / 50, abs=0.002)
        assert not s["target_missed"] and not s["internal_error"] and s["correction"] == "on"
    adaptive = rm.sample(simple(spec_nodes, model, mode="speed_target",
                                options=options(spec_nodes, target_speedup=6.0, target_schedule="adaptive")),
                         labels, seeds, steps=50)
    assert all(s["target_schedule"] == "adaptive" and s["compute_fraction"] >= 8 / 50 for s in stats_log[-2:])
    planned_db, adaptive_db = rm.psnr(planned, uncached), rm.psnr(adaptive, uncached)
    assert planned_db > adaptive_db + 3.0 and planned_db > 34.0, (planned_db, adaptive_db)


def test_a_planned_target_runs_cond_only_steps_through_comfyui(spec_nodes, stats_log):
    """28 steps at 6x on the 19-block reference model (CFG 2): 4 calls and one cond-only step in
    the middle of the first run of forecasts. At that step the diffusion model runs cond's half
    of the batch only (batch 1, not 2), and uncond's output is cond's plus (uncond - cond) of the
    last computed step, there and at the forecast steps up to the next call (read at CFG). The
    run books 4.5 calls, and its pictures are closer to the uncached ones than 7x's 4 calls
    (8 samples: 30.0 against 25.2 dB)."""
    from devkit import reference_model as rm
    model = rm.load_reference("reference_deep")
    labels, seeds = [i % len(rm.CLASSES) for i in range(8)], [1000 + i for i in range(8)]
    uncached = rm.sample(model, labels, seeds)
    batches, guidance = [], []
    first_block = model.model.diffusion_model.double_blocks[0]       # runs only when the model runs
    hook = first_block.register_forward_pre_hook(
        lambda m, a, kw: batches.append((a[0] if a else kw["img"]).shape[0]), with_kwargs=True)
    patched = simple(spec_nodes, model, mode="speed_target", options=options(spec_nodes, target_speedup=6.0)).clone()

    def post_cfg(args):
        guidance.append(args["uncond_denoised"] - args["cond_denoised"])
        return args["denoised"]
    patched.set_model_sampler_post_cfg_function(post_cfg)
    try:
        six = rm.sample(patched, labels, seeds)
    finally:
        hook.remove()
    for s in stats_log[-8:]:
        plan, half = s["planned_steps"], s["cond_only_steps"]
        assert len(plan) == 4 and half == [(plan[0] + plan[1]) // 2], (plan, half)
        assert [i for i, c in enumerate(s["timeline"]) if c == "C"] == sorted(plan + half)
        assert s["compute_fraction"] == pytest.approx(4.5 / 28, abs=1e-3) and not s["target_missed"]
        assert s["verified"] == 0 and not s["internal_error"]
    assert batches == 8 * [2 if i in plan else 1 for i in sorted(plan + half)], batches
    assert len(guidance) == 8 * 28
    for run in range(8):
        difference = guidance[28 * run:28 * (run + 1)]
        for step in range(half[0], plan[1]):      # the cond-only step and the forecasts after it
            assert torch.allclose(difference[step], difference[plan[0]], atol=1e-5), (run, step)
        assert not torch.allclose(difference[plan[1] + 1], difference[plan[0]], atol=1e-3)   # uncond's own again
    seven = rm.sample(simple(spec_nodes, model, mode="speed_target", options=options(spec_nodes, target_speedup=7.0)),
                      labels, seeds)
    assert all(s["cond_only_steps"] == [] and s["compute_fraction"] == pytest.approx(4 / 28, abs=1e-3)
               for s in stats_log[-8:])
    six_db, seven_db = rm.psnr(six, uncached), rm.psnr(seven, uncached)
    assert six_db > seven_db + 2.0 and six_db > 28.0, (six_db, seven_db)
    # nothing of the difference outlives the run; without CFG there is no uncond to derive:
    # whole calls (5 of 28)
    guidance.clear()
    before = live_tensor_count()
    rm.sample(patched, labels[:1], seeds[:1])
    guidance.clear()
    assert live_tensor_count() <= before      # (only growth is a leak)
    rm.sample(patched, labels[:1], seeds[:1], cfg=1.0)
    s = stats_log[-1]
    assert s["cond_only_steps"] == [] and len(s["planned_steps"]) == 5 and not s["internal_error"]
