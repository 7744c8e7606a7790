"""Engine tests (cache_core, no ComfyUI): trajectory correction."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import corrected_euler_sample


def test_trajectory_correction_brings_forecast_runs_back_to_the_uncached_trajectory(pack):
    from importlib import import_module
    correction_module = import_module(f"{pack.__name__}.cache_core.correction")
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    x0_of_sigma = lambda s: a + b * s + 3.0 * c * s * s            # a denoiser that does not read x
    noise = torch.randn(4, 8, 8, dtype=torch.float64)
    sigmas = torch.linspace(0.98, 0.0, 21, dtype=torch.float64)
    forecasts = {3, 4, 6, 7, 8, 10, 11, 13, 14, 15, 17}
    uncached = corrected_euler_sample(None, set(), sigmas, x0_of_sigma, noise)
    plain = corrected_euler_sample(None, forecasts, sigmas, x0_of_sigma, noise)
    fix = correction_module.TrajectoryCorrection(flow=True, degree=2)
    corrected = corrected_euler_sample(fix, forecasts, sigmas, x0_of_sigma, noise)
    error = lambda x: float((x - uncached).norm() / uncached.norm())
    assert fix.active and fix.corrected == 5          # every computed step after a forecast streak
    assert error(plain) > 1e-3 and error(corrected) < 0.35 * error(plain)     # 0.29 when written
    # without forecasts it never changes a thing, and a run with nothing to correct stays exact
    exact = correction_module.TrajectoryCorrection(flow=True, degree=2)
    assert torch.equal(corrected_euler_sample(exact, set(), sigmas, x0_of_sigma, noise), uncached) and exact.corrected == 0
    fix.release()
    assert fix._previous is None and fix._nodes == [] and fix._forecast_sum is None


def test_trajectory_correction_turns_off_for_a_sampler_that_is_not_euler(pack):
    """A second-order step (dpmpp_2m's) makes x differ from the Euler step: the correction
    turns off before its first use and hands every output back untouched."""
    from importlib import import_module
    correction_module = import_module(f"{pack.__name__}.cache_core.correction")
    torch.manual_seed(1)
    fix = correction_module.TrajectoryCorrection(flow=True)
    x = torch.randn(2, 4, 4)
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    previous = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = torch.full_like(x, 0.3 * i)
        served = fix.observe(x, denoised, s, s_next, computed=i < 3)
        assert served is denoised
        d = (x - denoised) / s
        # a multistep update from the second step on (it uses the previous output too)
        x = x + (s_next - s) * (d if previous is None else 1.5 * d - 0.5 * previous)
        previous = d
    assert not fix.active and "not an Euler step" in fix.off_reason and fix.corrected == 0
    assert fix._previous is None
    with pytest.raises(ValueError):
        correction_module.TrajectoryCorrection(flow=True, degree=3)


def test_config_validates_trajectory_correction(core):
    assert core.CacheConfig(trajectory_correction=2).trajectory_correction == 2
    with pytest.raises(ValueError, match="trajectory_correction"):
        core.CacheConfig(trajectory_correction=5)
    with pytest.raises(ValueError, match="uncorrected_threshold_scale"):
        core.CacheConfig(uncorrected_threshold_scale=0.0)
    # a run whose sampler cannot be corrected falls back to the scaled tolerance
    from importlib import import_module
    correction_module = import_module(f"{core.__name__.rsplit('.', 1)[0]}.cache_core.correction")
    run = core.SpeculativeRun(core.CacheConfig(acceptance="lookback", threshold=0.063, trajectory_correction=2,
                                               uncorrected_threshold_scale=0.5), 10)
    correction = correction_module.TrajectoryCorrection(flow=True)
    run.attach_correction(correction)
    assert run.threshold(4) == pytest.approx(0.063) and run.stats.correction == "on"
    correction.turn_off("the sampler's step is not an Euler step")
    run.note_correction()
    assert run.threshold(4) == pytest.approx(0.0315) and "Euler" in run.stats.correction
    # the run frees the correction's tensors when it closes
    correction._nodes = [(0.5, torch.ones(2))]
    run.close()
    assert correction._nodes == []
