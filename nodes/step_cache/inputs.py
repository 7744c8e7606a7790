"""The Speculative Cache Options node's inputs: each one's widget, and which value means "not set".

Every input has an explicit ``auto`` value (a combo's ``auto``, ``-1`` for a number, ``0`` for
the memory budget, ``1`` for the target speed-up): left there, the mode and the detected family decide
(``cache_core/recipe.py``); anything else is used exactly, in every mode, or the console line
names it as not applicable. New inputs go at the END (graphs store widget values by position)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from comfy_api.latest import io

from ...cache_core.config import METHODS, METRICS, ON_REJECT, TARGET_SCHEDULES
from ...cache_core.forecasters import FORECASTERS, forecaster_class
from ...cache_core.presets import PRESETS
from ...cache_core.recipe import OPTION_DEFAULTS, require_finite
from ...cache_core.target import MAX_TARGET_SPEEDUP

AUTO = "auto"
UNSET_NUMBER = -1
OPTIONS_TYPE = "SPECULATIVE_CACHE_OPTIONS"
SpeculativeCacheOptionsType = io.Custom(OPTIONS_TYPE)
SWITCH = {"on": True, "off": False}


@dataclass(frozen=True)
class OptionInput:
    """One input of the Options node: its widget, and the value it has when the user set it
    (None: not set)."""
    name: str
    widget: Callable[[], Any]
    chosen: Callable[[Any], Any]


def _combo(name, choices, tooltip, convert=None):
    def chosen(value):
        if value == AUTO:
            return None
        if value not in choices:
            raise ValueError(f"Speculative Cache Options: {name} must be one of {[AUTO, *choices]}, got {value!r}")
        return convert(value) if convert else value
    return OptionInput(name, lambda: io.Combo.Input(name, options=[AUTO, *choices], default=AUTO, tooltip=tooltip),
                       chosen)


def _number(name, kind, lo, hi, tooltip, step=None):
    """-1 = auto; the engine checks the value's range (CacheConfig names the input)."""
    def widget():
        extra = {"step": step} if step else {}
        return kind.Input(name, default=UNSET_NUMBER, min=UNSET_NUMBER, max=hi, tooltip=tooltip + " -1: auto.",
                          **extra)

    def chosen(value):
        if value == UNSET_NUMBER:
            return None
        if not lo <= value <= hi:
            raise ValueError(f"Speculative Cache Options: {name} must be -1 (auto) or in [{lo}, {hi}], got {value}")
        return value
    return OptionInput(name, widget, chosen)


def _zero_is_auto(name, widget):
    return OptionInput(name, widget, lambda value: None if not value else value)


_FORECASTER_TIPS = "; ".join(forecaster_class(n).tooltip for n in FORECASTERS)

