"""What the node's inputs mean: one pure function from the main node's mode, speed and
start/end, the detected family's registry entry and the Options the user really set, to the
run's ``CacheConfig`` and the one line the console prints (``resolve``).

The layers, each above the ones before it:

1. ``CacheConfig``'s defaults;
2. the family's tuned preset (``families.py``), unless the Options preset is ``custom``; a
   ``paper_*`` preset or mode replaces every setting but the threshold (the papers' settings);
3. what the mode makes of the settings the user left unset (``auto``: lookback, linear
   forecasts weighted by step size; ``speed_target``: a short warm-up, the target's schedule);
4. the Options the user set, always.

"Not set" is explicit: an Options value is set when it is in ``chosen``. The Options node puts
there what is not at its ``auto`` choice; the node of graphs saved before version 0.5, whose
inputs had no ``auto`` choice, puts there what differs from its default (which is what it
meant). A set value that a mode cannot use is named in the description, never dropped
silently."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import CacheConfig
from .families import BY_NAME, GENERIC, Family
from .presets import PAPER, PRESETS
from .target import MAX_TARGET_SPEEDUP, mapped_target, slider_speed, streak_cap

_D = CacheConfig()

# The Options node's settings, and the value each stands for when the user leaves it unset.
# Engine settings (CacheConfig fields) are the first group; the others are read here.
ENGINE_OPTIONS = ("method", "forecaster", "order", "warmup_steps", "max_forecast_steps", "final_full_steps",
                  "on_reject", "metric", "threshold_decay", "threshold_floor", "storage_dtype", "granularity",
                  "clusters", "gamma", "step_weighting", "max_overhead", "target_schedule")
OPTION_DEFAULTS = {
    **{name: getattr(_D, name) for name in ENGINE_OPTIONS},
    "preset": "auto",               # the detected family's tuned settings
    "threshold": -1.0,              # from the main node's speed slider
    "memory_budget_mb": 0,          # 40 % of the free memory of the model's device
    "trajectory_correction": True,  # in auto and speed_target, where the sampler takes Euler steps
    "target_speedup": 0.0,          # from the main node's speed slider
}

MODES = ("auto", "probe", "speed_target", *PAPER.keys())
# Where speed 0.5 lands: the metric's default threshold (the papers' base thresholds).
BASE_THRESHOLD = {"relative_norm": _D.threshold, "relative_change": 0.5, "relative_l1": 7.0}
# auto (lookback acceptance): speed 0.5 accepts a predicted 6.3 % error of the model output
# (tuned with the trajectory correction on both reference models, 8 samples: README,
# "Trajectory correction"; 4 % before it).
LOOKBACK_THRESHOLD = 0.063
# auto counts its tolerance in this run's own one-step forecast errors (tolerance_unit "run"), so
# that the slider means the same horizon on every model: speed 0.5 accepts forecasts predicted to
# be RUN_TOLERANCE times as wrong as the run's typical one-step forecast (chosen on both reference
# models, 8 samples, to keep their defaults' compute; the held-out Wan model was never used:
# docs/results.md, "The speed slider on three models"). The
# unit is capped at RUN_UNIT_CAP, an absolute error, so a model whose forecasts are all poor is
# not forecast further for it. An Options threshold is an absolute tolerance, as before.
RUN_TOLERANCE = 4.0
RUN_UNIT_CAP = 0.05
# ... and 4 % where the sampler takes no Euler steps, so the correction cannot run (dpmpp_2m,
# uni_pc, ...: 6.3 % cost them about 5 dB for 8 % less compute on the 6-block model).
UNCORRECTED_THRESHOLD = 0.04
SPEED_TARGET_ORDER = 1
# The trajectory correction of lookback runs: quadratic interpolation (correction.py).
CORRECTION_DEGREE = 2
PAPER_BASE_THRESHOLD = {"paper_flux": 7.0, "paper_hunyuan_video": 1.0}
# speed 0 -> off; speed -> 0+: base / 5; 0.5: base; 1: base x 10 (0.02 .. 0.1 .. 1.0 for
# relative_norm, the range where the threshold changes what a run does).
_LOOSEST, _STRICTEST = 10.0, 0.2


@dataclass(frozen=True)
class Recipe:
    """What one Speculative Cache node asks of its runs."""
    config: CacheConfig
    description: str                # the console's one line: what the slider set
    memory_budget_mb: int = 0       # 0: a share of the free memory of the model's device
    # The same inputs with the per-step probe, for a run whose model an Edit Region node shares
    # (None: the same as ``config``).
    config_with_edit_region: CacheConfig | None = None


def speed_to_threshold(speed: float, base: float) -> float:
    """The verification threshold of the speed slider: 0 = off, geometric on each half."""
    s = min(max(float(speed), 0.0), 1.0)
    if s <= 0.0:
        return 0.0
    exponent = 2.0 * s - 1.0
    factor = _LOOSEST ** exponent if exponent >= 0 else _STRICTEST ** (-exponent)
    return base * factor


def require_finite(node: str, **values) -> None:
    """Refuse NaN and infinite numbers, naming the input (ComfyUI's own min/max check lets NaN
    through: every comparison with it is false)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"{node}: {name} must be a finite number, got {value}")


