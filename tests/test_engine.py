"""Engine tests on plain tensors: no ComfyUI needed."""

import math

import pytest
import torch


def poly(coeffs, t, shape=(3, 5)):
    base = torch.linspace(-1, 1, shape[0] * shape[1], dtype=torch.float64).reshape(shape)
    return sum(c * (t ** k) * (base + k) for k, c in enumerate(coeffs))


# ---- forecasters ---------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_taylor_exact_on_polynomials_at_nonuniform_times(core, order):
    coeffs = [0.7, -1.3, 0.4, 2.0, -0.6][: order + 1]
    times = [1.0, 0.93, 0.81, 0.62, 0.41, 0.30]   # shifted-schedule-like spacing, decreasing
    f = core.TaylorForecaster(order)
    for t in times:
        f.update(t, poly(coeffs, t))
    for target in (0.25, 0.12, 0.0):
        assert torch.allclose(f.predict(target), poly(coeffs, target), atol=1e-9, rtol=1e-9)


def test_taylor_order_too_low_is_not_exact(core):
    coeffs = [0.1, 0.2, 1.5]  # quadratic
    f = core.TaylorForecaster(1)
    for t in (1.0, 0.8, 0.55):
        f.update(t, poly(coeffs, t))
    assert not torch.allclose(f.predict(0.3), poly(coeffs, 0.3), atol=1e-3)


def test_taylor_order_ramps_up_with_points(core):
    f = core.TaylorForecaster(3)
    f.update(1.0, torch.ones(2))
    assert f.points == 1
    assert torch.equal(f.predict(0.5), torch.ones(2))  # order 0: reuse
    f.update(0.5, torch.zeros(2))
    assert f.points == 2
    assert torch.allclose(f.predict(0.0), -torch.ones(2))  # linear through both points
    for t in (0.4, 0.3, 0.2):
        f.update(t, torch.zeros(2))
    assert f.points == 4  # order + 1 nodes, never more


def test_taylor_repeated_time_replaces_newest_point(core):
    """Heun evaluates twice at one sigma: the second value replaces the first and the
    forecast stays exact for the trajectory through the replaced value."""
    coeffs = [0.3, 0.9, -0.7]
    f = core.TaylorForecaster(2)
    f.update(1.0, poly(coeffs, 1.0))
    f.update(0.7, poly(coeffs, 0.7))
    f.update(0.45, torch.full((3, 5), 123.0, dtype=torch.float64))  # a first, wrong value
    f.update(0.45, poly(coeffs, 0.45))                              # replaced
    assert f.points == 3
    assert torch.allclose(f.predict(0.2), poly(coeffs, 0.2), atol=1e-9)


def _fitted(core, **kw):
    from importlib import import_module
    return import_module(core.__name__ + ".forecasters").FittedCurvatureForecaster(**kw)


def test_fitted_curvature_starts_linear_and_fits_the_share_of_the_quadratic(core):
    """w = 0 until two second differences are known; a function whose curvature holds steady
    moves w towards 1 (the quadratic), one whose curvature flips sign towards -1."""
    coeffs = [0.2, -0.8, 1.1]                        # a quadratic: constant curvature
    f = _fitted(core)
    linear = core.TaylorForecaster(1)
    for t in (1.0, 0.8, 0.6):
        f.update(t, poly(coeffs, t))
        linear.update(t, poly(coeffs, t))
    assert f.points == 3 and f.weight == 0.0
    assert torch.allclose(f.predict(0.3), linear.predict(0.3), atol=1e-12)   # linear so far
    weights = []
    for t in (0.45, 0.3, 0.2):
        f.update(t, poly(coeffs, t))
        weights.append(f.weight)
    assert weights == pytest.approx([0.5, 0.75, 0.875])   # halfway to the fit (1) each time
    exact, quadratic_share = poly(coeffs, 0.05), f.predict(0.05)
    linear = core.TaylorForecaster(1)
    for t in (0.3, 0.2):
        linear.update(t, poly(coeffs, t))
    # 7/8 of the quadratic term: closer to the exact value than the linear forecast
    assert (quadratic_share - exact).norm() < 0.2 * (linear.predict(0.05) - exact).norm()

    g = _fitted(core)
    base = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(3, 5)
    for i, t in enumerate((1.0, 0.9, 0.8, 0.7, 0.6, 0.5)):
        g.update(t, base * (t + 0.05 * (-1) ** i))   # a line with a zig-zag: the curvature flips
    assert g.weight < -0.4


def test_fitted_curvature_only_where_allowed_and_forgets_on_reset(core):
    on = {"value": False}
    f = _fitted(core, allowed=lambda: on["value"])
    for t, v in ((1.0, 0.0), (0.8, 1.0), (0.6, 1.0), (0.4, 0.0)):
        f.update(t, torch.full((2,), v, dtype=torch.float64))
    assert f.weight != 0.0
    linear = core.TaylorForecaster(1)
    for t, v in ((0.6, 1.0), (0.4, 0.0)):
        linear.update(t, torch.full((2,), v, dtype=torch.float64))
    assert torch.equal(f.predict(0.2), linear.predict(0.2))     # not allowed: the linear forecast
    on["value"] = True
    assert not torch.allclose(f.predict(0.2), linear.predict(0.2))
    f.update(0.4, torch.full((2,), 0.5, dtype=torch.float64))    # the same time again: no new fit
    weight = f.weight
    f.update(0.4, torch.full((2,), 0.0, dtype=torch.float64))
    assert f.weight == weight
    f.reset()
    assert f.points == 0 and f.weight == 0.0


