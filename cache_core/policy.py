"""The one place that decides, for each model evaluation, whether the model runs
fully or its features are forecast (and whether that forecast is verified)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import CacheConfig


class StepMode(enum.Enum):
    FULL = "full"
    FORECAST = "forecast"


@dataclass(frozen=True)
class Decision:
    mode: StepMode
    verify: bool = False
    reason: str = ""

    @property
    def forecast(self) -> bool:
        return self.mode is StepMode.FORECAST


class Policy:
    """Warm-up and final full steps, a time window, min/max forecasts in a row, and a
    forced full step after a rejection in SpeCa's "next" mode.

    Times are in the sampler's coordinate (sigma): higher is earlier. Forecasting is
    allowed while ``start_time >= t > end_time``."""

    def __init__(self, config: CacheConfig, total_steps: int,
                 start_time: float = float("inf"), end_time: float = float("-inf")):
        self.config = config
        self.total_steps = max(int(total_steps), 1)
        self.start_time = float(start_time)
        self.end_time = float(end_time)
        self.forecasts_since_full = 0
        self.force_full_next = False
        self.last_full = False

    def progress(self, step_index: int) -> float:
        return min(max(step_index / self.total_steps, 0.0), 1.0)

    def decide(self, step_index: int, time: float, has_history: bool = True) -> Decision:
        c = self.config
        full = lambda why: Decision(StepMode.FULL, False, why)  # noqa: E731
        if not c.enabled:
            return full("disabled")
        if c.paper_schedule and self.last_full and has_history and step_index < self.total_steps - c.final_full_steps:
            # SpeCa's reference state machine: after a full step always one forecast, even
            # in warm-up (so warm-up 3 computes steps 0 and 2).
            return Decision(StepMode.FORECAST, False, "after_full")
        if step_index < c.warmup_steps:
            return full("warmup")
        if step_index >= self.total_steps - c.final_full_steps:
            return full("final")
        if not (self.start_time >= time > self.end_time):
            return full("window")
        if not has_history:
            return full("no_history")
        if self.force_full_next:
            return full("after_reject")
        if not c.verifies:
            if self.forecasts_since_full >= c.max_forecast_steps:
                return full("interval")
            return Decision(StepMode.FORECAST, False, "interval")
        if self.forecasts_since_full >= c.max_forecast_steps:
            return full("max_forecast")
        verify = self.forecasts_since_full >= c.unverified_forecasts
        return Decision(StepMode.FORECAST, verify, "speculate")

    def record_full(self) -> None:
        self.forecasts_since_full = 0
        self.force_full_next = False
        self.last_full = True

    def record_forecast(self) -> None:
        self.forecasts_since_full += 1
        self.last_full = False

    def request_full_next(self) -> None:
        self.force_full_next = True
