"""Engine tests (cache_core, no ComfyUI): speed target."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import simulate, simulate_growing_errors, shifted_sigmas, run_planned, run_with_cond_only, engine_module


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_speed_target_meets_the_budget_on_any_error_scale(core, target):
    """The same threshold gives very different speed-ups on models whose errors differ by
    100x; the speed target lands every run near its target whatever the scale."""
    fixed = [simulate_growing_errors(core, core.CacheConfig(threshold=0.15), 40, s).compute_fraction
             for s in (0.002, 0.2)]
    assert fixed[0] < 0.4 and fixed[1] > 0.9                   # a fixed threshold does not transfer
    for scale in (0.002, 0.02, 0.2):
        cfg = core.CacheConfig(threshold=0.15, target_speedup=target)
        stats = simulate_growing_errors(core, cfg, 40, scale)
        achieved = 1.0 / stats.compute_fraction
        assert achieved == pytest.approx(target, rel=0.15), (scale, achieved, stats.timeline)
        assert stats.to_dict()["target_speedup"] == target
        assert stats.to_dict()["target_missed"] == ("target missed" in stats.summary_line()) == (achieved < 0.9 * target)
        # it loosened the threshold where errors were large and tightened it where small
        assert (stats.threshold_scale > 1) if scale == 0.2 else True
        assert (stats.threshold_scale < 1) if scale == 0.002 else True


def test_speed_target_out_of_reach_spends_all_it_may_and_says_so(core):
    """Warm-up 3 + final 1 of 10 steps already exceed a 5x budget (the threshold loop placing
    the calls): the run forecasts every step it may and the stats carry the target it missed."""
    cfg = core.CacheConfig(threshold=0.15, target_speedup=5.0, target_schedule="adaptive")
    stats = simulate_growing_errors(core, cfg, 10, 0.02)
    assert stats.target_speedup == 5.0 and 1.0 / stats.compute_fraction < 5.0
    assert stats.timeline == "CCCFFFFFFC"                          # every free step forecast
    assert stats.to_dict()["target_missed"] and "target missed" in stats.summary_line()
    with pytest.raises(ValueError, match="target_speedup"):
        core.CacheConfig(target_speedup=0.5)


def test_plan_schedule_spends_exactly_its_calls_where_the_steps_are_big(core):
    from importlib import import_module
    target = import_module(core.__name__ + ".target")
    sigmas = shifted_sigmas(50)
    plan = target.plan_schedule(sigmas, 8, forced=[49])
    assert len(plan) == 8 and plan[0] == 0 and plan[-1] == 49 and plan == sorted(set(plan))
    gaps = [b - a for a, b in zip(plan, plan[1:])]
    # long runs of forecasts on the small early steps, short ones on the big late steps
    assert gaps[0] >= 2 * gaps[-1] and gaps == sorted(gaps, reverse=True), gaps
    # equal steps: equal runs (within one step), whatever the error model's exponents
    even = target.plan_schedule([1.0 - i / 28 for i in range(29)], 5, forced=[27])
    even_gaps = [b - a for a, b in zip(even, even[1:])]
    assert len(even) == 5 and max(even_gaps) - min(even_gaps) <= 1, even
    # no run of forecasts spans a forced step; the forced steps count against the calls
    forced = [20, 21, 22, 49]
    held = target.plan_schedule(sigmas, 8, forced=forced)
    assert set(forced) <= set(held) and len(held) == 8
    assert target.plan_schedule(sigmas, 3, forced=forced) == sorted({0, *forced})   # more forced than calls
    assert target.plan_schedule(sigmas, 60) == list(range(50))
    assert [target.planned_calls(n, t) for n, t in ((50, 6.0), (28, 5.0), (28, 6.0), (4, 20.0))] == [8, 6, 5, 2]

    # with cond and uncond, a budget that whole calls round up lands on half calls instead
    budgets = [target.planned_budget(n, t, True) for n, t in ((28, 6.0), (28, 5.0), (28, 8.0), (50, 6.0),
                                                               (28, 7.0), (28, 4.0), (50, 4.0), (4, 20.0))]
    assert budgets == [(4, 1), (5, 1), (3, 1), (8, 0), (4, 0), (7, 0), (12, 0), (2, 0)]
    assert target.planned_budget(28, 6.0, False) == (5, 0)
    assert target.place_cond_only([0, 12, 21, 27]) == [6] and target.place_cond_only([27, 0, 9]) == [4]
    assert target.place_cond_only([0, 1, 9]) == [] and target.place_cond_only([0]) == []
    assert target.place_cond_only([0, 12, 21, 27], 0) == []
    # further ones: the middle of the longest run of forecasts left, the earliest of equals
    assert target.place_cond_only([0, 22, 38, 49], 2) == [11, 30]
    assert target.place_cond_only([0, 27], 3) == [6, 13, 20]
    assert target.place_cond_only([0, 3, 5], 4) == [1, 2, 4]      # no room for a fourth


def test_a_planned_target_computes_its_plan_and_nothing_else(core):
    """From 4x on (target_schedule auto) a speed target computes exactly the planned steps,
    lands within half a call of its target and says so; below 4x, or asked to, the threshold
    loop places the calls; steps outside the window are computed and held by the plan."""
    sigmas = shifted_sigmas(50)
    stats = run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), sigmas)
    computed = [i for i, c in enumerate(stats.timeline) if c == "C"]
    assert computed == stats.planned_steps and len(computed) == 8 and stats.verified == 0
    assert stats.compute_fraction == pytest.approx(8 / 50) and not stats.target_missed
    d = stats.to_dict()
    assert d["target_schedule"] == "planned" and d["planned_steps"] == computed
    assert "planned: 8 calls at steps 0, " in stats.summary_line() and "..." not in stats.summary_line()
    long_run = run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=4.0), shifted_sigmas(200))
    assert len(long_run.planned_steps) == 50 and ", ...)" in long_run.summary_line()
    assert long_run.summary_line().count(", ") < 30 and "50 calls at steps 0, " in long_run.summary_line()
    for config in (core.CacheConfig(threshold=0.1, target_speedup=3.0),
                   core.CacheConfig(threshold=0.1, target_speedup=6.0, target_schedule="adaptive")):
        adaptive = run_planned(core, config, sigmas)
        assert adaptive.planned_steps == [] and adaptive.to_dict()["target_schedule"] == "adaptive"
    assert core.CacheConfig(target_speedup=2.0, target_schedule="planned").plans_target
    assert not core.CacheConfig(target_schedule="planned").plans_target          # no target, no plan
    with pytest.raises(ValueError, match="target_schedule"):
        core.CacheConfig(target_speedup=6.0, target_schedule="even")
    # a window (sigma 0.9 down to 0.3): the steps outside it are computed, inside the plan holds
    windowed = run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), sigmas,
                            start_time=0.9, end_time=0.3)
    outside = [i for i in range(50) if not (0.9 >= sigmas[i] > 0.3)]
    computed = [i for i, c in enumerate(windowed.timeline) if c == "C"]
    assert set(outside) <= set(computed) and computed == windowed.planned_steps and windowed.verified == 0
    assert windowed.target_missed          # the window alone spends more than 1/6
    # a flow model's output forecast in noise space cannot be served at 1 - sigma < 0.001: such a
    # step is computed, and counted in the plan (8 calls still)
    near_one = [1.0, 0.9995] + shifted_sigmas(48)[1:]
    noise = run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0, output_space="noise"), near_one)
    assert 1 in noise.planned_steps and len(noise.planned_steps) == 8 and noise.timeline[1] == "C"
    assert noise.verified == 0 and [i for i, c in enumerate(noise.timeline) if c == "C"] == noise.planned_steps
    assert 1 not in run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), near_one).planned_steps


def test_a_planned_target_ends_its_budget_in_a_cond_only_step(core):
    """28 steps at 6x with cond and uncond: 4 calls and one cond-only step (4.5 calls, 6.2x)
    instead of 5 calls (5.6x); it is booked as half a call whether ComfyUI batches cond and
    uncond or runs them apart, and it sits in the middle of the first run of forecasts.
    Without uncond (cond_only False) the plan rounds to whole calls as before."""
    sigmas = shifted_sigmas(28)
    config = core.CacheConfig(threshold=0.1, target_speedup=6.0)
    for batched in (True, False):
        stats, decisions = run_with_cond_only(core, config, sigmas, batched)
        half = [i for i, d in enumerate(decisions) if d.cond_only]
        plan = stats.planned_steps
        assert len(plan) == 4 and half == [(plan[0] + plan[1]) // 2] and half[0] not in plan
        assert [i for i, c in enumerate(stats.timeline) if c == "C"] == sorted(plan + half)
        assert all(d.forecast == (i not in plan + half) for i, d in enumerate(decisions))
        assert stats.compute_fraction == pytest.approx(4.5 / 28), batched
        assert stats.verified == 0 and not stats.target_missed
        assert f"4 calls at steps {', '.join(map(str, plan))}, cond only at step {half[0]}" in stats.summary_line()
    whole = simulate(core, config, 28, sigmas=sigmas)[1]
    assert len(whole.planned_steps) == 5 and whole.compute_fraction == pytest.approx(5 / 28)
    # 7x is 4 whole calls: nothing to halve
    assert not any(d.cond_only for d in run_with_cond_only(
        core, core.CacheConfig(threshold=0.1, target_speedup=7.0), sigmas, True)[1])


def test_noise_space_round_trip_holds_in_bfloat16_near_sigma_one(core):
    """At 1 - sigma = 0.006 (the second of 50 steps) the way from noise back to velocity divides
    by 0.006: computed in bfloat16 it would have no correct digit, so both directions run in
    float32."""
    from importlib import import_module
    space = import_module(core.__name__ + ".output_space")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    v = torch.randn(2, 16, 8, 8, generator=g).to(torch.bfloat16)
    eps = space.noise_from_velocity(v, x, 0.994)
    assert eps.dtype == torch.float32 and space.can_forecast_noise(0.994)
    back = space.velocity_from_noise(eps, x, 0.994)
    assert torch.allclose(back, v.float(), rtol=0, atol=1e-3)


def test_speed_target_is_off_at_zero_threshold_and_for_unverified_methods(core):
    assert core.SpeculativeRun(core.CacheConfig(threshold=0.0, target_speedup=3.0), 10).target is None
    assert core.SpeculativeRun(core.CacheConfig(method="taylorseer", target_speedup=3.0), 10).target is None


def test_token_pruning_picks_the_most_moved_tokens_and_serves_the_rest_with_the_drift(core):
    tp = engine_module(core, "token_pruning")
    gather_tokens = engine_module(core, "tokens").gather_tokens
    reference = torch.zeros(2, 5, 3)
    x = reference.clone()
    x[0, [1, 3]] += 1.0                     # row 0: tokens 1 and 3 moved
    x[1, [0, 4]] += torch.tensor([2.0, 0.5, 0.0])
    idx = tp.select_dynamic(x, reference, keep=2)
    assert idx.tolist() == [[1, 3], [0, 4]]
    assert tp.kept_count(10, 0.5) == 5 and tp.kept_count(3, 0.95) == 1
    cached = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    fresh = gather_tokens(cached, idx) + torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 4.0]]])
    fresh[0, 0] += 2.0                      # token 1 of row 0 moved more than token 3
    out = tp.served_output(cached, idx, fresh)
    assert torch.equal(gather_tokens(out, idx), fresh)          # computed tokens: fresh
    drift = (fresh - gather_tokens(cached, idx)).mean(1, keepdim=True)
    pruned = torch.tensor([[0, 2, 4], [1, 2, 3]])
    assert torch.allclose(gather_tokens(out, pruned), gather_tokens(cached, pruned) + drift)
    assert drift[0, 0].tolist() == [2.0, 3.0, 4.0]
