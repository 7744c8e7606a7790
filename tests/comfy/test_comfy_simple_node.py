"""The main Speculative Cache node (mode, one speed slider, start/end), its Options node,
the speed target, and graphs saved with the legacy 19-input node; through ComfyUI's real
sampler on ComfyUI's own model classes."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import config_of, options, simple

pytestmark = pytest.mark.comfy

LEGACY_WORKFLOW = comfy_env.PACK_ROOT / "tests" / "data" / "legacy_flux_workflow.json"


@pytest.fixture(scope="module")
def inputs_mod(spec_nodes):
    """The recipe (what the inputs mean) and the frozen inputs of older graphs."""
    recipe = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.recipe")
    legacy_inputs = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.legacy_inputs")
    recipe.LEGACY_ORDER = legacy_inputs.LEGACY_ORDER
    return recipe


@pytest.fixture(scope="module")
def family(spec_nodes):
    return importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.families").BY_NAME


def resolve(recipe, family, name, mode, speed, chosen):
    r = recipe.resolve(mode, speed, 0.0, 1.0, family[name], chosen)
    return r.config, r.description


@pytest.fixture(scope="module")
def flux(spec_nodes):
    return tm.build("flux", seed=3)


def test_main_node_has_six_inputs_and_a_slider_that_does_something_everywhere(spec_nodes, inputs_mod):
    info = spec_nodes.SpeculativeCacheSimple.GET_NODE_INFO_V1()
    assert info["display_name"] == "Speculative Cache"
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    assert list(required) == ["model", "mode", "speed", "start_percent", "end_percent"]
    assert list(optional) == ["options"] and optional["options"][0] == "SPECULATIVE_CACHE_OPTIONS"
    speed = required["speed"][1]
    assert (speed["min"], speed["max"], speed["default"], speed["display"]) == (0.0, 1.0, 0.5, "slider")
    assert all(spec[1].get("tooltip") for name, spec in required.items() if name != "model")
    # every 0.05 of the slider's travel moves the threshold by at least 10 %, within 0.02 .. 1.0
    base = inputs_mod.BASE_THRESHOLD["relative_norm"]
    assert base == 0.1
    values = [inputs_mod.speed_to_threshold(s / 100, base) for s in range(0, 101, 5)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.02 * (0.1 / 0.02) ** 0.1)
    assert values[10] == pytest.approx(0.1) and values[-1] == pytest.approx(1.0)
    assert all(b > 1.1 * a for a, b in zip(values[1:], values[2:]))
    # the options node carries everything else, each with a tooltip and an explicit auto as its default
    opt = spec_nodes.SpeculativeCacheOptions.GET_NODE_INFO_V1()
    assert opt["output"] == ["SPECULATIVE_CACHE_OPTIONS"]
    required = opt["input"]["required"]
    assert set(required) == set(inputs_mod.OPTION_DEFAULTS)
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert all(spec[1]["default"] in ("auto", -1, 0, 1.0) for spec in required.values()), required
    # an Options node left at auto sets nothing
    assert options(spec_nodes, **{k: spec[1]["default"] for k, spec in required.items()}) == {}
    # every value a number input offers is one the node accepts (target_speedup: 1 = from the slider)
    target = required["target_speedup"][1]
    assert (target["min"], target["max"]) == (1.0, 20.0)
    assert options(spec_nodes, target_speedup=1.0) == {} and options(spec_nodes, target_speedup=1.1) == {
        "target_speedup": 1.1}


def test_probe_defaults_are_the_legacy_nodes_defaults_and_auto_looks_back(spec_nodes, flux, inputs_mod, family):
    legacy = inputs_mod.legacy_config(family["flux"], {})
    assert config_of(simple(spec_nodes, flux, mode="probe")) == legacy
    assert config_of(simple(spec_nodes, flux, mode="probe", options=options(spec_nodes))) == legacy
    import dataclasses
    auto = config_of(simple(spec_nodes, flux))
    assert auto == config_of(simple(spec_nodes, flux, options=options(spec_nodes)))
    assert auto.threshold == pytest.approx(inputs_mod.RUN_TOLERANCE)
    assert auto == dataclasses.replace(legacy, acceptance="lookback", output_space="noise", order=1,
                                       step_weighting=True, threshold=auto.threshold, trajectory_correction=2,
                                       uncorrected_threshold_scale=inputs_mod.UNCORRECTED_THRESHOLD / inputs_mod.LOOKBACK_THRESHOLD,
                                       tolerance_unit="run", run_unit_cap=inputs_mod.RUN_UNIT_CAP,
                                       few_steps_unit=inputs_mod.LOOKBACK_THRESHOLD / inputs_mod.RUN_TOLERANCE)


def test_speed_zero_is_bit_identical(spec_nodes, flux, stats_log):
    ref = tm.sample(flux, "flux", steps=12)
    for mode in ("auto", "probe", "speed_target", "paper_flux"):
        out = tm.sample(simple(spec_nodes, flux, mode=mode, speed=0.0), "flux", steps=12)
        assert torch.equal(out, ref), mode
        assert stats_log[-1]["computed"] == 12 and stats_log[-1]["forecast"] == 0
    # off even when the options pick a method that does not verify
    out = tm.sample(simple(spec_nodes, flux, speed=0.0, options=options(spec_nodes, method="taylorseer")),
                    "flux", steps=12)
    assert torch.equal(out, ref)


def test_options_reach_the_run(spec_nodes, flux, stats_log):
    opts = options(spec_nodes, method="taylorseer", max_forecast_steps=3, warmup_steps=2, final_full_steps=1,
                   storage_dtype="bfloat16")
    patched = simple(spec_nodes, flux, options=opts)
    cfg = config_of(patched)
    assert (cfg.method, cfg.max_forecast_steps, cfg.warmup_steps, cfg.storage_dtype) == ("taylorseer", 3, 2, "bfloat16")
    tm.sample(patched, "flux", steps=12)
    assert stats_log[-1]["method"] == "taylorseer"
    assert stats_log[-1]["timeline"] == "CCFFFCFFFCFC"      # 3 forecasts in a row, then a full step
    with pytest.raises(ValueError, match="Options"):
        simple(spec_nodes, flux, options={"no_such_option": 1})


def test_speed_maps_to_the_threshold_and_paper_modes_to_the_papers(spec_nodes, flux, inputs_mod):
    assert config_of(simple(spec_nodes, flux, mode="probe", speed=0.25)).threshold == pytest.approx(0.1 * 0.2 ** 0.5)
    assert config_of(simple(spec_nodes, flux, mode="probe", speed=0.75)).threshold == pytest.approx(0.1 * 10 ** 0.5)
    assert config_of(simple(spec_nodes, flux, speed=0.25)).threshold == pytest.approx(inputs_mod.RUN_TOLERANCE * 0.2 ** 0.5)
    assert config_of(simple(spec_nodes, flux, speed=0.75)).threshold == pytest.approx(inputs_mod.RUN_TOLERANCE * 10 ** 0.5)
    paper = config_of(simple(spec_nodes, flux, mode="paper_flux"))
    assert (paper.threshold, paper.metric, paper.order, paper.on_reject) == (7.0, "relative_l1", 2, "next")
    assert config_of(simple(spec_nodes, flux, mode="paper_hunyuan_video")).threshold == 1.0
    exact = config_of(simple(spec_nodes, flux, options=options(spec_nodes, threshold=0.033)))
    assert exact.threshold == 0.033
    target = config_of(simple(spec_nodes, flux, mode="speed_target", speed=0.25))
    # a target's schedule: order 1, warm-up just the two points it needs, step-size weighting
    assert (target.target_speedup, target.order, target.warmup_steps, target.step_weighting) == (2.0, 1, 2, True)
    assert target.acceptance == "lookback" and not target.serve_output
    # ... and the forecast with the fitted share of curvature (auto keeps the linear one)
    assert target.fitted_curvature and not config_of(simple(spec_nodes, flux)).fitted_curvature
    probe = config_of(simple(spec_nodes, flux, mode="probe"))
    assert (probe.order, probe.warmup_steps, probe.step_weighting, probe.serve_output) == (2, 3, False, False)
    # an Options node asking for what only the probe does: the target probes and serves the output
    probing = config_of(simple(spec_nodes, flux, mode="speed_target", speed=0.25,
                               options=options(spec_nodes, granularity="block")))
    assert probing.acceptance == "probe" and probing.serve_output
    opts = options(spec_nodes, order=3)
    chosen = config_of(simple(spec_nodes, flux, mode="speed_target", speed=0.25, options=opts))
    assert (chosen.order, chosen.warmup_steps) == (3, 3)        # what the Options node sets wins
    assert not chosen.fitted_curvature
    uncorrected = options(spec_nodes, trajectory_correction="off")
    assert not config_of(simple(spec_nodes, flux, mode="speed_target", speed=0.25, options=uncorrected)).fitted_curvature
    opts = options(spec_nodes, warmup_steps=5, step_weighting="on", order=1)
    assert config_of(simple(spec_nodes, flux, mode="speed_target", speed=0.25, options=opts)).warmup_steps == 5


def test_the_options_target_goes_beyond_the_slider(spec_nodes, flux, inputs_mod, family):
    """The Options node's target_speedup: up to 5x it runs exactly as the slider position
    asking for it; beyond, it starts from the slider's end and lets the target's own cap on
    forecasts in a row replace the preset's 8 (unless the Options node sets one); out of
    range it is a clear error; in other modes it is ignored and the description says so."""
    def target(speed=0.5, **opts):
        return config_of(simple(spec_nodes, flux, mode="speed_target", speed=speed,
                                options=options(spec_nodes, **opts)))
    assert target(speed=0.9, target_speedup=3.0) == target(speed=0.5)
    assert target(speed=0.2, target_speedup=5.0) == target(speed=1.0)
    assert target(speed=1.0).max_forecast_steps == 8
    beyond = target(target_speedup=7.0)
    assert beyond.target_speedup == 7.0 and beyond.threshold == target(speed=1.0).threshold
    assert beyond.max_forecast_steps == 12 and beyond.fitted_curvature
    assert target(target_speedup=7.0, max_forecast_steps=6).max_forecast_steps == 6
    # the slider's targets keep the family's cap (the generic family's is 2)
    generic = {t: resolve(inputs_mod, family, "generic", "speed_target", 1.0,
                          {"target_speedup": t} if t else {})[0].max_forecast_steps for t in (0.0, 5.0, 7.0)}
    assert generic == {0.0: 2, 5.0: 2, 7.0: 12}
    for bad in (0.5, 25.0):
        with pytest.raises(ValueError, match="target_speedup"):
            target(target_speedup=bad)
    auto = config_of(simple(spec_nodes, flux, options=options(spec_nodes, target_speedup=7.0)))
    assert auto == config_of(simple(spec_nodes, flux)) and auto.target_speedup == 0.0
    _, what = resolve(inputs_mod, family, "flux", "auto", 0.5, {"target_speedup": 7.0})
    assert "target_speedup 7 is ignored" in what
    # where the calls go: planned from 4x on (target_schedule auto), or as asked
    assert [target(speed=s).plans_target for s in (0.25, 0.5, 0.75, 1.0)] == [False, False, True, True]
    assert beyond.plans_target and not target(target_speedup=7.0, target_schedule="adaptive").plans_target
    assert target(speed=0.25, target_schedule="planned").plans_target
    _, what = resolve(inputs_mod, family, "flux", "speed_target", 0.5, {"target_speedup": 7.0})
    assert "planned from the sampler's sigmas" in what
    _, what = resolve(inputs_mod, family, "flux", "speed_target", 0.5, {})
    assert "starting threshold" in what


def test_a_target_beyond_5x_spends_less_than_the_slider_end(spec_nodes, stats_log):
    """On the trained reference model at 50 steps, an 8x target from the Options node runs
    fewer computed steps than the slider's 5x (both planned), and its stats carry the target."""
    from devkit import reference_model as rm
    ref_model = rm.load_reference()
    fractions = []
    for opts in (None, options(spec_nodes, target_speedup=8.0)):
        rm.sample(simple(spec_nodes, ref_model, mode="speed_target", speed=1.0, options=opts), [0], [1], steps=50)
        fractions.append(stats_log[-1]["compute_fraction"])
    assert stats_log[-1]["target_speedup"] == 8.0
    assert fractions[1] < fractions[0] <= 0.25, fractions
    assert 1.0 / fractions[1] > 5.5, stats_log[-1]["timeline"]


