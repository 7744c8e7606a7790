"""The nodes' inputs, declared once, and how a node's values become a CacheConfig.

Three nodes share these declarations: the main **Speculative Cache** node (mode, one
speed slider, start/end), the optional **Speculative Cache Options** node (everything
else), and the legacy 19-input node that graphs saved before the split still use."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

from comfy_api.latest import io

from ..cache_core import CacheConfig
from ..cache_core.config import FORECASTERS, METHODS, METRICS, ON_REJECT, TARGET_SCHEDULES
from ..cache_core.presets import PAPER, PRESETS, resolve_settings
from ..cache_core.target import MAX_TARGET_SPEEDUP, mapped_target, slider_speed, streak_cap
from .adapters import OutputAdapter

_D = CacheConfig()
OPTIONS_TYPE = "SPECULATIVE_CACHE_OPTIONS"
SpeculativeCacheOptionsType = io.Custom(OPTIONS_TYPE)


def _slider_float(name, default, lo, hi, step, tooltip):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip,
                          display_mode=io.NumberDisplay.slider)


def _slider_int(name, default, lo, hi, tooltip):
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tooltip,
                        display_mode=io.NumberDisplay.slider)


FAMILY_PRESETS = [p for p in PRESETS if p not in PAPER]

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
                "clusca (ClusCa token clusters)."),
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


def options_inputs():
    return [ADVANCED[name]() for name in OPTIONS_ORDER]


LEGACY_DEFAULTS = {i.id: i.default for i in legacy_inputs()}
OPTIONS_DEFAULTS = {i.id: i.default for i in options_inputs()}
# CacheConfig's own defaults, to tell which values a user changed.
CONFIG_DEFAULTS = {f.name: getattr(_D, f.name) for f in fields(CacheConfig)}

# ---- the main node's speed slider -----------------------------------------------------
MODES = ("auto", "probe", "speed_target", *PAPER.keys())
# Where speed 0.5 lands: the metric's default threshold (the papers' base thresholds).
BASE_THRESHOLD = {"relative_norm": _D.threshold, "relative_change": 0.5, "relative_l1": 7.0}
# auto (lookback acceptance): speed 0.5 accepts a predicted 6.3 % error of the model output
# (tuned with the trajectory correction on both reference models, 8 samples: README,
# "Trajectory correction"; 4 % before it).
LOOKBACK_THRESHOLD = 0.063
# ... and 4 % where the sampler takes no Euler steps, so the correction cannot run (dpmpp_2m,
# uni_pc, ...: 6.3 % cost them about 5 dB for 8 % less compute on the 6-block model).
UNCORRECTED_THRESHOLD = 0.04
SPEED_TARGET_ORDER = 1
# The trajectory correction of lookback runs: quadratic interpolation (cache_core/correction.py).
CORRECTION_DEGREE = 2
PAPER_BASE_THRESHOLD = {"paper_flux": 7.0, "paper_hunyuan_video": 1.0}
# speed 0 -> off; speed -> 0+: base / 5; 0.5: base; 1: base x 10 (0.02 .. 0.1 .. 1.0 for
# relative_norm, the range where the threshold changes what a run does).
_LOOSEST, _STRICTEST = 10.0, 0.2


def speed_to_threshold(speed: float, base: float) -> float:
    """The verification threshold of the speed slider: 0 = off, geometric on each half."""
    s = min(max(float(speed), 0.0), 1.0)
    if s <= 0.0:
        return 0.0
    exponent = 2.0 * s - 1.0
    factor = _LOOSEST ** exponent if exponent >= 0 else _STRICTEST ** (-exponent)
    return base * factor


def _finish(preset, family, values):
    values = dict(values)
    if values.get("storage_dtype") == "auto":
        values["storage_dtype"] = None
    return resolve_settings(preset, family, values, CONFIG_DEFAULTS)


def legacy_config(family: str, values: dict) -> CacheConfig:
    """The legacy node's config: its inputs are CacheConfig fields, by name. ``family``:
    the detected model family (for the auto preset)."""
    values = {**LEGACY_DEFAULTS, **values}
    preset = values.pop("preset")
    return _finish(preset, family, values)


def lookback_fits(opts: dict) -> bool:
    """Whether the Options node leaves room for lookback acceptance: SpeCa at stack
    granularity with the default metric. Another method, block granularity (ClusCa, per-block
    forecasts) or a probe metric asks for what only the per-step probe does."""
    return (opts["method"] == "speca" and opts["granularity"] == OPTIONS_DEFAULTS["granularity"]
            and opts["metric"] == OPTIONS_DEFAULTS["metric"])


def simple_config(family: str, mode: str, speed: float, start_percent: float, end_percent: float,
                  options: dict | None, lookback: bool = True) -> tuple[CacheConfig, str]:
    """The main node's config and a one-line description of what the slider set.
    ``lookback=False``: the same inputs with the per-step probe (auto becomes probe)."""
    if mode not in MODES:
        raise ValueError(f"Speculative Cache: unknown mode {mode!r}; choose from {MODES}")
    opts = {**OPTIONS_DEFAULTS, **(options or {})}
    looks_back = lookback and mode in ("auto", "speed_target") and lookback_fits(opts)
    if mode == "auto" and not looks_back:
        mode = "probe"          # the Options node asked for what only the probe does
    preset = opts.pop("preset")
    override = float(opts.pop("threshold"))
    opts.pop("memory_budget_mb")           # a run setting, not the engine's (see memory_budget)
    correction = CORRECTION_DEGREE if opts.pop("trajectory_correction") else 0
    target_override = float(opts.pop("target_speedup"))
    if target_override and not 1.0 <= target_override <= MAX_TARGET_SPEEDUP:
        # (checked here too: outside speed_target the value never reaches the config's check)
        raise ValueError(f"Speculative Cache Options: target_speedup must be 0 (from the slider) or "
                         f"between 1 and {MAX_TARGET_SPEEDUP:g}, got {target_override}")
    values = dict(opts, start_percent=start_percent, end_percent=end_percent)
    if mode in PAPER:
        preset = mode
        base = PAPER_BASE_THRESHOLD[mode]
    elif mode == "auto":
        base = LOOKBACK_THRESHOLD
    else:
        base = BASE_THRESHOLD[values["metric"]]
    if speed <= 0.0:
        # 0 = off, whatever the method: the model runs as without the node.
        config = _finish("custom", family, dict(values, method="speca", threshold=0.0))
        return config, "off (speed 0)"
    if mode == "speed_target" and target_override:
        # The run starts from the threshold of the slider position asking for this target
        # (targets up to 5x run exactly as the slider would ask for them).
        speed = slider_speed(target_override)
    values["threshold"] = override if override >= 0.0 else speed_to_threshold(speed, base)
    if mode == "speed_target":
        values["target_speedup"] = target_override or mapped_target(speed)
        # Linear forecasts hold up better over the longer streaks a target asks for (on the
        # reference model at 2x: 40.2 dB with order 1, 32.3 dB with order 2); an order set
        # on the Options node still wins.
        if values["order"] == OPTIONS_DEFAULTS["order"]:
            values["order"] = SPEED_TARGET_ORDER
    config = _finish(preset, family, values)
    if mode == "auto":
        config = _lookback_schedule(config, opts, correction, exact=override >= 0.0)
        what = f"lookback, tolerance {config.threshold:.4g} (relative error of the model output)"
    elif mode == "speed_target":
        config = _speed_target_schedule(config, opts, looks_back, correction)
        what = (f"target {config.target_speedup:.2f}x, model calls planned from the sampler's sigmas"
                if config.plans_target else
                f"target {config.target_speedup:.2f}x, starting threshold {config.threshold:.4g}"
                f" ({'lookback' if looks_back else 'probe'})")
    elif family == OutputAdapter.family and mode == "probe":
        # No verification probe at the output level, so no threshold to set: the slider sets
        # how many forecasts may follow a computed step instead (0.5: the preset's 2).
        if opts["max_forecast_steps"] == OPTIONS_DEFAULTS["max_forecast_steps"]:
            config = dataclasses.replace(config, max_forecast_steps=max(1, math.ceil(4.0 * speed - 1e-9)))
        what = f"output level: up to {config.max_forecast_steps} forecasts after each computed step"
    else:
        what = f"threshold {config.threshold:.4g} ({config.metric})"
    if target_override and mode != "speed_target":
        what += f"; the Options node's target_speedup {target_override:g} is ignored (it is for mode speed_target)"
    return config, what


def _lookback_schedule(config: CacheConfig, opts: dict, correction: int = CORRECTION_DEGREE,
                       exact: bool = False) -> CacheConfig:
    """auto: lookback acceptance. The whole model output is forecast, as the noise it implies
    for flow models, with a linear polynomial, and each step's tolerance weighted by its size in
    sigma (what the Options node leaves at its defaults). On the reference models (8 samples)
    order 1 and the weighting were the best of what was tried (README, "Lookback").

    ``correction`` (its degree, 0 = off): runs with an Euler sampler get the trajectory correction;
    a run whose sampler cannot have it falls back from LOOKBACK_THRESHOLD to UNCORRECTED_THRESHOLD,
    unless ``exact`` (the Options node set the threshold)."""
    changes = {"acceptance": "lookback", "output_space": "noise",
               "max_forecast_steps": opts["max_forecast_steps"],      # not a family preset's cap
               "trajectory_correction": correction}
    if correction and not exact:           # (a threshold set on the Options node stays exact)
        changes["uncorrected_threshold_scale"] = UNCORRECTED_THRESHOLD / LOOKBACK_THRESHOLD
    if opts["order"] == OPTIONS_DEFAULTS["order"]:
        changes["order"] = 1
    if opts["step_weighting"] == OPTIONS_DEFAULTS["step_weighting"]:
        changes["step_weighting"] = True
    return dataclasses.replace(config, **changes)


def _speed_target_schedule(config: CacheConfig, opts: dict, looks_back: bool,
                           correction: int = CORRECTION_DEGREE) -> CacheConfig:
    """A speed target's schedule, for what the Options node leaves at its defaults: warm-up
    only as long as the forecast needs points (order + 1), so the budget goes to the
    schedule, and the threshold weighted by each step's size in sigma, so the forecasts a
    tight budget forces go where the image feels them least. On the 19-block reference model
    (8 samples) this took 2x from 42.2 to 44.2 dB, 3x from 0.376 compute / 32.4 dB to
    0.352 / 34.9 dB, and 4x from 25.3 to 29.8 dB at the same compute; the 6-block model gained
    1.3-2.3 dB at each target (benchmarks.schedule_sweep; the table under "Speed target" in
    the README).

    ``looks_back``: the forecasts are accepted by lookback (the steered threshold is then the
    tolerance of the output forecast's predicted error); at 3x on the reference models (8
    samples) this gave 0.335 compute / 38.9 dB (19-block) and 0.335 / 40.2 dB (6-block),
    against the probe's 0.360 / 38.5 dB and 0.38 / 34.1 dB. With the probe (the Options node
    asked for it), the forecast of the model output itself is served on accepted steps (the
    stage forecasts still feed the probe): on the 19-block model +1.6 dB at 3x and +2.3 dB at
    4x, on the 6-block model +2.8 dB at 2x, -0.6 dB at 3x (README, diagnosis)."""
    changes = ({"acceptance": "lookback", "output_space": "noise", "trajectory_correction": correction}
               if looks_back else {"serve_output": True})
    if looks_back and correction and opts["order"] == OPTIONS_DEFAULTS["order"]:
        # The budget sets the schedule here, so a better forecast is more PSNR at the same
        # compute (in auto it also moves the schedule, and there it was mixed: README, "Fitted
        # curvature").
        changes["fitted_curvature"] = True
    if opts["warmup_steps"] == OPTIONS_DEFAULTS["warmup_steps"]:
        changes["warmup_steps"] = min(config.warmup_steps, config.order + 1)
    if opts["step_weighting"] == OPTIONS_DEFAULTS["step_weighting"]:
        changes["step_weighting"] = True
    if (opts["max_forecast_steps"] == OPTIONS_DEFAULTS["max_forecast_steps"]
            and config.target_speedup > mapped_target(1.0)):
        # Beyond the slider's end (the Options node's target_speedup) the target's own cap on
        # forecasts in a row, where it is longer than the family's; the slider's targets keep
        # the family's cap, as before.
        changes["max_forecast_steps"] = max(config.max_forecast_steps, streak_cap(config.target_speedup))
    return dataclasses.replace(config, **changes)


def check_known(inputs: dict, known, node: str) -> None:
    unknown = set(inputs) - set(known)
    if unknown:
        raise ValueError(f"{node}: unknown inputs {sorted(unknown)}")



def migrate_legacy(values: dict) -> dict:
    """The main node's inputs that give the legacy node's settings ``values`` (by input
    name, whatever order a saved graph stored them in): mode, speed, start/end percent,
    and an ``options`` dict (None when every option is at its default)."""
    v = {**LEGACY_DEFAULTS, **values}
    preset = v["preset"]
    mode = preset if preset in PAPER else "probe"          # the legacy node always probes
    base = PAPER_BASE_THRESHOLD[mode] if mode in PAPER else BASE_THRESHOLD[v["metric"]]
    threshold = float(v["threshold"])
    options = {name: v[name] for name in OPTIONS_DEFAULTS
               if name in v and name not in ("preset", "threshold", "memory_budget_mb")}
    options["preset"] = "auto" if mode in PAPER else preset
    options["threshold"] = -1.0
    speed = 0.5
    if threshold <= 0.0 and v["method"] == "speca":
        speed = 0.0                 # off
    else:
        exact = [s / 100 for s in range(1, 101) if math.isclose(speed_to_threshold(s / 100, base), threshold,
                                                                 rel_tol=1e-9)]
        if exact:
            speed = exact[0]
        else:
            options["threshold"] = threshold
    changed = {k: x for k, x in options.items() if x != OPTIONS_DEFAULTS[k]}
    return {"mode": mode, "speed": speed, "start_percent": v["start_percent"], "end_percent": v["end_percent"],
            "options": {**OPTIONS_DEFAULTS, **changed} if changed else None}


def describe_migration(migrated: dict) -> str:
    options = migrated["options"] or {}
    changed = ", ".join(f"{k}={options[k]}" for k in options if options[k] != OPTIONS_DEFAULTS[k])
    main = f"Speculative Cache (mode {migrated['mode']}, speed {migrated['speed']:.2f}"
    if (migrated["start_percent"], migrated["end_percent"]) != (0.0, 1.0):
        main += f", start {migrated['start_percent']}, end {migrated['end_percent']}"
    return main + ")" + (f" + Speculative Cache Options ({changed})" if changed else "")


def memory_budget(options: dict | None) -> int:
    """The Options node's memory budget in MiB (0: automatic)."""
    return int((options or {}).get("memory_budget_mb", 0) or 0)