OPTIONS = [
    _combo("preset", [p for p in PRESETS if p != AUTO],
           "auto: the detected model family's tuned settings for what you leave at auto. custom: no family's "
           "(the node's defaults). A family name: that family's settings on any model. paper_flux / "
           "paper_hunyuan_video: the SpeCa paper's settings."),
    _combo("method", list(METHODS),
           "speca: forecast, then verify each forecast (the default). The others forecast on a fixed interval "
           "(max_forecast_steps) without verification: taylorseer (Taylor), reuse (FORA), hicache (Hermite), "
           "foca (FoCa), spectrum (Spectrum, Chebyshev series), clusca (ClusCa token clusters)."),
    _combo("forecaster", list(FORECASTERS), "SpeCa's draft: " + _FORECASTER_TIPS + "."),
    _number("order", io.Int, 0, 4,
            "Order of the forecast polynomial through the last computed steps (0 = reuse, 1 = linear, "
            "2 = quadratic). auto: 1 in modes auto and speed_target (speed_target adds a fitted share of the "
            "curvature), 2 in probe."),
    _number("warmup_steps", io.Int, 0, 100, "Steps computed fully at the start, before any forecast."),
    _number("max_forecast_steps", io.Int, 1, 50, "At most this many forecast steps in a row, then a full step."),
    _number("final_full_steps", io.Int, 0, 100,
            "Steps computed fully at the end of the schedule (fine detail forms there)."),
    _combo("on_reject", list(ON_REJECT),
           "When a forecast fails verification: redo = compute this step fully (a rejected forecast is never "
           "used); next = keep it and compute the next step fully (the SpeCa paper's behaviour)."),
    _combo("metric", list(METRICS),
           "relative_norm: ||forecast - real|| / ||real||. relative_l1: the SpeCa paper's element-wise relative "
           "L1 (its FLUX base threshold is 7.0). relative_change: the part of the feature's movement since the "
           "last computed step that the forecast missed. Another metric than relative_norm uses the probe."),
    _number("threshold_decay", io.Float, 0.01, 1.0,
            "The threshold is multiplied by decay^progress along the schedule (stricter late); 1 keeps it constant.",
            step=0.01),
    _number("threshold_floor", io.Float, 0.0, 10.0, "The decayed threshold never falls below this.", step=0.005),
    _combo("storage_dtype", ["float32", "bfloat16", "float16"],
           "Precision of the stored forecast history. auto keeps the model's precision; bfloat16 halves the "
           "cache memory of a float32 model."),
    _combo("granularity", ["stack", "block"],
           "stack: forecast the residual of each block stage (small memory). block: forecast every block's "
           "attention and MLP outputs (TaylorSeer; gigabytes on FLUX at 1024x1024; uses the probe)."),
    _number("clusters", io.Int, 1, 256,
            "ClusCa: number of token clusters; one token per cluster is computed for real at each forecast step."),
    _number("gamma", io.Float, 0.0, 1.0,
            "ClusCa: how far every token's cached MLP output moves towards its cluster's fresh value.", step=0.001),
    _combo("step_weighting", list(SWITCH),
           "Scale each step's threshold by the sampler's step size (lenient on small early steps, strict on the "
           "large last ones). auto: on in modes auto and speed_target, off in probe.", SWITCH.get),
    _number("max_overhead", io.Float, 0.0, 1.0,
            "Back-off: rejected verifications may cost at most this fraction of an uncached run (0.02: a run "
            "never costs more than 1.02x uncached).", step=0.005),
    _number("threshold", io.Float, 0.0, 10.0,
            "An exact verification threshold instead of the main node's speed slider. Mode auto: the largest "
            "predicted error of the model output forecast (0.063 = 6.3 %); probe: in the metric's units.",
            step=0.005),
    _zero_is_auto("memory_budget_mb", lambda: io.Int.Input(
        "memory_budget_mb", default=0, min=0, max=1 << 20,
        tooltip="Most memory the forecast history may take, in MiB. 0: 40 % of the free memory of the model's "
                "device. Above it a run stores bfloat16, then uses stack granularity, then a lower order, then "
                "does not forecast; the console says which.")),
    _combo("trajectory_correction", list(SWITCH),
           "Modes auto and speed_target, with an Euler sampler (euler, ddim): at each computed step, re-estimate "
           "the forecast steps since the last one and let this step carry the difference. auto: on where the "
           "sampler allows it.", SWITCH.get),
    # 1 = from the slider (a 1x target asks for nothing), so every value offered is one the node accepts
    OptionInput("target_speedup", lambda: io.Float.Input(
        "target_speedup", default=1.0, min=1.0, max=MAX_TARGET_SPEEDUP, step=0.1,
        tooltip="Mode speed_target: the speed-up to aim for, instead of the slider's 1 + 4 x speed (which stops "
                "at 5x). 1: from the slider. Beyond 5x it needs many steps: 6x computes 8 of 50 steps, or of 28 "
                "steps 4 and one cond-only step (with CFG only)."),
                lambda value: None if value == 1.0 else value),
    _combo("target_schedule", [s for s in TARGET_SCHEDULES if s != AUTO],
           "Mode speed_target: where the model runs. planned = the target's model calls are placed before the "
           "run from the sampler's sigmas; adaptive = the steered threshold places them from the errors it "
           "measures; auto = planned from 4x on."),
]
assert {o.name for o in OPTIONS} == set(OPTION_DEFAULTS), "every recipe option has one input"
BY_NAME = {o.name: o for o in OPTIONS}


def options_inputs():
    return [o.widget() for o in OPTIONS]


def chosen_options(values: dict) -> dict:
    """The Options a user set, from the Options node's values (inputs left at auto are left out)."""
    unknown = set(values) - set(BY_NAME)
    if unknown:
        raise ValueError(f"Speculative Cache Options: unknown inputs {sorted(unknown)}")
    require_finite("Speculative Cache Options", **values)
    chosen = {}
    for name, value in values.items():
        got = BY_NAME[name].chosen(value)
        if got is not None:
            chosen[name] = got
    return chosen