def test_at_the_output_level_the_slider_sets_the_forecasts_in_a_row(spec_nodes, stats_log):
    """A model the cache reaches only at the output level (Lumina 2) has no verification
    threshold to set: the slider sets how many forecasts follow a computed step, and a
    higher speed forecasts more steps. An interval set on the Options node wins."""
    m = tm.build("lumina2", seed=3)
    assert [config_of(simple(spec_nodes, m, mode="probe", speed=s)).max_forecast_steps
            for s in (0.1, 0.25, 0.5, 0.75, 1.0)] == [1, 1, 2, 3, 4]
    assert config_of(simple(spec_nodes, m, mode="probe", speed=1.0,
                            options=options(spec_nodes, max_forecast_steps=6))).max_forecast_steps == 6
    forecasts = []
    for speed in (0.25, 1.0):
        tm.sample(simple(spec_nodes, m, mode="probe", speed=speed), "lumina2", steps=16)
        assert stats_log[-1]["mode"] == "output"
        forecasts.append(stats_log[-1]["forecast"])
    assert 0 < forecasts[0] < forecasts[1]
    assert config_of(simple(spec_nodes, tm.build("flux", seed=3), mode="probe", speed=1.0)).max_forecast_steps == 8
    assert config_of(simple(spec_nodes, m, speed=1.0)).max_forecast_steps == 8     # auto measures instead


