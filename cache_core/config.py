"""Settings of one Speculative Cache, validated once. Immutable and tensor-free, so
ComfyUI may copy it as often as it likes."""

from __future__ import annotations

from dataclasses import dataclass, replace

METHODS = ("speca", "taylorseer")
METRICS = ("relative_norm", "relative_l1")
ON_REJECT = ("redo", "next")


@dataclass(frozen=True)
class CacheConfig:
    # "speca": forecast, then verify each forecast with one real block (SpeCa).
    # "taylorseer": forecast at a fixed interval, no verification (TaylorSeer).
    method: str = "speca"
    # Verification tolerance. 0 disables forecasting entirely (output identical
    # to the unpatched model).
    threshold: float = 0.15
    # Threshold schedule (SpeCa): tau(p) = max(threshold * decay**p, floor), p in [0, 1]
    # the progress along the schedule. decay = 1 keeps it constant.
    threshold_decay: float = 1.0
    threshold_floor: float = 0.0
    metric: str = "relative_norm"
    # Forecast polynomial order (0 = reuse the last computed features).
    order: int = 2
    # Full steps at the start and at the end of the schedule.
    warmup_steps: int = 3
    final_full_steps: int = 1
    # Forecasts right after a full step that are taken without verification
    # (SpeCa's min_taylor_steps - 1); 0 verifies every forecast.
    unverified_forecasts: int = 0
    # At most this many forecasts in a row, then a full step.
    max_forecast_steps: int = 4
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
    def verifies(self) -> bool:
        return self.method == "speca"

    @property
    def enabled(self) -> bool:
        """Whether any step may be forecast. A zero threshold turns SpeCa off."""
        return not (self.method == "speca" and self.threshold <= 0.0)

    def with_(self, **changes) -> "CacheConfig":
        return replace(self, **changes)
