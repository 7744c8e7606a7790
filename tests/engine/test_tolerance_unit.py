"""Engine tests (cache_core, no ComfyUI): a lookback tolerance counted in the run's own
one-step forecast error (tolerance_unit "run"), the slider that means the same on every model."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import lookback_run


def test_the_unit_is_the_geometric_mean_of_the_errors_brought_back_to_distance_one(core):
    cfg = core.CacheConfig(acceptance="lookback", tolerance_unit="run", threshold=4.0, order=1)
    pol = core.Policy(cfg, 20)
    assert pol.run_unit() is None
    pol.measure_unit(0.02)                  # at distance 1
    pol.record_lookback(0.02)
    pol.record_full()
    pol.record_forecast()                   # one forecast, then a computed step at distance 2
    pol.measure_unit(0.32)                  # 0.32 / 2^2 = 0.08 at distance 1
    assert pol.run_unit() == pytest.approx(math.sqrt(0.02 * 0.08))
    pol.measure_unit(float("nan"))          # left out, not poisoning the unit
    assert pol.run_unit() == pytest.approx(math.sqrt(0.02 * 0.08))
    capped = core.Policy(core.CacheConfig(acceptance="lookback", tolerance_unit="run", run_unit_cap=0.01), 20)
    capped.measure_unit(0.5)
    assert capped.run_unit() == 0.01
    pol.forget_lookback()                   # new weights: measured again from scratch
    assert pol.run_unit() is None


def test_a_run_unit_needs_lookback_and_a_positive_cap(core):
    with pytest.raises(ValueError, match="tolerance_unit 'run'"):
        core.CacheConfig(tolerance_unit="run")
    with pytest.raises(ValueError, match="tolerance_unit must be one of"):
        core.CacheConfig(acceptance="lookback", tolerance_unit="relative")
    with pytest.raises(ValueError, match="run_unit_cap"):
        core.CacheConfig(acceptance="lookback", tolerance_unit="run", run_unit_cap=0.0)


def _bending(scale):
    """A trajectory whose one-step forecast error is about proportional to ``scale``."""
    base = torch.linspace(1, 2, 8).reshape(2, 4)
    return lambda t: base * (1 + t + scale * math.sin(6 * t))


def test_the_same_run_tolerance_forecasts_as_much_whatever_the_error_level(core):
    """Three trajectories whose forecast errors differ by 100x: an absolute tolerance forecasts
    all or nothing of them (next test), a tolerance in the run's unit about the same share of each."""
    run_cfg = core.CacheConfig(acceptance="lookback", tolerance_unit="run", threshold=4.0, order=1,
                               warmup_steps=3, final_full_steps=1, max_forecast_steps=8, step_weighting=False)
    forecasts = []
    for scale in (0.02, 0.2, 2.0):
        stats, _ = lookback_run(core, run_cfg, _bending(scale), steps=28)
        forecasts.append(stats.forecast)
        assert stats.run_unit > 0 and stats.to_dict()["run_unit"] == pytest.approx(stats.run_unit, rel=1e-3)
        # the booked tolerance of each measurement is counted in the unit measured so far
        assert all(math.isfinite(e[3]) for e in stats.errors)
    assert min(forecasts) >= 10 and max(forecasts) - min(forecasts) <= 3, forecasts


def test_an_absolute_tolerance_does_not_transfer_between_error_levels(core):
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.01, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=8, step_weighting=False)
    small, _ = lookback_run(core, cfg, _bending(0.02), steps=28)
    large, _ = lookback_run(core, cfg, _bending(2.0), steps=28)
    assert small.forecast >= 16 and large.forecast <= 2


def test_the_unit_is_capped_so_poor_forecasts_are_not_taken_for_it(core):
    """A trajectory whose every forecast is far off: the unit stops at run_unit_cap, so the
    tolerance does not follow the error up."""
    cfg = core.CacheConfig(acceptance="lookback", tolerance_unit="run", threshold=4.0, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=8, step_weighting=False, run_unit_cap=0.05)
    base = torch.linspace(1, 2, 8).reshape(2, 4)
    stats, _ = lookback_run(core, cfg, lambda t: base * math.cos(40 * t), steps=28)
    assert stats.run_unit == 0.05 and stats.forecast <= 1


def test_a_few_step_run_counts_in_a_fixed_unit(core):
    """At 8 steps or fewer the few measurements are not counted in: the unit is few_steps_unit,
    so the tolerance is the absolute one the slider gave before it counted the run's own error."""
    cfg = core.CacheConfig(acceptance="lookback", tolerance_unit="run", threshold=4.0, few_steps_unit=0.063 / 4.0)
    short = core.SpeculativeRun(cfg, 8)
    assert short.policy.run_unit() == pytest.approx(0.063 / 4.0)
    assert short.threshold(3) == pytest.approx(0.063)
    short.policy.measure_unit(0.5)
    assert short.policy.run_unit() == pytest.approx(0.063 / 4.0)
    long = core.SpeculativeRun(cfg, 9)
    assert long.policy.run_unit() is None
    long.policy.measure_unit(0.02)
    assert long.policy.run_unit() == pytest.approx(0.02)
    with pytest.raises(ValueError, match="few_steps_unit"):
        core.CacheConfig(acceptance="lookback", tolerance_unit="run", few_steps_unit=-1.0)