@pytest.mark.parametrize("legacy", [
    {},                                                             # the defaults
    None,                                                           # the shipped 0.1 workflow
    dict(threshold=0.3, method="speca", order=1, granularity="block", start_percent=0.1),
    dict(preset="paper_flux", threshold=7.0),
    dict(preset="paper_hunyuan_video", threshold=2.0),
    dict(threshold=0.0),
    dict(method="taylorseer", threshold=0.0, max_forecast_steps=3),
    dict(preset="custom", metric="relative_l1", threshold=5.0, storage_dtype="bfloat16", clusters=8),
], ids=lambda v: "workflow" if v is None else ("-".join(f"{k}={x}" for k, x in v.items()) or "defaults"))
def test_a_legacy_graph_migrates_by_input_name_to_the_same_settings(spec_nodes, flux, inputs_mod, legacy):
    """Settings saved on the 19-input node, read by input name, give the same CacheConfig on
    the legacy node and on the main node + Options node they migrate to."""
    if legacy is None:
        wf = json.loads(LEGACY_WORKFLOW.read_text())
        node = next(n for n in wf["nodes"] if n["type"] == "SpeculativeCache")
        legacy = dict(zip(inputs_mod.LEGACY_ORDER, node["widgets_values"], strict=True))
        assert legacy["max_forecast_steps"] == 4          # that workflow differs from today's default
    old = config_of(spec_nodes.SpeculativeCache.execute(flux, **legacy).result[0])
    migrated = inputs_mod.migrate_legacy(legacy)
    opts = migrated.pop("options")
    new = config_of(simple(spec_nodes, flux, **migrated, options=opts))
    assert new == old
    assert "Speculative Cache (mode" in inputs_mod.describe_migration(dict(migrated, options=opts))