def test_taylor_storage_dtype_halves_memory_and_keeps_feature_dtype(core):
    full, half = core.TaylorForecaster(2), core.TaylorForecaster(2, "bfloat16")
    for t in (1.0, 0.8, 0.6):
        v = torch.randn(4, 8) * t
        full.update(t, v)
        half.update(t, v)
    assert half.nbytes() * 2 == full.nbytes()
    assert half.predict(0.5).dtype == torch.float32
    assert torch.allclose(half.predict(0.5), full.predict(0.5), rtol=0.05, atol=0.05)


def test_taylor_does_not_keep_caller_tensor(core):
    f = core.TaylorForecaster(0)
    v = torch.ones(3)
    f.update(1.0, v)
    v += 5  # a block adding its residual in place must not change the history
    assert torch.equal(f.predict(0.5), torch.ones(3))


# ---- verifier -----------------------------------------------------------------------
def test_relative_l1_is_elementwise(core):
    real = torch.tensor([1.0, 2.0, 4.0, 0.5])
    pred = torch.tensor([1.5, 2.0, 3.0, 0.0])
    expected = (0.5 / 1 + 0 + 1 / 4 + 0.5 / 0.5) / 4
    assert core.relative_l1(pred, real) == pytest.approx(expected, rel=1e-6)


def test_relative_norm(core):
    real = torch.tensor([3.0, 4.0])
    pred = torch.tensor([3.0, 4.5])
    assert core.relative_norm(pred, real) == pytest.approx(0.5 / 5.0, rel=1e-6)


def test_threshold_schedule_decays_to_floor(core):
    v = core.Verifier("relative_l1", 7.0, decay=0.3, floor=0.1)
    assert v.threshold_at(0.0) == pytest.approx(7.0)
    assert v.threshold_at(0.5) == pytest.approx(7.0 * 0.3 ** 0.5)
    assert v.threshold_at(1.0) == pytest.approx(2.1)
    v2 = core.Verifier("relative_norm", 0.2, decay=0.01, floor=0.1)
    assert v2.threshold_at(1.0) == pytest.approx(0.1)  # floored


def test_verifier_accept_reject(core):
    v = core.Verifier("relative_norm", 0.1)
    assert v.accepts(0.05, 0.5)
    assert not v.accepts(0.15, 0.5)
    assert not v.accepts(float("nan"), 0.5)
    assert not v.accepts(float("inf"), 0.5)
    assert not core.Verifier("relative_norm", 0.0).accepts(0.0, 0.5)


# ---- policy -------------------------------------------------------------------------
def simulate(core, config, steps, accept=lambda i: True, sigmas=None, **run_args):
    """Drive a SpeculativeRun like the ComfyUI glue does, on a synthetic feature; ``sigmas``:
    the sampler's (given to the run), else 1 - i / steps."""
    run = core.SpeculativeRun(config, steps, sigmas=sigmas, **run_args)
    modes = []
    for i in range(steps):
        t = 1.0 - i / steps if sigmas is None else sigmas[i]
        d = run.begin_evaluation(t, i)
        chunk = run.chunk(["cond"], 1, units_full=4)
        feat = {"f": torch.full((1, 3), t)}
        if d.forecast and chunk.can_forecast(["f"]):
            if d.verify:
                chunk.add_units(1)
                real = torch.ones(1)
                err = accept(i) if isinstance(accept(i), float) else (0.0 if accept(i) else 1e6)
                ok = chunk.verify(real * (1 + err), real)
                if not ok and config.on_reject == "redo":
                    chunk.add_units(4)
                    chunk.record(feat)
                    chunk.finish("R")
                    modes.append("R")
                    continue
                chunk.finish("F" if ok else "R")
                modes.append("F" if ok else "R")
            else:
                chunk.finish("F")
                modes.append("F")
        else:
            chunk.add_units(4)
            chunk.record(feat)
            chunk.finish("C")
            modes.append("C")
    stats = run.close()
    return "".join(modes), stats, run


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


# ---- state, streams, chunks ----------------------------------------------------------
def test_stream_resets_on_shape_dtype_change(core):
    s = core.StreamCache(lambda: core.TaylorForecaster(2))
    s.update(1.0, {"a": torch.ones(2, 3)})
    s.update(0.8, {"a": torch.ones(2, 3)})
    assert s.forecasters["a"].points == 2
    s.update(0.6, {"a": torch.ones(4, 3)})  # new resolution
    assert s.resets == 1 and s.forecasters["a"].points == 1
    s.update(0.5, {"a": torch.ones(4, 3, dtype=torch.float64)})
    assert s.resets == 2
    assert not s.can_predict(["a"], {"a": core.tensor_signature(torch.ones(5, 3))})


