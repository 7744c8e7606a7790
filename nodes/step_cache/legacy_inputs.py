"""The inputs of the nodes of graphs saved before version 0.5, frozen as they were saved: the
legacy 19-input **Speculative Cache** node and the first **Speculative Cache Options** node.
Graphs store widget values by position, so these declarations never change; what their values
mean is in ``cache_core/recipe.py`` (``legacy_config``, and for the Options node: a value that
differs from its default here is a value the user set)."""

from __future__ import annotations

from comfy_api.latest import io

from ...cache_core import CacheConfig
from ...cache_core.config import METHODS, METRICS, ON_REJECT, TARGET_SCHEDULES
from ...cache_core.forecasters import FORECASTERS
from ...cache_core.presets import PAPER, PRESETS
from ...cache_core.target import MAX_TARGET_SPEEDUP


def _slider_float(name, default, lo, hi, step, tooltip):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip,
                          display_mode=io.NumberDisplay.slider)


def _slider_int(name, default, lo, hi, tooltip):
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tooltip,
                        display_mode=io.NumberDisplay.slider)


FAMILY_PRESETS = [p for p in PRESETS if p not in PAPER]
_D = CacheConfig()

# Each advanced input, by name (a function, so that every schema gets its own object).
ADVANCED = {
    "preset": lambda: io.Combo.Input(
        "preset", options=list(PRESETS), default="auto",
        tooltip="auto: tuned settings for the detected model family; inputs you changed from their "
                "default still win. custom: exactly the inputs below. paper_flux / paper_hunyuan_video: "
                "the SpeCa paper's settings (every input except threshold, which is the paper's base "
                "threshold: 7.0 for FLUX, 1.0 for HunyuanVideo)."),
    "family": lambda: io.Combo.Input(
        "preset", options=FAMILY_PRESETS, default="auto",
        tooltip="auto: tuned settings for the detected model family (inputs you changed from their "
                "default still win). custom: exactly the inputs of this node. A family name: that "
                "family's settings on any model."),
    "method": lambda: io.Combo.Input(
        "method", options=list(METHODS), default=_D.method,
        tooltip="speca: forecast, then verify each forecast with the real last block; recompute when "
                "it is off. The others forecast on a fixed interval (max_forecast_steps) without "
                "verification: taylorseer (Taylor), reuse (FORA), hicache (Hermite), foca (FoCa), "
                "spectrum (Spectrum, Chebyshev series), clusca (ClusCa token clusters)."),
    "threshold": lambda: _slider_float(
        "threshold", _D.threshold, 0.0, 10.0, 0.005,
        "Verification tolerance: the largest relative error of the last block's output that a "
        "forecast may have (0.1 = 10 %). Lower = closer to the uncached picture and slower; "
        "0 disables forecasting (identical output). Only speca verifies."),
    "threshold_override": lambda: io.Float.Input(
        "threshold", default=-1.0, min=-1.0, max=10.0, step=0.005,
        tooltip="An exact verification threshold. Mode auto: the largest predicted error of the model "
                "output forecast (0.063 = 6.3 %); probe: in the metric's units (relative_norm: 0.1 = 10 %). "
                "-1: from the main node's speed slider."),
    "forecaster": lambda: io.Combo.Input(
        "forecaster", options=list(FORECASTERS), default=_D.forecaster,
        tooltip="SpeCa's draft: taylor (polynomial through the last computed steps), hicache "
                "(Hermite basis, damped), foca (velocity fit + Heun corrector)."),
    "order": lambda: _slider_int("order", _D.order, 0, 4,
                                 "Order of the forecast polynomial through the last computed steps "
                                 "(0 = reuse, 1 = linear, 2 = quadratic). auto and speed_target use 1 "
                                 "unless set here; speed_target adds a share of the curvature fitted "
                                 "during the run, which setting the order here turns off."),
    "warmup_steps": lambda: _slider_int("warmup_steps", _D.warmup_steps, 0, 100,
                                        "Steps computed fully at the start, before any forecast."),
    "max_forecast_steps": lambda: _slider_int("max_forecast_steps", _D.max_forecast_steps, 1, 50,
                                              "At most this many forecast steps in a row, then a full step."),
    "start_percent": lambda: _slider_float("start_percent", _D.start_percent, 0.0, 1.0, 0.01,
                                           "Forecasting may start at this fraction of the schedule."),
    "end_percent": lambda: _slider_float("end_percent", _D.end_percent, 0.0, 1.0, 0.01,
                                         "Forecasting stops at this fraction of the schedule; later steps "
                                         "are computed."),
    "final_full_steps": lambda: _slider_int("final_full_steps", _D.final_full_steps, 0, 100,
                                            "Steps computed fully at the end of the schedule (fine detail "
                                            "forms there)."),
    "on_reject": lambda: io.Combo.Input(
        "on_reject", options=list(ON_REJECT), default=_D.on_reject,
        tooltip="When a forecast fails verification: redo = compute this step fully (a rejected "
                "forecast is never used); next = keep it and compute the next step fully (the SpeCa "
                "paper's behaviour: faster, less faithful)."),
    "metric": lambda: io.Combo.Input(
        "metric", options=list(METRICS), default=_D.metric,
        tooltip="relative_norm: ||forecast - real|| / ||real||. relative_l1: the SpeCa paper's "
                "element-wise relative L1 (its FLUX base threshold is 7.0). relative_change: the part of "
                "the feature's movement since the last computed step that the forecast missed (reuse "
                "scores 1; the same threshold means the same on any model's scale)."),
    "threshold_decay": lambda: _slider_float("threshold_decay", _D.threshold_decay, 0.01, 1.0, 0.01,
                                             "The threshold is multiplied by decay^progress along the "
                                             "schedule (stricter late in sampling); 1 keeps it constant."),
    "threshold_floor": lambda: _slider_float("threshold_floor", _D.threshold_floor, 0.0, 10.0, 0.005,
                                             "The decayed threshold never falls below this."),
    "storage_dtype": lambda: io.Combo.Input(
        "storage_dtype", options=["auto", "float32", "bfloat16", "float16"], default="auto",
        tooltip="Precision of the stored forecast history. auto keeps the model's precision; "
                "bfloat16 halves the cache memory of a float32 model."),
    "granularity": lambda: io.Combo.Input(
        "granularity", options=["stack", "block"], default=_D.granularity,
        tooltip="stack: forecast the residual of each block stage (small memory, the default). "
                "block: forecast every block's attention and MLP outputs (TaylorSeer; closer to the "
                "papers, needs gigabytes on FLUX at 1024x1024). clusca always uses block."),
    "clusters": lambda: _slider_int("clusters", _D.clusters, 1, 256,
                                    "ClusCa: number of token clusters; one token per cluster is computed "
                                    "for real at each forecast step."),
    "gamma": lambda: _slider_float("gamma", _D.gamma, 0.0, 1.0, 0.001,
                                   "ClusCa: how far every token's cached MLP output moves towards its "
                                   "cluster's fresh value (0 = only the computed tokens are refreshed)."),
    "step_weighting": lambda: io.Boolean.Input(
        "step_weighting", default=_D.step_weighting,
        tooltip="Scale each step's threshold by the sampler's step size (lenient on small early steps, "
                "strict on the large last ones)."),
    "trajectory_correction": lambda: io.Boolean.Input(
        "trajectory_correction", default=True,
        tooltip="Modes auto and speed_target, with an Euler sampler (euler, ddim): at each computed step, "
                "re-estimate the forecast steps since the last one by interpolation and let this step carry "
                "the difference (closer to the uncached picture at the same speed). Other samplers turn it "
                "off by themselves."),
    "memory_budget_mb": lambda: io.Int.Input(
        "memory_budget_mb", default=0, min=0, max=1 << 20,
        tooltip="Most memory the forecast history may take, in MiB. 0: 40 % of the free memory of the "
                "model's device. Above it a run stores bfloat16, then uses stack granularity, then a lower "
                "order, then does not forecast; the console says which."),
    "target_speedup": lambda: io.Float.Input(
        "target_speedup", default=0.0, min=0.0, max=MAX_TARGET_SPEEDUP, step=0.1,
        tooltip="Mode speed_target: the speed-up to aim for, instead of the slider's 1 + 4 x speed "
                "(which stops at 5x); speed 0 still turns the node off. 0: from the slider. Beyond 5x "
                "it needs many steps: 6x computes 8 of 50 steps, or of 28 steps 4 and one cond-only step (half "
                "a call; with CFG only). README: \"Planned targets\"."),
    "target_schedule": lambda: io.Combo.Input(
        "target_schedule", options=list(TARGET_SCHEDULES), default=_D.target_schedule,
        tooltip="Mode speed_target: where the model runs. planned = the target's model calls are placed "
                "before the run from the sampler's sigmas (long runs of forecasts on the small early "
                "steps, short ones on the big late steps; with CFG the budget may end in a cond-only step that "
                "runs the positive prompt only); adaptive = the steered threshold places them "
                "from the errors it measures; auto = planned from 4x on."),
    "max_overhead": lambda: _slider_float("max_overhead", _D.max_overhead, 0.0, 1.0, 0.005,
                                          "Back-off: rejected verifications may cost at most this fraction "
                                          "of an uncached run (0.02: a run never costs more than 1.02x "
                                          "uncached)."),
}

