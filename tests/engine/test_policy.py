"""Engine tests (cache_core, no ComfyUI): policy."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import simulate


def test_policy_warmup_max_and_final(core):
    cfg = core.CacheConfig(threshold=1.0, warmup_steps=3, max_forecast_steps=4, final_full_steps=2,
                           predict_errors=False)
    modes, stats, _ = simulate(core, cfg, 20)
    # step 17 is full because 4 forecasts ran in a row; 18 and 19 are the final stretch
    assert modes == "CCC" + "FFFFC" + "FFFFC" + "FFFFC" + "CC"
    assert stats.computed == modes.count("C") == 8
    assert stats.forecast == 12
    assert stats.verified == 12 and stats.rejected == 0
    assert stats.compute_fraction == pytest.approx((8 * 4 + 12) / (20 * 4))


def test_policy_redo_recomputes_rejected_steps(core):
    cfg = core.CacheConfig(threshold=0.5, warmup_steps=2, max_forecast_steps=3, final_full_steps=0,
                           predict_errors=False)
    modes, stats, _ = simulate(core, cfg, 10, accept=lambda i: i % 3 != 0)
    # steps 3, 6, 9 rejected and recomputed; a recomputed step restarts the forecast run
    assert modes == "CC" + "F" + "R" + "FF" + "R" + "FF" + "R"
    assert stats.rejected == 3 and stats.computed == 5 and stats.forecast == 5


def test_policy_next_mode_keeps_forecast_and_computes_next(core):
    cfg = core.CacheConfig(threshold=0.5, warmup_steps=2, max_forecast_steps=8, final_full_steps=0,
                           on_reject="next", predict_errors=False)
    modes, stats, _ = simulate(core, cfg, 10, accept=lambda i: i != 4)
    assert modes == "CC" + "FFR" + "C" + "FFFF"
    assert stats.forecast == 7 and stats.computed == 3 and stats.rejected == 1


def test_taylorseer_fixed_interval_without_verification(core):
    cfg = core.CacheConfig(method="taylorseer", warmup_steps=1, max_forecast_steps=2, final_full_steps=0)
    modes, stats, _ = simulate(core, cfg, 10)
    assert modes == "C" + "FFC" + "FFC" + "FFC"
    assert stats.verified == 0


def test_zero_threshold_disables_forecasting(core):
    modes, stats, _ = simulate(core, core.CacheConfig(threshold=0.0), 12)
    assert modes == "C" * 12 and stats.compute_fraction == 1.0


def test_time_window(core):
    cfg = core.CacheConfig(threshold=1.0, warmup_steps=0, max_forecast_steps=100, final_full_steps=0)
    pol = core.Policy(cfg, 10, start_time=0.8, end_time=0.3)
    assert pol.decide(5, 0.9).mode is core.StepMode.FULL
    assert pol.decide(5, 0.8).forecast
    assert pol.decide(5, 0.3).mode is core.StepMode.FULL
    assert not pol.decide(5, 0.5, has_history=False).forecast


def test_config_rejects_bad_values(core):
    for bad in (dict(threshold=-1), dict(order=7), dict(max_forecast_steps=0), dict(method="x"),
                dict(start_percent=0.8, end_percent=0.2), dict(threshold_decay=0.0),
                dict(storage_dtype="int8"), dict(warmup_steps=-1), dict(output_space="x0"),
                dict(acceptance="after"), dict(acceptance="lookback", method="taylorseer")):
        with pytest.raises(ValueError, match="Speculative Cache"):
            core.CacheConfig(**bad)


@pytest.mark.parametrize("steps", [10, 28, 50])
def test_backoff_bounds_the_cost_when_every_forecast_fails(core, steps):
    """Every verified forecast rejected (a model the threshold does not fit): the probes
    wasted stay within max_overhead (2 %) of the uncached run."""
    cfg = core.CacheConfig(threshold=0.1, warmup_steps=1, final_full_steps=0, predict_errors=False)
    modes, stats, _ = simulate(core, cfg, steps, accept=lambda i: False)
    assert stats.rejected >= 1 and "F" not in modes
    # the first probe of a run is always allowed (its cost is not known before): one probe
    # (1 of 4 units of one step) is 2.5 % of a 10-step run
    assert stats.compute_fraction <= 1 + max(0.02, 1 / (4 * steps)) + 1e-12
    loose = core.CacheConfig(threshold=0.1, warmup_steps=1, final_full_steps=0, predict_errors=False,
                             backoff=False, max_overhead=float("inf"))
    _, unbounded, _ = simulate(core, loose, steps, accept=lambda i: False)
    assert unbounded.compute_fraction == pytest.approx(1 + (steps - 1) / (4 * steps))   # every step probed


@pytest.mark.parametrize("steps", [4, 6, 8])
def test_a_few_step_run_never_costs_more_than_uncached(core, steps):
    """Distilled models' 4 to 8 steps: no overhead budget, so a probe runs only once forecasts
    before it have saved what its rejection would waste."""
    probe = core.CacheConfig(threshold=0.1, warmup_steps=1, final_full_steps=0, predict_errors=False)
    _, stats, _ = simulate(core, probe, steps, accept=lambda i: False)
    assert stats.compute_fraction <= 1.0
    # with SpeCa's unverified first forecast (saving 4 units), a probe after it is paid for
    paid = core.CacheConfig(threshold=0.1, warmup_steps=1, final_full_steps=0, predict_errors=False,
                            unverified_forecasts=1)
    modes, failing, _ = simulate(core, paid, steps, accept=lambda i: False)
    assert failing.compute_fraction <= 1.0 and "F" in modes
    _, passing, _ = simulate(core, paid, steps, accept=lambda i: True)
    assert passing.compute_fraction < 0.8 and passing.verified >= 1


def test_backoff_spaces_attempts_after_repeated_first_rejections(core):
    cfg = core.CacheConfig(threshold=0.1, warmup_steps=1, final_full_steps=0, predict_errors=False,
                           max_overhead=float("inf"))
    modes, _, _ = simulate(core, cfg, 24, accept=lambda i: False)
    # attempts wait 0, 1, 3, 7 full steps after the 1st, 2nd, 3rd, 4th rejection in a row
    assert modes == "C" + "R" + "R" + "C" + "R" + "CCC" + "R" + "CCCCCCC" + "R" + "C" * 7


def test_backoff_recovers_once_forecasts_pass(core):
    cfg = core.CacheConfig(threshold=0.5, warmup_steps=1, final_full_steps=0, predict_errors=False,
                           max_forecast_steps=3, max_overhead=0.1)
    modes, stats, run = simulate(core, cfg, 30, accept=lambda i: i >= 8)
    assert "R" in modes[:8]
    assert modes[12:].count("F") >= 10                  # forecasting resumed at full speed
    assert run.policy.first_rejections == 0
    assert stats.compute_fraction < 0.75


def test_paper_presets_keep_the_papers_schedule_without_backoff(core):
    from importlib import import_module
    recipe = import_module(core.__name__ + ".recipe")
    cfg = recipe.preset_config("paper_flux", recipe.GENERIC, {}, fixed={"threshold": 7.0})
    assert cfg.backoff is False and cfg.max_overhead == float("inf")


def test_relative_change_is_one_for_reuse_at_any_scale_and_rejects_without_anchor(core):
    from importlib import import_module
    verifier = import_module(core.__name__ + ".verifier")
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(2, 16, 8, generator=g)
    real = anchor + 0.1 * torch.randn(2, 16, 8, generator=g)
    for scale in (1e-3, 1.0, 1e3):
        assert verifier.relative_change(anchor * scale, real * scale, anchor * scale) == pytest.approx(1.0, rel=1e-5)
        half = anchor + 0.5 * (real - anchor)
        assert verifier.relative_change(half * scale, real * scale, anchor * scale) == pytest.approx(0.5, rel=1e-5)
    # a feature that did not move: the floor (0.1 % of its norm) keeps tiny errors acceptable
    tiny = real + 1e-5 * torch.randn(2, 16, 8, generator=g)
    assert verifier.relative_change(tiny, real, real) < 0.1
    v = core.Verifier("relative_change", 0.5)
    assert v.error(real, real, None) == float("inf") and not v.accepts(v.error(real, real, None), 0.0)


def test_chunk_verifies_relative_change_against_each_streams_anchor(core):
    cfg = core.CacheConfig(metric="relative_change", threshold=0.5)
    run = core.SpeculativeRun(cfg, 10)
    run.begin_evaluation(1.0, 0)
    chunk = run.chunk(["a", "b"], 2, units_full=2)
    anchor = torch.stack([torch.zeros(4), torch.ones(4) * 100])
    chunk.record({"f": anchor})
    run.begin_evaluation(0.9, 1)
    chunk = run.chunk(["a", "b"], 2, units_full=2)
    real = anchor + torch.tensor([[1.0], [1.0]])
    pred = anchor + torch.tensor([[0.8], [0.8]])      # misses 20 % of each stream's move
    assert chunk.verify(pred, real, "f")
    assert max(chunk.errors) == pytest.approx(0.2, rel=1e-5)
    bad = anchor + torch.tensor([[0.8], [0.0]])       # stream b missed all of it
    assert not chunk.verify(bad, real, "f")


def test_chunk_verifies_only_the_rows_it_is_given(core):
    """An edit region's verification: tokens outside the given rows do not count, for the
    plain metric and for the anchored one (whose anchor is cut to the same rows)."""
    for metric, threshold in (("relative_norm", 0.1), ("relative_change", 0.5)):
        run = core.SpeculativeRun(core.CacheConfig(metric=metric, threshold=threshold), 10)
        run.begin_evaluation(1.0, 0)
        anchor = torch.zeros(1, 6, 3)
        run.chunk(["a"], 1, units_full=1).record({"f": anchor})
        run.begin_evaluation(0.9, 1)
        chunk = run.chunk(["a"], 1, units_full=1)
        real = torch.ones(1, 6, 3)
        pred = real.clone()
        pred[:, 4:] = -5.0                                  # far off, but only on tokens 4 and 5
        rows = torch.tensor([0, 2, 3])
        assert chunk.verify(pred, real, "f", rows=rows), metric
        assert not chunk.verify(pred, real, "f"), metric
        assert not chunk.verify(pred, real, "f", rows=torch.tensor([1, 5])), metric


def test_step_weighting_scales_the_threshold_by_the_step_size(core):
    from importlib import import_module
    run_mod = import_module(core.__name__ + ".run")
    sigmas = [1.0, 0.98, 0.94, 0.86, 0.7, 0.0]          # steps 0.02, 0.04, 0.08, 0.16, 0.7 (mean 0.2)
    scales = run_mod.step_scales(sigmas)
    assert scales == pytest.approx([4.0, 4.0, 2.5, 1.25, 0.2 / 0.7])   # clamped at 4
    cfg = core.CacheConfig(threshold=0.1, step_weighting=True)
    run = core.SpeculativeRun(cfg, 5, sigmas=sigmas)
    assert run.threshold(2) == pytest.approx(0.25) and run.threshold(4) == pytest.approx(0.1 * 0.2 / 0.7)
    plain = core.SpeculativeRun(core.CacheConfig(threshold=0.1), 5, sigmas=sigmas)
    assert plain.threshold(2) == plain.threshold(4) == pytest.approx(0.1)
    # the same error passes on a small early step and fails on the large last one
    for step, ok in ((2, True), (4, False)):
        run.begin_evaluation(sigmas[step], step)
        chunk = run.chunk(["c"], 1, units_full=2)
        assert chunk.verify(torch.ones(1, 4) * 1.2, torch.ones(1, 4)) is ok