def test_chunk_keeps_streams_apart_when_batch_order_changes(core):
    cfg = core.CacheConfig(order=0)
    run = core.SpeculativeRun(cfg, 10)
    run.begin_evaluation(1.0, 0)
    c = run.chunk(["uncond", "cond"], 4, 1)
    c.record({"x": torch.tensor([[0.0], [0.0], [1.0], [1.0]])})
    c.finish("C")
    run.begin_evaluation(0.9, 1)
    c2 = run.chunk(["cond", "uncond"], 4, 1)      # the other order
    assert torch.equal(c2.predict("x"), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    c3 = run.chunk(["cond"], 2, 1)                # cond alone (e.g. cfg 1 or split batches)
    assert torch.equal(c3.predict("x"), torch.tensor([[1.0], [1.0]]))
    assert run.stats.streams == 2


def test_a_weights_change_drops_only_that_streams_history(core):
    """LoRA hook keyframes change the weights of one stream mid-run: its history is
    dropped (no forecast from other weights), the other stream keeps forecasting."""
    run = core.SpeculativeRun(core.CacheConfig(order=0), 10)
    run.begin_evaluation(1.0, 0)
    run.chunk(["cond"], 1, 1, ("lora", 1.0)).record({"x": torch.ones(1, 2)})
    run.chunk(["uncond"], 1, 1).record({"x": torch.zeros(1, 2)})
    run.begin_evaluation(0.9, 1)
    same = run.chunk(["cond"], 1, 1, ("lora", 1.0))
    assert same.can_forecast(["x"]) and run.stats.weight_changes == 0
    changed = run.chunk(["cond"], 1, 1, ("lora", 0.0))
    assert not changed.can_forecast(["x"]) and run.stats.weight_changes == 1
    assert run.chunk(["uncond"], 1, 1).can_forecast(["x"])
    changed.record({"x": torch.full((1, 2), 2.0)})
    assert torch.equal(run.chunk(["cond"], 1, 1, ("lora", 0.0)).predict("x"), torch.full((1, 2), 2.0))
    assert run.stats.weight_changes == 1 and run.stats.to_dict()["weight_changes"] == 1


def test_close_frees_every_tensor(core):
    _, stats, run = simulate(core, core.CacheConfig(threshold=1.0), 10)
    assert run.streams == {} and run.cache_bytes() == 0
    assert stats.peak_cache_bytes > 0 and run.closed


def test_stack_plan_stages(core):
    blocks = [(("double_block", i), ("img", "txt")) for i in range(3)] + \
             [(("single_block", i), ("img",)) for i in range(4)]
    plan = core.StackPlan(blocks)
    names = [s.name for s in plan.stages]
    assert names == ["double_block0", "single_block1", "verify"]
    assert plan.stages[0].keys == tuple(("double_block", i) for i in range(3))
    assert plan.stages[1].keys == tuple(("single_block", i) for i in range(3))
    assert plan.verify_stage.keys == (("single_block", 3),)
    stage, first, last = plan.locate(("double_block", 2))
    assert stage.name == "double_block0" and not first and last
    assert plan.features == ("double_block0.img", "double_block0.txt", "single_block1.img", "verify.img")
    single = core.StackPlan([(("double_block", 0), ("img",))])
    assert [s.name for s in single.stages] == ["verify"]


def test_summary_line_has_the_numbers(core):
    _, stats, _ = simulate(core, core.CacheConfig(threshold=1.0), 20)
    line = stats.summary_line()
    for piece in ("20 steps", "computed", "forecast", "rejected", "compute fraction", "speedup", "MiB"):
        assert piece in line
    assert math.isclose(stats.to_dict()["speedup"], 1 / stats.compute_fraction, rel_tol=1e-3)


# ---- issue 4: more forecasters, presets, paper schedule --------------------------------
def test_hermite_forecast_against_hand_computed_values(core):
    from importlib import import_module
    fc = import_module(core.__name__ + ".forecasters")
    f = fc.HermiteForecaster(order=2, scale=0.5)
    f.update(0.0, torch.tensor([1.0]))
    f.update(1.0, torch.tensor([3.0]))
    f.update(2.0, torch.tensor([7.0]))
    # nodes newest first 2, 1, 0; f[2] = 7, f[2,1] = 4, f[2,1,0] = (4 - 2) / 2 = 1; gap g = 1
    # x = (3 - 2) / 1 = 1, s = 0.5: H1(0.5) = 1, H2(0.5) = 4 * 0.25 - 2 = -1
    # F = 7 + 0.5 * H1 * 4 + 0.25 * H2 * 1 = 7 + 2 - 0.25 = 8.75
    assert f.predict(3.0).item() == pytest.approx(8.75)
    # the probabilists' identity: scale 1/sqrt(2) gives He_1(x) = x, He_2(x) = x^2 - 1
    g = fc.HermiteForecaster(order=2, scale=2 ** -0.5)
    for t, v in ((0.0, 1.0), (1.0, 3.0), (2.0, 7.0)):
        g.update(t, torch.tensor([v]))
    assert g.predict(4.0).item() == pytest.approx(7 + 2 * 4 + (4 - 1) * 1)


def test_foca_corrector_beats_its_predictor_on_a_smooth_trajectory(core):
    from importlib import import_module
    fc = import_module(core.__name__ + ".forecasters")
    times = [1.0, 0.9, 0.78, 0.64]
    target = 0.45
    traj = lambda t: torch.tensor([math.sin(3 * t), math.cos(2 * t) * t])  # noqa: E731
    corrected, predicted = fc.FoCaForecaster(4), fc.FoCaForecaster(4, correct=False)
    for t in times:
        corrected.update(t, traj(t))
        predicted.update(t, traj(t))
    err_c = (corrected.predict(target) - traj(target)).norm()
    err_p = (predicted.predict(target) - traj(target)).norm()
    assert err_c < 0.5 * err_p
    quad = fc.FoCaForecaster(4)
    for t in times:
        quad.update(t, torch.tensor([2 * t * t - t + 0.5], dtype=torch.float64))
    assert quad.predict(target).item() == pytest.approx(2 * target ** 2 - target + 0.5, abs=1e-12)


def test_taylorseer_paper_formula(core):
    from importlib import import_module
    fc = import_module(core.__name__ + ".forecasters")
    f = fc.TaylorSeerForecaster(order=2)
    for step, v in ((0, 0.0), (3, 9.0), (6, 36.0)):   # v = step^2, full every 3 steps
        f.update(step, torch.tensor([v]))
    # factors: F = 36; d1 = (36 - 9) / 3 = 9; d1 at step 3 was (9 - 0) / 3 = 3 -> d2 = (9 - 3) / 3 = 2
    # forecast at step 8 (x = 2): 36 + 9 * 2 + 2 * 4 / 2 = 58 (true value 64: the paper's
    # backward-difference Taylor series is not exact, unlike the Newton form on sigma)
    assert f.predict(8).item() == pytest.approx(58.0)
    newton = core.TaylorForecaster(2)
    for step, v in ((0, 0.0), (3, 9.0), (6, 36.0)):
        newton.update(step, torch.tensor([v], dtype=torch.float64))
    assert newton.predict(8).item() == pytest.approx(64.0)


@pytest.mark.parametrize("accept, expected_full", [(True, 7), (False, 13)])
def test_paper_flux_preset_reproduces_the_reference_schedule(core, accept, expected_full):
    from importlib import import_module
    presets = import_module(core.__name__ + ".presets")
    cfg = presets.resolve_settings("paper_flux", "flux", {"threshold": 7.0}, {})
    assert (cfg.order, cfg.time_axis, cfg.max_forecast_steps, cfg.metric) == (2, "step", 8, "relative_l1")
    modes, stats, _ = simulate(core, cfg, 50, accept=lambda i: accept)
    assert modes.count("C") == expected_full, modes
    if accept:
        assert [i for i, m in enumerate(modes) if m == "C"] == [0, 2, 11, 20, 29, 38, 47]
    else:
        assert [i for i, m in enumerate(modes) if m == "C"] == [0, 2] + list(range(6, 50, 4))


def test_presets_respect_changed_inputs(core):
    from importlib import import_module
    presets = import_module(core.__name__ + ".presets")
    defaults = {"order": 2, "max_forecast_steps": 4, "threshold": 0.15}
    auto_generic = presets.resolve_settings("auto", "generic", dict(defaults), defaults)
    assert auto_generic.max_forecast_steps == presets.FAMILY["generic"]["max_forecast_steps"]
    changed = presets.resolve_settings("auto", "generic", dict(defaults, max_forecast_steps=7), defaults)
    assert changed.max_forecast_steps == 7              # the user's change wins
    custom = presets.resolve_settings("custom", "generic", dict(defaults), defaults)
    assert custom.max_forecast_steps == 4
    with pytest.raises(ValueError, match="preset"):
        presets.resolve_settings("nope", "flux", {}, {})


def test_methods_pick_their_forecasters(core):
    from importlib import import_module
    fc = import_module(core.__name__ + ".forecasters")
    kinds = {m: type(fc.make_forecaster(core.CacheConfig(method=m))).__name__
             for m in ("taylorseer", "reuse", "hicache", "foca")}
    assert kinds == {"taylorseer": "TaylorForecaster", "reuse": "TaylorForecaster",
                     "hicache": "HermiteForecaster", "foca": "FoCaForecaster"}
    assert fc.make_forecaster(core.CacheConfig(method="reuse")).order == 0
    assert type(fc.make_forecaster(core.CacheConfig(forecaster="foca"))).__name__ == "FoCaForecaster"
    assert type(fc.make_forecaster(core.CacheConfig(time_axis="step"))).__name__ == "TaylorSeerForecaster"
    fitted = core.CacheConfig(order=1, fitted_curvature=True)
    assert type(fc.make_forecaster(fitted)).__name__ == "FittedCurvatureForecaster"
    assert type(fc.make_forecaster(core.CacheConfig(order=2, fitted_curvature=True))).__name__ == "TaylorForecaster"


# ---- ClusCa building blocks ---------------------------------------------------------------
def _clustering(core):
    from importlib import import_module
    return import_module(core.__name__ + ".clustering")


def test_kmeans_recovers_planted_clusters(core):
    cl = _clustering(core)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 10
    truth = torch.arange(5).repeat_interleave(40)
    x = centers[truth] + torch.randn(200, 16, generator=g) * 0.3
    perm = torch.randperm(200, generator=g)
    x, truth = x[perm][None], truth[perm]
    labels, cent = cl.kmeans(x, 5, generator=torch.Generator().manual_seed(1), iters=20)
    labels = labels[0]
    # every planted cluster maps to exactly one found cluster, and vice versa
    pairs = {(int(t), int(l)) for t, l in zip(truth, labels)}
    assert len(pairs) == 5 and len({l for _, l in pairs}) == 5
    # warm start from the found centroids converges at once to the same partition
    again, _ = cl.kmeans(x, 5, init=cent, iters=1)
    assert torch.equal(again[0], labels)


def test_gamma_zero_leaves_non_representatives_untouched(core):
    cl = _clustering(core)
    anchor = torch.randn(2, 30, 8)
    labels = torch.randint(0, 4, (2, 30), generator=torch.Generator().manual_seed(2))
    idx = cl.pick_representatives(labels, 4, torch.Generator().manual_seed(3))
    for r in range(2):
        for c in range(4):
            if (labels[r] == c).any():
                assert labels[r, idx[r, c]] == c          # a member of its cluster
    fresh = torch.randn(2, 4, 8)
    out = cl.propagate(anchor, labels, idx, fresh, gamma=0.0)
    touched = torch.zeros(2, 30, dtype=torch.bool)
    touched.scatter_(1, idx, True)
    assert torch.equal(out[~touched], anchor[~touched])
    assert torch.equal(torch.gather(out, 1, idx[..., None].expand(-1, -1, 8)), fresh)
    half = cl.propagate(anchor, labels, idx, fresh, gamma=0.5)
    member = (~touched[0]).nonzero()[0, 0]
    expected = 0.5 * fresh[0, labels[0, member]] + 0.5 * anchor[0, member]
    assert torch.allclose(half[0, member], expected)


def test_error_prediction_refuses_doomed_forecasts_and_skips_safe_probes(core):
    """Verification errors 0.1 at d = 1 and 0.4 at d = 2 grow like d^2, so d = 3 is
    predicted at 0.4 * (3/2)^2 = 0.9 > threshold 0.5: computed at once, no wasted probe.
    The next run's first forecast (predicted 0.1 < 0.5 * 0.5) skips its probe."""
    cfg = core.CacheConfig(threshold=0.5, warmup_steps=1, max_forecast_steps=8, final_full_steps=0,
                           order=1, skip_verify_below=0.5)
    pol = core.Policy(cfg, 20)
    pol.record_full()
    d1 = pol.decide(2, 0.5)                 # d = 1, nothing known: probe
    assert d1.forecast and d1.verify
    pol.record_error(0.1)
    pol.record_forecast()
    d2 = pol.decide(3, 0.4)                 # predicted 0.1 * 2^2 = 0.4: not safe enough to skip
    assert d2.forecast and d2.verify
    pol.record_error(0.4)
    pol.record_forecast()
    d3 = pol.decide(4, 0.3)
    assert not d3.forecast and d3.reason == "predicted_reject"
    pol.record_full()
    d1b = pol.decide(5, 0.2)
    assert d1b.forecast and not d1b.verify and d1b.reason == "predicted_accept"


# ---- back-off: the cache never costs more than running without it -----------------------
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
    presets = import_module(core.__name__ + ".presets")
    cfg = presets.resolve_settings("paper_flux", "flux", {"threshold": 7.0}, {})
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
    assert run.stats.errors[-1][2] == pytest.approx(0.2, rel=1e-5)
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


# ---- speed target: the threshold steered to a compute budget ---------------------------
def simulate_growing_errors(core, config, steps, scale, units_full=20):
    """A run whose forecast at distance d from the last computed step has verification
    error scale * d^2 (how Taylor forecasts degrade), on a 20-block model (a probe costs
    1/20 of a step)."""
    run = core.SpeculativeRun(config, steps)
    for i in range(steps):
        d = run.begin_evaluation(1.0 - i / steps, i)
        chunk = run.chunk(["cond"], 1, units_full=units_full)
        feat = {"f": torch.full((1, 3), float(i))}
        if d.forecast and chunk.can_forecast(["f"]):
            if d.verify:
                chunk.add_units(1)
                err = scale * (run.policy.forecasts_since_full + 1) ** 2
                real = torch.ones(1, 4)
                if not chunk.verify(real * (1 + err), real):
                    chunk.add_units(units_full)
                    chunk.record(feat)
                    chunk.finish("R")
                    continue
            chunk.finish("F")
        else:
            chunk.add_units(units_full)
            chunk.record(feat)
            chunk.finish("C")
    return run.close()


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


def _shifted_sigmas(steps, shift=3.0):
    """FLUX-like sigmas: small steps near sigma 1, big ones near 0."""
    t = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * x / (1.0 + (shift - 1.0) * x) for x in t]