def check_options(chosen: dict, node: str = "Speculative Cache Options") -> None:
    unknown = set(chosen) - set(OPTION_DEFAULTS)
    if unknown:
        raise ValueError(f"{node}: unknown inputs {sorted(unknown)}")
    require_finite(node, **chosen)
    preset = chosen.get("preset", "auto")
    if preset not in PRESETS:
        raise ValueError(f"{node}: unknown preset {preset!r}; choose from {PRESETS}")


def lookback_fits(option) -> bool:
    """Whether the options leave room for lookback acceptance: SpeCa at stack granularity with
    the default metric. Another method, block granularity (ClusCa, per-block forecasts) or a
    probe metric asks for what only the per-step probe does."""
    return option("method") == "speca" and option("granularity") == "stack" and option("metric") == "relative_norm"


def preset_config(preset: str, family: Family, user: dict, mode_values: dict | None = None,
                  fixed: dict | None = None) -> CacheConfig:
    """Layers 1, 2 and 4 (and the mode's values for what the user left unset): ``user`` are the
    engine settings the user set, ``fixed`` what the main node always sets (threshold, start,
    end, target)."""
    if preset not in PRESETS:
        raise ValueError(f"Speculative Cache: unknown preset {preset!r}; choose from {PRESETS}")
    values = {**(mode_values or {}), **user, **(fixed or {})}
    if values.get("storage_dtype") == "auto":
        values["storage_dtype"] = None
    if preset == "custom":
        return CacheConfig(**values)
    if preset in PAPER:
        return CacheConfig(**{**values, **PAPER[preset], "threshold": values.get("threshold", 7.0)})
    tuned = (family if preset == "auto" else BY_NAME[preset]).tuned
    return CacheConfig(**{**{k: v for k, v in tuned.items() if k not in user}, **values})


def resolve(mode: str, speed: float, start_percent: float, end_percent: float, family: Family,
            chosen: dict | None, lookback: bool = True) -> Recipe:
    """The recipe of the main node's inputs. ``family``: the registry entry whose tuned preset
    the run starts from (``families.GENERIC`` for a model forecast at output level without an
    entry). ``chosen``: the Options the user set, by Options name. ``lookback=False``: the same
    inputs with the per-step probe (auto becomes probe)."""
    if mode not in MODES:
        raise ValueError(f"Speculative Cache: unknown mode {mode!r}; choose from {MODES}")
    require_finite("Speculative Cache", speed=speed, start_percent=start_percent, end_percent=end_percent)
    if not 0.0 <= float(speed) <= 1.0:
        raise ValueError(f"Speculative Cache: speed must lie in [0, 1], got {speed}")
    chosen = dict(chosen or {})
    check_options(chosen)
    config, what = _resolve(mode, float(speed), float(start_percent), float(end_percent), family, chosen, lookback)
    edit_twin = None
    if config.looks_back:
        edit_twin = _resolve(mode, float(speed), float(start_percent), float(end_percent), family, chosen,
                             False)[0]
    return Recipe(config, what, int(chosen.get("memory_budget_mb", 0) or 0), edit_twin)


