"""Engine tests (cache_core, no ComfyUI): presets and papers."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import simulate


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
    recipe = import_module(core.__name__ + ".recipe")
    cfg = recipe.preset_config("paper_flux", recipe.GENERIC, {}, fixed={"threshold": 7.0})
    assert (cfg.order, cfg.time_axis, cfg.max_forecast_steps, cfg.metric) == (2, "step", 8, "relative_l1")
    modes, stats, _ = simulate(core, cfg, 50, accept=lambda i: accept)
    assert modes.count("C") == expected_full, modes
    if accept:
        assert [i for i, m in enumerate(modes) if m == "C"] == [0, 2, 11, 20, 29, 38, 47]
    else:
        assert [i for i, m in enumerate(modes) if m == "C"] == [0, 2] + list(range(6, 50, 4))


def test_presets_fill_only_what_the_user_left_unset(core):
    from importlib import import_module
    recipe = import_module(core.__name__ + ".recipe")
    families = import_module(core.__name__ + ".families")
    auto_generic = recipe.preset_config("auto", families.GENERIC, {})
    assert auto_generic.max_forecast_steps == families.OUTPUT_LEVEL_PRESET["max_forecast_steps"]
    changed = recipe.preset_config("auto", families.GENERIC, {"max_forecast_steps": 7})
    assert changed.max_forecast_steps == 7              # the user's choice wins
    # a value equal to the default is still a choice: the preset does not replace it
    assert recipe.preset_config("auto", families.GENERIC, {"max_forecast_steps": 8}).max_forecast_steps == 8
    custom = recipe.preset_config("custom", families.GENERIC, {})
    assert custom.max_forecast_steps == core.CacheConfig().max_forecast_steps
    with pytest.raises(ValueError, match="preset"):
        recipe.preset_config("nope", families.GENERIC, {})


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