def test_plan_schedule_spends_exactly_its_calls_where_the_steps_are_big(core):
    from importlib import import_module
    target = import_module(core.__name__ + ".target")
    sigmas = _shifted_sigmas(50)
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
    assert target.place_cond_only([0, 12, 21, 27]) == 6 and target.place_cond_only([27, 0, 9]) == 4
    assert target.place_cond_only([0, 1, 9]) is None and target.place_cond_only([0]) is None


def _run_planned(core, config, sigmas, **run_args):
    """``simulate`` over the sampler's ``sigmas`` (every probe passes); the run's stats."""
    return simulate(core, config, len(sigmas) - 1, sigmas=sigmas, **run_args)[1]


def test_a_planned_target_computes_its_plan_and_nothing_else(core):
    """From 4x on (target_schedule auto) a speed target computes exactly the planned steps,
    lands within half a call of its target and says so; below 4x, or asked to, the threshold
    loop places the calls; steps outside the window are computed and held by the plan."""
    sigmas = _shifted_sigmas(50)
    stats = _run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), sigmas)
    computed = [i for i, c in enumerate(stats.timeline) if c == "C"]
    assert computed == stats.planned_steps and len(computed) == 8 and stats.verified == 0
    assert stats.compute_fraction == pytest.approx(8 / 50) and not stats.target_missed
    d = stats.to_dict()
    assert d["target_schedule"] == "planned" and d["planned_steps"] == computed
    assert "planned: 8 calls at steps 0, " in stats.summary_line() and "..." not in stats.summary_line()
    long_run = _run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=4.0), _shifted_sigmas(200))
    assert len(long_run.planned_steps) == 50 and ", ...)" in long_run.summary_line()
    assert long_run.summary_line().count(", ") < 30 and "50 calls at steps 0, " in long_run.summary_line()
    for config in (core.CacheConfig(threshold=0.1, target_speedup=3.0),
                   core.CacheConfig(threshold=0.1, target_speedup=6.0, target_schedule="adaptive")):
        adaptive = _run_planned(core, config, sigmas)
        assert adaptive.planned_steps == [] and adaptive.to_dict()["target_schedule"] == "adaptive"
    assert core.CacheConfig(target_speedup=2.0, target_schedule="planned").plans_target
    assert not core.CacheConfig(target_schedule="planned").plans_target          # no target, no plan
    with pytest.raises(ValueError, match="target_schedule"):
        core.CacheConfig(target_speedup=6.0, target_schedule="even")
    # a window (sigma 0.9 down to 0.3): the steps outside it are computed, inside the plan holds
    windowed = _run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), sigmas,
                            start_time=0.9, end_time=0.3)
    outside = [i for i in range(50) if not (0.9 >= sigmas[i] > 0.3)]
    computed = [i for i, c in enumerate(windowed.timeline) if c == "C"]
    assert set(outside) <= set(computed) and computed == windowed.planned_steps and windowed.verified == 0
    assert windowed.target_missed          # the window alone spends more than 1/6
    # a flow model's output forecast in noise space cannot be served at 1 - sigma < 0.001: such a
    # step is computed, and counted in the plan (8 calls still)
    near_one = [1.0, 0.9995] + _shifted_sigmas(48)[1:]
    noise = _run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0, output_space="noise"), near_one)
    assert 1 in noise.planned_steps and len(noise.planned_steps) == 8 and noise.timeline[1] == "C"
    assert noise.verified == 0 and [i for i, c in enumerate(noise.timeline) if c == "C"] == noise.planned_steps
    assert 1 not in _run_planned(core, core.CacheConfig(threshold=0.1, target_speedup=6.0), near_one).planned_steps