@pytest.mark.parametrize("target", [2.0, 2.5])
def test_speed_target_reaches_its_speedup_on_the_reference_model(spec_nodes, stats_log, target):
    """Closed loop on a trained model: the run's compute lands near 1/target, and the stats
    carry the target."""
    from devkit import reference_model as rm
    ref_model = rm.load_reference()
    speed = (target - 1.0) / 4.0
    patched = simple(spec_nodes, ref_model, mode="speed_target", speed=speed)
    rm.sample(patched, [0], [1], steps=28)
    s = stats_log[-1]
    assert s["target_speedup"] == pytest.approx(target)
    assert 1.0 / s["compute_fraction"] == pytest.approx(target, rel=0.15), s["timeline"]
    assert s["acceptance"] == "lookback" and s["looked_back"] > 0 and s["verified"] == 0


def test_a_probing_speed_target_serves_the_output_forecast(spec_nodes, stats_log):
    """A speed target that probes (an Options node asked for block granularity) returns the
    forecast of the model output on an accepted forecast step (the stage forecasts only feed
    the verification probe): the picture differs from the one the stage forecasts give, and
    both stay close to the uncached one."""
    import dataclasses
    from devkit import reference_model as rm
    ref_model = rm.load_reference()
    uncached = rm.sample(ref_model, [0], [1], steps=28)
    served = simple(spec_nodes, ref_model, mode="speed_target", speed=0.25)
    to = served.model_options["transformer_options"]
    settings = to["speculative_cache"]
    assert settings.config.acceptance == "lookback"
    settings = dataclasses.replace(settings, config=dataclasses.replace(
        settings.config, acceptance="probe", output_space="model", serve_output=True))
    served = served.clone()
    served.model_options["transformer_options"] = to = dict(to, speculative_cache=settings)
    stages_only = served.clone()
    stages_only.model_options["transformer_options"] = dict(to, speculative_cache=dataclasses.replace(
        settings, config=dataclasses.replace(settings.config, serve_output=False)))
    a = rm.sample(served, [0], [1], steps=28)
    assert stats_log[-1]["forecast"] > 5
    b = rm.sample(stages_only, [0], [1], steps=28)
    assert not torch.equal(a, b)
    assert rm.psnr(a, uncached) > 35 and rm.psnr(b, uncached) > 35


