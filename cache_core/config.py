"""Settings of one Speculative Cache, validated once. Immutable and tensor-free, so
ComfyUI may copy it as often as it likes."""

from __future__ import annotations

from dataclasses import dataclass

from .forecasters import REGISTRY as FORECASTER_REGISTRY
from .output_space import SPACES
from .target import MAX_TARGET_SPEEDUP, PLANNED_FROM

# The fixed-interval methods: TaylorSeer, FORA's reuse, one per registered forecaster other than
# the Taylor default (hicache, foca, spectrum, ...), and ClusCa; "speca" verifies.
METHODS = ("speca", "taylorseer", "reuse", *(n for n in FORECASTER_REGISTRY if n != "taylor"), "clusca")
GRANULARITIES = ("stack", "block")
TIME_AXES = ("sigma", "step")
METRICS = ("relative_norm", "relative_l1", "relative_change")
ON_REJECT = ("redo", "next")
ACCEPTANCE = ("probe", "lookback")
TOLERANCE_UNITS = ("absolute", "run")
TARGET_SCHEDULES = ("auto", "planned", "adaptive")


@dataclass(frozen=True)
class CacheConfig:
    # "speca": forecast, then verify each forecast with one real block (SpeCa), with the
    #   draft ``forecaster``. The others forecast at a fixed interval without verification:
    # "taylorseer" (Taylor), "reuse" (FORA: order 0), "hicache" (Hermite), "foca" (FoCa),
    # "spectrum" (Spectrum's Chebyshev/ridge fit).
    method: str = "speca"
    forecaster: str = "taylor"       # SpeCa's draft: a registered forecaster (forecasters/)
    time_axis: str = "sigma"         # forecast coordinate: sigma, or step index (papers)
    hicache_scale: float = 0.7       # HiCache's sigma (the paper's FLUX script uses 0.7)
    # The SpeCa reference code never computes two steps in a row fully (even in warm-up).
    paper_schedule: bool = False
    # Predict each forecast's verification error from the last ones (see Policy): compute
    # a step at once when its forecast is predicted to fail, skip the probe when it is
    # predicted to pass by a wide margin (error below skip_verify_below x threshold).
    predict_errors: bool = True
    skip_verify_below: float = 0.5
    # Back-off (see Policy.probe_allowed): verification probes of forecasts that were then
    # rejected may cost at most this fraction of an uncached run beyond what accepted
    # forecasts saved, so the cache never costs more than 1 + max_overhead of running
    # without it; and after repeated rejections of the first forecast after a full step,
    # the next attempts wait 1, 3, 7, ... steps. The paper presets turn both off.
    max_overhead: float = 0.02
    backoff: bool = True
    # Weight the acceptance by the step's size in sigma: a forecast's error moves the sample
    # by about (sigma_k - sigma_k+1) x error, so the threshold of step k is multiplied by
    # mean step / step k (clamped to [1/4, 4]): lenient where the sampler takes small steps,
    # strict on the large final ones (benchmarks/diagnose_schedule.py measured this).
    step_weighting: bool = False
    # Block level: serve the forecast of the model output itself on accepted forecast steps
    # (the stage forecasts still feed the verification probe).
    serve_output: bool = False
    # The space a forecast of the model output lives in (output level, and the served
    # output): "model" forecasts what the model returns; "noise" forecasts, for flow models,
    # the noise it implies and turns it back with the step's real input (output_space.py;
    # models that are not flow models keep "model").
    output_space: str = "model"
    # How SpeCa accepts a forecast. "probe" (the paper): each forecast step runs the real last
    # block on the forecast input and compares. "lookback": the model output is forecast as a
    # whole and nothing runs on a forecast step; every computed step measures how far the
    # forecast of its own output was (relative norm), and the next forecasts are taken while
    # the error predicted from that measurement stays under the threshold (policy.py).
    acceptance: str = "probe"
    # The unit of the lookback tolerance. "absolute": the threshold is a relative error of the
    # model output. "run": the threshold is a multiple of this run's own one-step forecast error
    # (the lookback errors measured so far, each brought back to distance 1 by the growth law;
    # their geometric mean, Policy.run_unit), so that a slider position means the same forecast
    # horizon on every model whatever its absolute error level; the unit is capped at
    # ``run_unit_cap`` (an absolute error), so a model whose forecasts are all poor is not
    # forecast further for it.
    tolerance_unit: str = "absolute"
    run_unit_cap: float = float("inf")
    # ... and the unit of a run of FEW_STEPS steps or fewer (policy.py), which measures too few
    # errors to count in: a fixed error level (0: the measured unit there too).
    few_steps_unit: float = 0.0
    # Lookback runs with an Euler sampler: at each computed step, re-estimate the forecast
    # steps since the last one by interpolation (this degree: 1 linear, 2 quadratic through
    # one more computed step) and let this step's update carry the difference (correction.py).
    # 0 turns it off.
    trajectory_correction: int = 0
    # The lookback tolerance is multiplied by this when the run asked for the trajectory
    # correction but its sampler takes no Euler steps (the tolerance was tuned with it).
    uncorrected_threshold_scale: float = 1.0
    # Speed target (see target.py): when >= 1, the threshold is steered during the run so
    # that it spends 1/target_speedup of an uncached run's compute. 0 turns it off.
    target_speedup: float = 0.0
    # Where a speed target puts its model calls: "planned" places them before the run from the
    # sigmas (target.plan_schedule), "adaptive" lets the threshold loop place them, "auto"
    # plans from target.PLANNED_FROM on.
    target_schedule: str = "auto"
    # "stack": forecast the residual of each block stage (small memory). "block": forecast
    # every block's attention and MLP outputs before the gate (TaylorSeer; large memory).
    granularity: str = "stack"
    # ClusCa: clusters of image tokens, and how far each token moves to its cluster's
    # fresh value at a forecast step.
    clusters: int = 16
    gamma: float = 0.005
    # SpecDiff token tiers (token_tiers.py), block level, double blocks' image MLP: at a
    # forecast step this fraction of the image tokens, the most important ones, is computed
    # for real, and ``token_reuse`` of them, the least important, keep their last computed
    # value; the rest take the forecast. 0 and 0 turn it off.
    token_compute: float = 0.0
    token_reuse: float = 0.0
    # Verification tolerance. 0 disables forecasting entirely (output identical
    # to the unpatched model). 0.1: tuned on the 19-block reference model (42 dB there, 47 dB
    # on the 6-block one; 0.15 gave 45 dB on the 6-block model but 35 dB on the deep one).
    threshold: float = 0.1
    # Threshold schedule (SpeCa): tau(p) = max(threshold * decay**p, floor), p in [0, 1]
    # the progress along the schedule. decay = 1 keeps it constant.
    threshold_decay: float = 1.0
    threshold_floor: float = 0.0
    metric: str = "relative_norm"
    # Forecast polynomial order (0 = reuse the last computed features).
    order: int = 2
    # With order 1 (Taylor, sigma axis): add a share of the quadratic term through one more
    # computed point, the share fitted during the run (forecasters.FittedCurvatureForecaster).
    fitted_curvature: bool = False
    # Full steps at the start and at the end of the schedule.
    warmup_steps: int = 3
    final_full_steps: int = 1
    # Forecasts right after a full step that are taken without verification
    # (SpeCa's min_taylor_steps - 1); 0 verifies every forecast.
    unverified_forecasts: int = 0
    # At most this many forecasts in a row, then a full step.
    max_forecast_steps: int = 8
    # Forecasting is allowed only between these fractions of the schedule.
    start_percent: float = 0.0
    end_percent: float = 1.0
    # On a rejected forecast: "redo" recomputes this step fully (never uses a
    # rejected forecast); "next" keeps it and computes the next step fully (SpeCa paper).
    on_reject: str = "redo"
    # Precision of the stored forecast factors: None keeps the features' dtype.
    storage_dtype: str | None = None

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.forecaster not in FORECASTER_REGISTRY:
            problems.append(f"forecaster must be one of {tuple(FORECASTER_REGISTRY)}, got {self.forecaster!r}")
        if self.time_axis not in TIME_AXES:
            problems.append(f"time_axis must be one of {TIME_AXES}, got {self.time_axis!r}")
        if not (0.0 < self.hicache_scale <= 2.0):
            problems.append(f"hicache_scale must be in (0, 2], got {self.hicache_scale}")
        if self.target_schedule not in TARGET_SCHEDULES:
            problems.append(f"target_schedule must be one of {TARGET_SCHEDULES}, got {self.target_schedule!r}")
        if self.acceptance not in ACCEPTANCE:
            problems.append(f"acceptance must be one of {ACCEPTANCE}, got {self.acceptance!r}")
        elif self.acceptance == "lookback" and self.method != "speca":
            problems.append(f"acceptance 'lookback' verifies forecasts, so it needs method 'speca', got {self.method!r}")
        if self.tolerance_unit not in TOLERANCE_UNITS:
            problems.append(f"tolerance_unit must be one of {TOLERANCE_UNITS}, got {self.tolerance_unit!r}")
        elif self.tolerance_unit == "run" and self.acceptance != "lookback":
            problems.append("tolerance_unit 'run' is measured by lookback acceptance, so it needs acceptance "
                            f"'lookback', got {self.acceptance!r}")
        if not (self.few_steps_unit >= 0.0):
            problems.append(f"few_steps_unit must be >= 0, got {self.few_steps_unit}")
        if not (self.run_unit_cap > 0.0):
            problems.append(f"run_unit_cap must be > 0, got {self.run_unit_cap}")
        if self.trajectory_correction not in (0, 1, 2):
            problems.append(f"trajectory_correction must be 0 (off), 1 or 2, got {self.trajectory_correction!r}")
        if not (0.0 < self.uncorrected_threshold_scale <= 1.0):
            problems.append(f"uncorrected_threshold_scale must be in (0, 1], got {self.uncorrected_threshold_scale}")
        if self.output_space not in SPACES:
            problems.append(f"output_space must be one of {SPACES}, got {self.output_space!r}")
        if self.granularity not in GRANULARITIES:
            problems.append(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (1 <= self.clusters <= 4096):
            problems.append(f"clusters must be in 1..4096, got {self.clusters}")
        if not (0.0 <= self.gamma <= 1.0):
            problems.append(f"gamma must be in [0, 1], got {self.gamma}")
        if not (0.0 <= self.token_compute <= 1.0 and 0.0 <= self.token_reuse <= 1.0
                and self.token_compute + self.token_reuse <= 1.0):
            problems.append(f"token_compute and token_reuse must be fractions in [0, 1] with a sum of at most 1, "
                            f"got {self.token_compute} and {self.token_reuse}")
        if self.metric not in METRICS:
            problems.append(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.on_reject not in ON_REJECT:
            problems.append(f"on_reject must be one of {ON_REJECT}, got {self.on_reject!r}")
        if not (self.threshold >= 0.0):
            problems.append(f"threshold must be >= 0, got {self.threshold}")
        if not (0.0 < self.threshold_decay <= 1.0):
            problems.append(f"threshold_decay must be in (0, 1], got {self.threshold_decay}")
        if not (self.threshold_floor >= 0.0):
            problems.append(f"threshold_floor must be >= 0, got {self.threshold_floor}")
        if not (0 <= self.order <= 4):
            problems.append(f"order must be in 0..4, got {self.order}")
        for name in ("warmup_steps", "final_full_steps", "unverified_forecasts"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.max_overhead >= 0.0):
            problems.append(f"max_overhead must be >= 0, got {self.max_overhead}")
        if not (self.target_speedup == 0.0 or 1.0 <= self.target_speedup <= MAX_TARGET_SPEEDUP):
            problems.append(f"target_speedup must be 0 (off) or in [1, {MAX_TARGET_SPEEDUP:g}], "
                            f"got {self.target_speedup}")
        if self.max_forecast_steps < 1:
            problems.append(f"max_forecast_steps must be >= 1, got {self.max_forecast_steps}")
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0):
            problems.append("start_percent and end_percent must lie in [0, 1]")
        elif self.start_percent >= self.end_percent:
            problems.append(f"start_percent ({self.start_percent}) must be below end_percent ({self.end_percent})")
        if self.storage_dtype not in (None, "float32", "bfloat16", "float16"):
            problems.append(f"storage_dtype must be float32, bfloat16 or float16, got {self.storage_dtype!r}")
        if problems:
            raise ValueError("Speculative Cache: " + "; ".join(problems))

    @property
    def plans_target(self) -> bool:
        """Whether the speed target's model calls are planned before the run (target.py)."""
        if self.target_speedup < 1.0:
            return False
        if self.target_schedule == "auto":
            return self.target_speedup >= PLANNED_FROM
        return self.target_schedule == "planned"

    @property
    def verifies(self) -> bool:
        return self.method == "speca"

    @property
    def looks_back(self) -> bool:
        """Forecasts of the whole model output, accepted from the errors measured at computed steps."""
        return self.acceptance == "lookback" and self.enabled

    @property
    def block_level(self) -> bool:
        """ClusCa and the token tiers work inside the blocks, so they always use block granularity."""
        return self.granularity == "block" or self.method == "clusca" or self.token_tiers

    @property
    def token_tiers(self) -> bool:
        return self.token_compute > 0.0 or self.token_reuse > 0.0

    @property
    def draft(self) -> str:
        """The forecaster that produces the features of a forecast step."""
        if self.method == "speca":
            return self.forecaster
        # a fixed-interval method named after a registered forecaster uses it (hicache, foca)
        return self.method if self.method in FORECASTER_REGISTRY else "taylor"

    @property
    def enabled(self) -> bool:
        """Whether any step may be forecast. A zero threshold turns SpeCa off."""
        return not (self.method == "speca" and self.threshold <= 0.0)