def _run_with_cond_only(core, config, sigmas, batched: bool):
    """A planned run driven as the glue drives a CFG run (cond and uncond in one chunk, or one
    chunk each): at a cond-only step only cond's chunk runs and the run books half a call."""
    steps = len(sigmas) - 1
    run = core.SpeculativeRun(config, steps, sigmas=sigmas, cond_only=True)
    decisions = []
    for i in range(steps):
        d = run.begin_evaluation(sigmas[i], i)
        decisions.append(d)
        layout = [["cond"]] if d.cond_only else ([["cond", "uncond"]] if batched else [["cond"], ["uncond"]])
        for keys in layout:
            chunk = run.chunk(keys, len(keys), units_full=1)
            if d.forecast and chunk.can_forecast(["out"]):
                chunk.finish("F")
            else:
                chunk.add_units(1)
                chunk.record({"out": torch.full((len(keys), 3), float(sigmas[i]))})
                chunk.finish("C")
        if d.cond_only:
            run.book_partial_evaluation(0.5)
    return run.close(), decisions


def test_a_planned_target_ends_its_budget_in_a_cond_only_step(core):
    """28 steps at 6x with cond and uncond: 4 calls and one cond-only step (4.5 calls, 6.2x)
    instead of 5 calls (5.6x); it is booked as half a call whether ComfyUI batches cond and
    uncond or runs them apart, and it sits in the middle of the first run of forecasts.
    Without uncond (cond_only False) the plan rounds to whole calls as before."""
    sigmas = _shifted_sigmas(28)
    config = core.CacheConfig(threshold=0.1, target_speedup=6.0)
    for batched in (True, False):
        stats, decisions = _run_with_cond_only(core, config, sigmas, batched)
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
    assert not any(d.cond_only for d in _run_with_cond_only(
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


def _engine_module(core, name):
    from importlib import import_module
    return import_module(f"{core.__name__}.{name}")


def test_token_pruning_picks_the_most_moved_tokens_and_serves_the_rest_with_the_drift(core):
    tp = _engine_module(core, "token_pruning")
    gather_tokens = _engine_module(core, "tokens").gather_tokens
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


# ---- SpecDiff token tiers -------------------------------------------------------------
def test_attention_received_is_the_softmax_column_mean_over_heads_and_queries(core):
    tt = _engine_module(core, "token_tiers")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    probs = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1)            # head dim 4: scale 1/2
    got = tt.attention_received(q, k, slice(2, 7), queries=64)        # every query row used
    assert torch.allclose(got, probs.mean((1, 2))[:, 2:], atol=1e-6)
    full = tt.attention_received(q, k, slice(0, 7), queries=64)
    assert torch.allclose(full.sum(-1), torch.ones(2), atol=1e-6)    # each query spreads 1 over the keys
    sampled = tt.attention_received(q, k, slice(0, 7), queries=3, generator=g)
    assert sampled.shape == (2, 7) and torch.allclose(sampled.sum(-1), torch.ones(2), atol=1e-6)


def test_token_tiers_split_by_history_plus_look_ahead_and_combine(core):
    tt = _engine_module(core, "token_tiers")
    change = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    history = torch.tensor([[8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    score = tt.importance(history, change)
    assert torch.allclose(score, change / 1.0 + history / 1.75)
    assert torch.equal(tt.importance(None, change), change)           # no history yet: look ahead alone
    assert torch.equal(tt.importance(history[:, :4], change), change)  # stale shape: ignored
    compute_idx, reuse = tt.split(score, compute=0.25, reuse=0.25)
    assert compute_idx.shape == (1, 2) and compute_idx[0, 0] == 0     # the most attended token first
    assert reuse.sum() == 2 and bool(reuse[0, 7]) and not bool(reuse[0, 0])
    forecast, anchor = torch.full((1, 8, 3), 2.0), torch.full((1, 8, 3), 1.0)
    fresh = torch.full((1, 2, 3), 5.0)
    out = tt.combine(forecast, anchor, compute_idx, fresh, reuse)
    tiers = out[0, :, 0].tolist()
    assert tiers.count(5.0) == 2 and tiers.count(1.0) == 2 and tiers.count(2.0) == 4
    assert tiers[0] == 5.0 and tiers[7] == 1.0
    none_idx, none_reuse = tt.split(score, compute=0.0, reuse=0.0)
    assert torch.equal(tt.combine(forecast, anchor, none_idx, None, none_reuse), forecast)


def test_token_tier_fractions_are_validated(core):
    for bad in (dict(token_compute=-0.1), dict(token_reuse=1.5), dict(token_compute=0.6, token_reuse=0.6)):
        with pytest.raises(ValueError, match="token_compute"):
            core.CacheConfig(**bad)
    assert core.CacheConfig(token_compute=0.1).block_level and not core.CacheConfig().block_level


def test_noise_space_forecasts_a_flow_velocity_exactly_when_the_noise_it_implies_holds(core):
    """Rectified flow: x = (1 - s) x0 + s eps, v = eps - x0. With eps fixed and x0 moving
    quadratically in sigma, v is quadratic (an order-1 forecast of it misses) while the noise
    v implies is constant: forecast in noise space and turned back with the step's real x,
    the velocity comes out exact. Both directions are exact inverses at any sigma below 1."""
    space = _engine_module(core, "output_space")
    g = torch.Generator().manual_seed(0)
    eps, a, b = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    x0 = lambda s: a + b * s * s  # noqa: E731
    x = lambda s: (1 - s) * x0(s) + s * eps  # noqa: E731
    v = lambda s: eps - x0(s)  # noqa: E731
    in_model, in_noise = core.TaylorForecaster(1), core.TaylorForecaster(1)
    for s in (0.9, 0.7):
        in_model.update(s, v(s))
        in_noise.update(s, space.noise_from_velocity(v(s), x(s), s))
    target = 0.5
    from_noise = space.velocity_from_noise(in_noise.predict(target), x(target), target)
    assert torch.allclose(from_noise, v(target), atol=1e-5)
    assert (in_model.predict(target) - v(target)).abs().max() > 0.05
    out = torch.randn(3, 5, generator=g)
    xs = torch.randn(3, 5, generator=g)
    assert torch.allclose(space.velocity_from_noise(space.noise_from_velocity(out, xs, 0.3), xs, 0.3), out,
                          atol=1e-6)
    # near sigma = 1 the way back divides by almost nothing: those steps are not forecast
    assert space.can_forecast_noise(0.5) and not space.can_forecast_noise(0.9995)


# ---- lookback acceptance: each computed step measures the output forecast's error --------
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


def _lookback_run(core, config, trajectory, steps=20):
    """Drive a lookback run like the ComfyUI glue: forecast steps serve the forecast, computed
    steps measure the forecast of their output first, then record it."""
    run = core.SpeculativeRun(config, steps)
    served = []
    for i in range(steps):
        t = 1.0 - i / steps
        d = run.begin_evaluation(t, i)
        chunk = run.chunk(["cond", "uncond"], 2, units_full=1)
        if d.forecast and chunk.can_forecast(["out"]):
            served.append(chunk.predict("out"))
            chunk.finish("F")
            continue
        real = trajectory(t)
        chunk.add_units(1)
        if chunk.can_forecast(["out"]):
            chunk.look_back(chunk.predict("out"), real)
        chunk.record({"out": real})
        chunk.finish("C")
        served.append(real)
    return run.close(), served


def test_lookback_run_forecasts_a_straight_trajectory_and_computes_a_bending_one(core):
    base = torch.linspace(1, 2, 8).reshape(2, 4)
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.01, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=4)
    stats, served = _lookback_run(core, cfg, lambda t: base * (1 + t))
    assert stats.acceptance == "lookback" and stats.verified == 0 and stats.looked_back > 0
    # (the first measurement, at step 1, is of a forecast from one point: the reuse error)
    assert stats.forecast >= 10 and all(e[2] < 1e-5 for e in stats.errors[1:]) and stats.errors[0][2] > 0.01
    for i, out in enumerate(served):            # a linear forecast of a straight line is exact
        assert torch.allclose(out, base * (2 - i / 20), atol=1e-5)
    assert stats.to_dict()["looked_back"] == stats.looked_back
    # A trajectory that bends sharply at every step: every measured error is far over 1 %.
    stats, _ = _lookback_run(core, cfg, lambda t: base * math.cos(40 * t))
    assert stats.forecast <= 1 and stats.compute_fraction >= 0.95
    assert min(e[2] for e in stats.errors) > 0.01 and not any(e[4] for e in stats.errors)


def test_lookback_takes_the_worst_stream(core):
    """cond follows a line, uncond bends: the measured error is the uncond's."""
    cfg = core.CacheConfig(acceptance="lookback", threshold=0.01, order=1, warmup_steps=3,
                           final_full_steps=1, max_forecast_steps=4)
    line = torch.ones(1, 4)

    def trajectory(t):
        return torch.cat([line * (1 + t), line * math.cos(40 * t)])
    stats, _ = _lookback_run(core, cfg, trajectory)
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
    assert run.stats.errors[-1][2] == float("inf") and not run.stats.errors[-1][4]


# ---- trajectory correction: an Euler step carries what interpolation says the forecasts missed ----
def _sample(correction, forecast_steps, sigmas, x0_of_sigma, noise):
    x = noise.clone()
    before_last = None
    computed = []                        # (sigma, implied noise) of the computed steps
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        before_last = x
        if i in forecast_steps:
            (t1, e1), (t2, e2) = computed[-2:]
            eps = e2 + (e2 - e1) * (s - t2) / (t2 - t1)
            denoised = x - s * (eps - x) / (1.0 - s)
        else:
            denoised = x0_of_sigma(s)
            computed.append((s, x + (1.0 - s) * (x - denoised) / s))
        if correction is not None:
            denoised = correction.observe(x, denoised, s, s_next, computed=i not in forecast_steps)
        x = x + (s_next - s) * (x - denoised) / s
    return before_last


def test_trajectory_correction_brings_forecast_runs_back_to_the_uncached_trajectory(pack):
    from importlib import import_module
    correction_module = import_module(f"{pack.__name__}.cache_core.correction")
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    x0_of_sigma = lambda s: a + b * s + 3.0 * c * s * s            # a denoiser that does not read x
    noise = torch.randn(4, 8, 8, dtype=torch.float64)
    sigmas = torch.linspace(0.98, 0.0, 21, dtype=torch.float64)
    forecasts = {3, 4, 6, 7, 8, 10, 11, 13, 14, 15, 17}
    uncached = _sample(None, set(), sigmas, x0_of_sigma, noise)
    plain = _sample(None, forecasts, sigmas, x0_of_sigma, noise)
    fix = correction_module.TrajectoryCorrection(flow=True, degree=2)
    corrected = _sample(fix, forecasts, sigmas, x0_of_sigma, noise)
    error = lambda x: float((x - uncached).norm() / uncached.norm())
    assert fix.active and fix.corrected == 5          # every computed step after a forecast streak
    assert error(plain) > 1e-3 and error(corrected) < 0.35 * error(plain)     # 0.29 when written
    # without forecasts it never changes a thing, and a run with nothing to correct stays exact
    exact = correction_module.TrajectoryCorrection(flow=True, degree=2)
    assert torch.equal(_sample(exact, set(), sigmas, x0_of_sigma, noise), uncached) and exact.corrected == 0
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