def test_stats_carry_the_time_saved(spec_nodes, flux, stats_log):
    tm.sample(simple(spec_nodes, flux, speed=1.0), "flux", steps=12)
    s = stats_log[-1]
    assert s["elapsed_seconds"] > 0
    assert s["saved_seconds"] == pytest.approx(s["elapsed_seconds"] / s["compute_fraction"] - s["elapsed_seconds"],
                                               rel=1e-2, abs=1e-3)
    assert s["errors"] and all(len(e) == 5 for e in s["errors"])   # the chart's points


def test_an_option_set_on_the_options_node_is_honoured_in_every_mode(spec_nodes, flux):
    """An explicit order 2 or step weighting off changes the run in auto and speed_target,
    whose own choices (order 1, weighting on) apply only to what is left at auto; a value a
    mode cannot use is named in the console line."""
    auto = config_of(simple(spec_nodes, flux))
    assert (auto.order, auto.step_weighting) == (1, True)
    chosen = config_of(simple(spec_nodes, flux, options=options(spec_nodes, order=2, step_weighting="off")))
    assert (chosen.order, chosen.step_weighting) == (2, False) and chosen.acceptance == "lookback"
    target = config_of(simple(spec_nodes, flux, mode="speed_target",
                              options=options(spec_nodes, order=2, step_weighting="off")))
    assert (target.order, target.step_weighting, target.fitted_curvature) == (2, False, False)
    custom = config_of(simple(spec_nodes, flux, options=options(spec_nodes, preset="custom", order=2)))
    assert custom.order == 2
    # a run with order 2 forecasts differently from the default's order 1
    linear, quadratic = (tm.sample(simple(spec_nodes, flux, speed=1.0, options=opts), "flux", steps=12)
                         for opts in (None, options(spec_nodes, order=2)))
    assert not torch.equal(linear, quadratic)
    with pytest.raises(ValueError, match="order"):
        options(spec_nodes, order=7)
    with pytest.raises(ValueError, match="step_weighting"):
        options(spec_nodes, step_weighting="maybe")


def test_graphs_saved_with_the_first_options_node_run_as_before(spec_nodes, flux):
    """The Options node of graphs saved before 0.5 (node id SpeculativeCacheOptions) keeps its
    inputs and what they meant: a value at its default is not a choice, so its default order 2
    and step weighting off leave auto's order 1 and weighting on, as they always did."""
    info = spec_nodes.SpeculativeCacheFirstOptions.GET_NODE_INFO_V1()
    assert info["name"] == "SpeculativeCacheOptions" and info["deprecated"]
    required = info["input"]["required"]
    assert required["order"][1]["default"] == 2 and required["step_weighting"][0] == "BOOLEAN"
    defaults = {name: spec[1]["default"] for name, spec in required.items()}
    first = spec_nodes.SpeculativeCacheFirstOptions.execute(**defaults).result[0]
    assert first == {}
    assert config_of(simple(spec_nodes, flux, options=first)) == config_of(simple(spec_nodes, flux))
    changed = spec_nodes.SpeculativeCacheFirstOptions.execute(**dict(defaults, order=3, warmup_steps=2)).result[0]
    assert changed == {"order": 3, "warmup_steps": 2}
    assert config_of(simple(spec_nodes, flux, options=changed)) == config_of(
        simple(spec_nodes, flux, options=options(spec_nodes, order=3, warmup_steps=2)))
