"""Engine tests (cache_core, no ComfyUI): what the node's inputs mean (cache_core/recipe.py)."""

from __future__ import annotations

from importlib import import_module

import pytest

# A value for every engine option that differs from what any mode or preset would pick.
SET = {"method": "taylorseer", "forecaster": "hicache", "order": 3, "warmup_steps": 5, "max_forecast_steps": 5,
       "final_full_steps": 2, "on_reject": "next", "metric": "relative_l1", "threshold_decay": 0.5,
       "threshold_floor": 0.01, "storage_dtype": "bfloat16", "granularity": "block", "clusters": 8, "gamma": 0.1,
       "step_weighting": False, "max_overhead": 0.1, "target_schedule": "adaptive"}


@pytest.fixture(scope="module")
def recipe(core):
    return import_module(core.__name__ + ".recipe")


@pytest.fixture(scope="module")
def families(core):
    return import_module(core.__name__ + ".families")


def test_every_option_has_a_test_value(recipe):
    assert set(SET) == set(recipe.ENGINE_OPTIONS)


@pytest.mark.parametrize("mode", ["auto", "probe", "speed_target", "paper_flux", "paper_hunyuan_video"])
@pytest.mark.parametrize("name", sorted(SET))
def test_a_set_option_is_honoured_or_named_in_every_mode(recipe, families, mode, name):
    """Whatever the mode, an option the user set is in the run's config, or the console line
    names it (the paper modes replace the papers' settings, and say which)."""
    for family in (families.BY_NAME["flux"], families.GENERIC):
        r = recipe.resolve(mode, 0.5, 0.0, 1.0, family, {name: SET[name]})
        if getattr(r.config, name) != SET[name]:
            assert mode.startswith("paper_") and name in r.description, (name, r.description)


def test_explicit_values_equal_to_the_old_defaults_are_choices(recipe, families):
    """order 2 and step weighting off, the config's own defaults, set explicitly, change auto
    (whose own choices are order 1 and weighting on) and speed_target; left unset they do not."""
    flux = families.BY_NAME["flux"]
    auto = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {}).config
    assert (auto.order, auto.step_weighting, auto.acceptance) == (1, True, "lookback")
    chosen = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"order": 2, "step_weighting": False}).config
    assert (chosen.order, chosen.step_weighting, chosen.acceptance) == (2, False, "lookback")
    target = recipe.resolve("speed_target", 0.5, 0.0, 1.0, flux, {"order": 2, "warmup_steps": 3}).config
    assert (target.order, target.warmup_steps, target.fitted_curvature) == (2, 3, False)
    custom = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"preset": "custom", "order": 2}).config
    assert custom.order == 2


def test_options_a_mode_cannot_use_are_named(recipe, families):
    flux = families.BY_NAME["flux"]
    r = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"target_speedup": 7.0})
    assert "target_speedup 7 is ignored" in r.description
    r = recipe.resolve("probe", 0.5, 0.0, 1.0, flux, {"trajectory_correction": True})
    assert "trajectory_correction" in r.description
    r = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"granularity": "block"})
    assert r.config.acceptance == "probe" and "per-step probe" in r.description
    with pytest.raises(ValueError, match="unknown inputs"):
        recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"no_such_option": 1})
    with pytest.raises(ValueError, match="preset"):
        recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"preset": "no_such_family"})
    with pytest.raises(ValueError, match="order"):
        recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"order": 9})


def test_the_speed_slider_maps_to_the_threshold(recipe):
    """0 = off; every 0.05 of the slider's travel moves the threshold by at least 10 %, within
    0.02 .. 1.0 for the default metric."""
    base = recipe.BASE_THRESHOLD["relative_norm"]
    values = [recipe.speed_to_threshold(s / 100, base) for s in range(0, 101, 5)]
    assert values[0] == 0.0 and values[10] == pytest.approx(0.1) and values[-1] == pytest.approx(1.0)
    assert all(b > 1.1 * a for a, b in zip(values[1:], values[2:]))


def test_an_edit_region_twin_only_for_lookback_recipes(recipe, families):
    flux = families.BY_NAME["flux"]
    auto = recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {})
    assert auto.config_with_edit_region is not None and auto.config_with_edit_region.acceptance == "probe"
    assert recipe.resolve("probe", 0.5, 0.0, 1.0, flux, {}).config_with_edit_region is None
    assert recipe.resolve("auto", 0.5, 0.0, 1.0, flux, {"memory_budget_mb": 300}).memory_budget_mb == 300


def test_a_legacy_graph_migrates_to_options_it_set(recipe, families):
    migrated = recipe.migrate_legacy({"order": 3, "threshold": 0.3, "storage_dtype": "auto"})
    assert migrated["mode"] == "probe" and migrated["options"] == {"order": 3, "threshold": 0.3}
    legacy = recipe.legacy_config(families.BY_NAME["flux"], {"order": 3, "threshold": 0.3})
    r = recipe.resolve(migrated["mode"], migrated["speed"], 0.0, 1.0, families.BY_NAME["flux"], migrated["options"])
    assert r.config == legacy


@pytest.mark.parametrize("kwargs, name", [({"speed": float("nan")}, "speed"), ({"speed": float("inf")}, "speed"),
                                          ({"speed": 1.5}, "speed"), ({"start_percent": float("nan")}, "start_percent"),
                                          ({"end_percent": float("-inf")}, "end_percent")])
def test_the_main_nodes_numbers_are_refused_by_name_when_not_finite_or_out_of_range(recipe, families, kwargs, name):
    args = dict({"speed": 0.5, "start_percent": 0.0, "end_percent": 1.0}, **kwargs)
    with pytest.raises(ValueError, match=name):
        recipe.resolve("auto", args["speed"], args["start_percent"], args["end_percent"], families.BY_NAME["flux"], {})


@pytest.mark.parametrize("name", ["threshold", "memory_budget_mb", "target_speedup", "order"])
def test_an_options_value_that_is_not_finite_is_refused_by_name(recipe, families, name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        recipe.resolve("auto", 0.5, 0.0, 1.0, families.BY_NAME["flux"], {name: float("nan")})