# The legacy node's widgets, in their saved order (graphs store widget values by position).
LEGACY_ORDER = ["preset", "method", "threshold", "forecaster", "order", "warmup_steps", "max_forecast_steps",
                "start_percent", "end_percent", "final_full_steps", "on_reject", "metric", "threshold_decay",
                "threshold_floor", "storage_dtype", "granularity", "clusters", "gamma"]
# The options node: everything the main node leaves out. New inputs go at the END.
OPTIONS_ORDER = ["family", "method", "forecaster", "order", "warmup_steps", "max_forecast_steps",
                 "final_full_steps", "on_reject", "metric", "threshold_decay", "threshold_floor",
                 "storage_dtype", "granularity", "clusters", "gamma", "step_weighting", "max_overhead",
                 "threshold_override", "memory_budget_mb", "trajectory_correction", "target_speedup",
                 "target_schedule"]


def legacy_inputs():
    return [ADVANCED[name]() for name in LEGACY_ORDER]


def first_options_inputs():
    return [ADVANCED[name]() for name in OPTIONS_ORDER]


# The first Options node's defaults: a value that differs from its default was set by the user.
FIRST_OPTIONS_DEFAULTS = {i.id: i.default for i in first_options_inputs()}


def chosen_from_first_options(values: dict) -> dict:
    """The Options the user set on a first Options node (see the module docstring)."""
    unknown = set(values) - set(FIRST_OPTIONS_DEFAULTS)
    if unknown:
        raise ValueError(f"Speculative Cache Options: unknown inputs {sorted(unknown)}")
    return {k: v for k, v in values.items() if v != FIRST_OPTIONS_DEFAULTS[k]}