def _resolve(mode, speed, start_percent, end_percent, family, chosen, lookback):
    def option(name):
        return chosen.get(name, OPTION_DEFAULTS[name])

    notes = []
    looks_back = lookback and mode in ("auto", "speed_target") and lookback_fits(option)
    if mode == "auto" and not looks_back:
        mode = "probe"
        if lookback:
            notes.append("probe: the Options node's method, granularity or metric need the per-step probe")
    preset = option("preset")
    override = float(option("threshold"))
    correction = CORRECTION_DEGREE if option("trajectory_correction") else 0
    target_override = float(option("target_speedup"))
    if target_override and not 1.0 <= target_override <= MAX_TARGET_SPEEDUP:
        # (checked here too: outside speed_target the value never reaches the config's check)
        raise ValueError(f"Speculative Cache Options: target_speedup must be 0 (from the slider) or "
                         f"between 1 and {MAX_TARGET_SPEEDUP:g}, got {target_override}")
    user = {k: v for k, v in chosen.items() if k in ENGINE_OPTIONS}
    fixed = {"start_percent": start_percent, "end_percent": end_percent}
    if mode in PAPER:
        preset = mode
        base = PAPER_BASE_THRESHOLD[mode]
        overridden = sorted(k for k in user if k in PAPER[mode])
        if overridden:
            notes.append(f"the paper's settings replace the Options node's {', '.join(overridden)}")
    elif mode == "auto":
        base = LOOKBACK_THRESHOLD if override >= 0.0 else RUN_TOLERANCE
    else:
        base = BASE_THRESHOLD[option("metric")]
    if speed <= 0.0:
        # 0 = off, whatever the method: the model runs as without the node.
        return preset_config("custom", family, dict(user, method="speca", threshold=0.0), fixed=fixed), "off (speed 0)"
    if mode == "speed_target" and target_override:
        # The run starts from the threshold of the slider position asking for this target
        # (targets up to 5x run exactly as the slider would ask for them).
        speed = slider_speed(target_override)
    fixed["threshold"] = override if override >= 0.0 else speed_to_threshold(speed, base)
    mode_values = {}
    if mode == "speed_target":
        fixed["target_speedup"] = target_override or mapped_target(speed)
        # Linear forecasts hold up better over the longer streaks a target asks for (on the
        # reference model at 2x: 40.2 dB with order 1, 32.3 dB with order 2).
        mode_values["order"] = SPEED_TARGET_ORDER
    config = preset_config(preset, family, user, mode_values, fixed)
    if mode == "auto":
        config = _lookback_schedule(config, option, chosen, correction, exact=override >= 0.0)
        what = (f"lookback, tolerance {config.threshold:.4g} x this run's one-step forecast error"
                if config.tolerance_unit == "run" else
                f"lookback, tolerance {config.threshold:.4g} (relative error of the model output)")
    elif mode == "speed_target":
        config = _speed_target_schedule(config, chosen, looks_back, correction)
        what = (f"target {config.target_speedup:.2f}x, model calls planned from the sampler's sigmas"
                if config.plans_target else
                f"target {config.target_speedup:.2f}x, starting threshold {config.threshold:.4g}"
                f" ({'lookback' if looks_back else 'probe'})")
    elif not family.block_level and mode == "probe":
        # No verification probe at the output level, so no threshold to set: the slider sets
        # how many forecasts may follow a computed step instead (0.5: the preset's 2).
        if "max_forecast_steps" not in chosen:
            config = dataclasses.replace(config, max_forecast_steps=max(1, math.ceil(4.0 * speed - 1e-9)))
        what = f"output level: up to {config.max_forecast_steps} forecasts after each computed step"
    else:
        what = f"threshold {config.threshold:.4g} ({config.metric})"
    if target_override and mode != "speed_target":
        notes.append(f"the Options node's target_speedup {target_override:g} is ignored (it is for mode speed_target)")
    if chosen.get("trajectory_correction") and not config.looks_back:
        notes.append("the Options node's trajectory_correction is for lookback runs (modes auto and speed_target)")
    return config, "; ".join([what, *notes])


def _lookback_schedule(config: CacheConfig, option, chosen: dict, correction: int, exact: bool) -> CacheConfig:
    """auto: lookback acceptance. The whole model output is forecast, as the noise it implies
    for flow models, with a linear polynomial, and each step's tolerance weighted by its size in
    sigma (what the user left unset). On the reference models (8 samples) order 1 and the
    weighting were the best of what was tried (README, "Lookback").

    ``correction`` (its degree, 0 = off): runs with an Euler sampler get the trajectory correction;
    a run whose sampler cannot have it falls back from LOOKBACK_THRESHOLD to UNCORRECTED_THRESHOLD,
    unless ``exact`` (the Options set the threshold)."""
    changes = {"acceptance": "lookback", "output_space": "noise",
               "max_forecast_steps": option("max_forecast_steps"),      # not a family preset's cap
               "trajectory_correction": correction}
    if correction and not exact:
        changes["uncorrected_threshold_scale"] = UNCORRECTED_THRESHOLD / LOOKBACK_THRESHOLD
    if not exact:
        # (at 8 steps or fewer the unit is fixed so that the tolerance is LOOKBACK_THRESHOLD's
        # absolute one, what the slider set before it counted the run's own error)
        changes.update(tolerance_unit="run", run_unit_cap=RUN_UNIT_CAP,
                       few_steps_unit=LOOKBACK_THRESHOLD / RUN_TOLERANCE)
    if "order" not in chosen:
        changes["order"] = 1
    if "step_weighting" not in chosen:
        changes["step_weighting"] = True
    return dataclasses.replace(config, **changes)


