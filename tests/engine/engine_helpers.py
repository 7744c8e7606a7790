"""What the engine tests share: polynomial features, a sampler loop over the engine alone, runs of its pieces."""


import torch


def poly(coeffs, t, shape=(3, 5)):
    base = torch.linspace(-1, 1, shape[0] * shape[1], dtype=torch.float64).reshape(shape)
    return sum(c * (t ** k) * (base + k) for k, c in enumerate(coeffs))


def fitted_curvature_forecaster(core, **kw):
    from importlib import import_module
    return import_module(core.__name__ + ".forecasters").FittedCurvatureForecaster(**kw)


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


def clustering_module(core):
    from importlib import import_module
    return import_module(core.__name__ + ".clustering")


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


def shifted_sigmas(steps, shift=3.0):
    """FLUX-like sigmas: small steps near sigma 1, big ones near 0."""
    t = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * x / (1.0 + (shift - 1.0) * x) for x in t]


def run_planned(core, config, sigmas, **run_args):
    """``simulate`` over the sampler's ``sigmas`` (every probe passes); the run's stats."""
    return simulate(core, config, len(sigmas) - 1, sigmas=sigmas, **run_args)[1]


def run_with_cond_only(core, config, sigmas, batched: bool):
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


def engine_module(core, name):
    from importlib import import_module
    return import_module(f"{core.__name__}.{name}")


def lookback_run(core, config, trajectory, steps=20):
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


def corrected_euler_sample(correction, forecast_steps, sigmas, x0_of_sigma, noise):
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
