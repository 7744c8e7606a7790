"""Engine tests (cache_core, no ComfyUI): lookback."""

from __future__ import annotations

import math

import torch

from engine_helpers import lookback_run


def test_lookback_policy_sizes_forecast_runs_from_the_measured_error(core):
    """Order 1: the error grows as d^2. Nothing measured: compute. 0.01 measured at d = 1
    allows d = 1 and 2 (twice the longest distance measured), not 3. 0.09 measured at d = 3
    predicts 0.01, 0.04, 0.09, 0.16 for d = 1..4: three forecasts under 0.1, then compute."""
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.1, order=1, warmup_steps=1,
                           final_full_steps=0, max_forecast_steps=8)
    pol = core.Policy(cfg, 30)
    pol.record_full()
    assert pol.decide(1, 0.9).reason == "no_measurement"

    def forecasts_from(first_step):
        """Decisions from ``first_step`` on, up to the first computed step."""
        reasons = []
        for step in range(first_step, first_step + 10):
            d = pol.decide(step, 0.5)
            reasons.append(d.reason)
            if not d.forecast:
                return reasons
            assert not d.verify                 # nothing runs on a lookback forecast step
            pol.record_forecast()
        return reasons

    pol.record_lookback(0.01)
    pol.record_full()
    assert forecasts_from(2) == ["lookback", "lookback", "reach"]
    pol.record_lookback(0.09)               # measured at d = 3
    pol.record_full()
    assert forecasts_from(6) == ["lookback"] * 3 + ["predicted_reject"]
    pol.record_lookback(float("nan"))       # a broken measurement: compute until measured again
    pol.record_full()
    assert not pol.decide(12, 0.3).forecast


def test_lookback_run_forecasts_a_straight_trajectory_and_computes_a_bending_one(core):
    base = torch.linspace(1, 2, 8).reshape(2, 4)
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.01, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=4)
    stats, served = lookback_run(core, cfg, lambda t: base * (1 + t))
    assert stats.acceptance == "lookback" and stats.verified == 0 and stats.looked_back > 0
    # (the first measurement, at step 1, is of a forecast from one point: the reuse error)
    assert stats.forecast >= 10 and all(e[2] < 1e-5 for e in stats.errors[1:]) and stats.errors[0][2] > 0.01
    for i, out in enumerate(served):            # a linear forecast of a straight line is exact
        assert torch.allclose(out, base * (2 - i / 20), atol=1e-5)
    assert stats.to_dict()["looked_back"] == stats.looked_back
    # A trajectory that bends sharply at every step: every measured error is far over 1 %.
    stats, _ = lookback_run(core, cfg, lambda t: base * math.cos(40 * t))
    assert stats.forecast <= 1 and stats.compute_fraction >= 0.95
    assert min(e[2] for e in stats.errors) > 0.01 and not any(e[4] for e in stats.errors)


def test_lookback_takes_the_worst_stream(core):
    """cond follows a line, uncond bends: the measured error is the uncond's."""
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.01, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=4)
    line = torch.ones(1, 4)

    def trajectory(t):
        return torch.cat([line * (1 + t), line * math.cos(40 * t)])
    stats, _ = lookback_run(core, cfg, trajectory)
    assert stats.forecast <= 1 and min(e[2] for e in stats.errors) > 0.01


def test_lookback_counts_a_non_finite_stream_as_infinite(core):
    """max() over [0.0, nan] is 0.0: a stream whose forecast is not finite must not hide."""
    run = core.SpeculativeRun(core.CacheConfig(acceptance="lookback", threshold=0.1, order=1), 10)
    run.begin_evaluation(1.0, 0)
    chunk = run.chunk(["cond", "uncond"], 2, units_full=1)
    real = torch.ones(2, 4)
    pred = real.clone()
    pred[1] = float("nan")
    assert chunk.look_back(pred, real) == float("inf")
    chunk.finish(core.stats.COMPUTED)
    run.end_evaluation()                 # (an evaluation's errors are booked when it ends)
    assert run.stats.errors[-1][2] == float("inf") and not run.stats.errors[-1][4]