def _speed_target_schedule(config: CacheConfig, chosen: dict, looks_back: bool, correction: int) -> CacheConfig:
    """A speed target's schedule, for what the user left unset: warm-up only as long as the
    forecast needs points (order + 1), so the budget goes to the schedule, and the threshold
    weighted by each step's size in sigma, so the forecasts a tight budget forces go where the
    image feels them least. On the 19-block reference model (8 samples) this took 2x from 42.2 to
    44.2 dB, 3x from 0.376 compute / 32.4 dB to 0.352 / 34.9 dB, and 4x from 25.3 to 29.8 dB at the
    same compute (benchmarks/lab/schedule_sweep.py).

    ``looks_back``: the forecasts are accepted by lookback (the steered threshold is then the
    tolerance of the output forecast's predicted error). With the probe (the Options asked for
    it), the forecast of the model output itself is served on accepted steps (the stage forecasts
    still feed the probe)."""
    changes = ({"acceptance": "lookback", "output_space": "noise", "trajectory_correction": correction}
               if looks_back else {"serve_output": True})
    if looks_back and correction and "order" not in chosen:
        # The budget sets the schedule here, so a better forecast is more PSNR at the same compute.
        changes["fitted_curvature"] = True
    if "warmup_steps" not in chosen:
        changes["warmup_steps"] = min(config.warmup_steps, config.order + 1)
    if "step_weighting" not in chosen:
        changes["step_weighting"] = True
    if "max_forecast_steps" not in chosen and config.target_speedup > mapped_target(1.0):
        # Beyond the slider's end (the Options node's target_speedup) the target's own cap on
        # forecasts in a row, where it is longer than the family's; the slider's targets keep
        # the family's cap.
        changes["max_forecast_steps"] = max(config.max_forecast_steps, streak_cap(config.target_speedup))
    return dataclasses.replace(config, **changes)


# ---- graphs saved before the main node and its Options were split ----------------------------
# The legacy 19-input node's inputs, and their defaults (every one a CacheConfig field but preset).
LEGACY_DEFAULTS = {"preset": "auto", **{name: getattr(_D, name) for name in (
    "method", "threshold", "forecaster", "order", "warmup_steps", "max_forecast_steps", "start_percent",
    "end_percent", "final_full_steps", "on_reject", "metric", "threshold_decay", "threshold_floor")},
    "storage_dtype": "auto", **{name: getattr(_D, name) for name in ("granularity", "clusters", "gamma")}}


def legacy_config(family: Family, values: dict) -> CacheConfig:
    """The legacy node's config: every input a CacheConfig field under its preset (no mode), the
    inputs it left at their defaults taking the family's tuned values."""
    values = {**LEGACY_DEFAULTS, **values}
    chosen = {k: v for k, v in values.items() if k != "preset" and v != LEGACY_DEFAULTS[k]}
    fixed = {"threshold": values["threshold"]}      # (the paper presets read it as their base threshold)
    return preset_config(values["preset"], family, chosen, fixed=fixed)


def migrate_legacy(values: dict) -> dict:
    """The main node's inputs that give the legacy node's settings ``values`` (by input name,
    whatever order a saved graph stored them in): mode, speed, start/end percent, and the
    Options to set (``options``: None when none is needed)."""
    v = {**LEGACY_DEFAULTS, **values}
    preset = v["preset"]
    mode = preset if preset in PAPER else "probe"          # the legacy node always probes
    base = PAPER_BASE_THRESHOLD[mode] if mode in PAPER else BASE_THRESHOLD[v["metric"]]
    threshold = float(v["threshold"])
    options = {name: v[name] for name in ENGINE_OPTIONS if name in v and v[name] != OPTION_DEFAULTS[name]}
    if options.get("storage_dtype") == "auto":
        del options["storage_dtype"]
    if preset not in PAPER and preset != "auto":
        options["preset"] = preset
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
    return {"mode": mode, "speed": speed, "start_percent": v["start_percent"], "end_percent": v["end_percent"],
            "options": options or None}


def describe_migration(migrated: dict) -> str:
    options = migrated["options"] or {}
    main = f"Speculative Cache (mode {migrated['mode']}, speed {migrated['speed']:.2f}"
    if (migrated["start_percent"], migrated["end_percent"]) != (0.0, 1.0):
        main += f", start {migrated['start_percent']}, end {migrated['end_percent']}"
    changed = ", ".join(f"{k}={v}" for k, v in options.items())
    return main + ")" + (f" + Speculative Cache Options ({changed})" if changed else "")


__all__ = ["Recipe", "resolve", "legacy_config", "migrate_legacy", "describe_migration", "speed_to_threshold",
           "OPTION_DEFAULTS", "ENGINE_OPTIONS", "MODES", "LEGACY_DEFAULTS", "GENERIC"]
