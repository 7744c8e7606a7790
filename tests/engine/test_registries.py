"""Engine tests (cache_core, no ComfyUI): the family registry and the forecaster registry."""

from __future__ import annotations

from importlib import import_module

import pytest
import torch


@pytest.fixture(scope="module")
def families(core):
    return import_module(core.__name__ + ".families")


def test_a_block_level_family_never_gets_the_output_level_preset(core, families):
    recipe = import_module(core.__name__ + ".recipe")
    presets = import_module(core.__name__ + ".presets")
    for fam in families.FAMILIES:
        probe = recipe.resolve("probe", 0.5, 0.0, 1.0, fam, {}).config
        if fam.block_level:
            assert probe.max_forecast_steps == core.CacheConfig().max_forecast_steps, fam.name
            assert fam.name in presets.PRESETS, fam.name
        else:
            assert fam.tuned == families.OUTPUT_LEVEL_PRESET and fam.name not in presets.PRESETS, fam.name
    assert families.GENERIC.tuned == families.OUTPUT_LEVEL_PRESET and "generic" in presets.PRESETS


def test_each_class_has_one_entry_and_capabilities_are_known(families):
    classes = [c for fam in families.FAMILIES for c in fam.classes]
    assert len(classes) == len(set(classes))
    names = [fam.name for fam in families.FAMILIES]
    assert len(names) == len(set(names)) and "generic" not in names
    known = {families.BLOCK_GRANULARITY, families.EDIT_REGION}
    for fam in families.FAMILIES:
        assert fam.capabilities <= known, fam.name
        assert fam.block_level or not fam.capabilities, fam.name


def test_an_unknown_model_is_generic(families):
    assert families.family_of(torch.nn.Linear(2, 2)) is families.GENERIC


def test_forecasters_are_registered_by_name_with_what_the_node_needs(core):
    fc = import_module(core.__name__ + ".forecasters")
    assert fc.FORECASTERS == ("taylor", "hicache", "foca", "spectrum")
    for name in fc.FORECASTERS:
        cls = fc.forecaster_class(name)
        assert cls.name == name and cls.tooltip.startswith(name)
        config = core.CacheConfig(forecaster=name)
        assert isinstance(fc.make_forecaster(config), fc.Forecaster)
        assert fc.history_points(config) >= 1
    with pytest.raises(ValueError, match="forecaster must be one of"):
        core.CacheConfig(forecaster="nope")


def test_a_new_forecaster_is_one_registered_class(core):
    """Registering a class makes its name valid in the config, buildable and counted in the
    memory estimate, with nothing else touched."""
    fc = import_module(core.__name__ + ".forecasters")
    memory_plan = import_module(core.__name__ + ".memory_plan")

    class LastValue(fc.TaylorForecaster):
        name = "last_value"
        tooltip = "last_value (the newest computed value)"

        @classmethod
        def for_config(cls, config, curvature_allowed=None):
            return cls(0, config.storage_dtype)

        @classmethod
        def history_points(cls, config):
            return 1

    fc.register(LastValue)
    try:
        config = core.CacheConfig(forecaster="last_value")
        f = fc.make_forecaster(config)
        f.update(1.0, torch.ones(3))
        assert torch.equal(f.predict(0.5), torch.ones(3))
        plan = core.StackPlan([(("double_block", 0), ("img",))])
        one = memory_plan.estimate_cache_bytes(plan, 8, [2, 2], config, (1, 4, 8, 8), 0, 1, 4)
        two = memory_plan.estimate_cache_bytes(plan, 8, [2, 2], core.CacheConfig(order=1), (1, 4, 8, 8), 0, 1, 4)
        assert 2 * one == two
        with pytest.raises(ValueError, match="registered twice"):
            fc.register(LastValue)
    finally:
        fc.REGISTRY.pop("last_value")
