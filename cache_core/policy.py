"""The one place that decides, for each model evaluation, whether the model runs
fully or its features are forecast (and whether that forecast is verified)."""

from __future__ import annotations

import enum
import math
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
    cond_only: bool = False     # a planned cond-only step: run cond's half of a CFG batch only

    @property
    def forecast(self) -> bool:
        return self.mode is StepMode.FORECAST


# Runs of this many steps or fewer (distilled models: FLUX.1 schnell, Lightning LoRAs) get no
# overhead budget at all: a verification probe runs only once the forecasts before it have saved
# what its rejection would waste, so the cache never costs more than the uncached run.
FEW_STEPS = 8


class Policy:
    """Warm-up and final full steps, a time window, min/max forecasts in a row, and a
    forced full step after a rejection in SpeCa's "next" mode.

    Times are in the sampler's coordinate (sigma): higher is earlier. Forecasting is
    allowed while ``start_time >= t > end_time``."""

    def __init__(self, config: CacheConfig, total_steps: int,
                 start_time: float = float("inf"), end_time: float = float("-inf"), threshold_for=None):
        self.config = config
        self.total_steps = max(int(total_steps), 1)
        self.start_time = float(start_time)
        self.end_time = float(end_time)
        self.forecasts_since_full = 0
        self.force_full_next = False
        self.last_full = False
        self.threshold_for = threshold_for or (lambda step_index: config.threshold)   # step -> tau
        self.max_forecasts = config.max_forecast_steps      # forecasts in a row (a speed target may lower it)
        # Error prediction (our extension of SpeCa): the verification error of a forecast
        # grows with its distance d to the last computed step, roughly as d^g. From the
        # last verified error of this run of forecasts, the next one is predicted; a step
        # whose forecast is predicted to fail is computed right away (no wasted probe), and
        # a forecast predicted to pass with a wide margin skips its probe.
        self.growth = float(config.order + 1)     # starting guess for g (Taylor order p: p + 1)
        self.first_error = None                   # running estimate of the error at d = 1
        self.last_verified = None                 # (d, error) in the current run of forecasts
        # Back-off: the cost ledger of the run (block units), set by the run before each
        # decision, and the rejections of first forecasts in a row.
        self.units_spent = 0.0                    # units run so far (probes included)
        self.units_full = 0.0                     # units an uncached run would have run so far
        self.evaluations = 0                      # evaluations booked so far
        self.probe_waste = None                   # units one rejected probe cost (measured)
        self.probe_cost = None                    # units one probe costs (known before any is run)
        self.first_rejections = 0                 # first forecasts after a full step rejected in a row
        self.cooldown = 0                         # full steps to take before the next attempt
        # Lookback acceptance: (distance, error) of the output forecast measured at the last
        # computed step, and the longest distance measured in this run.
        self.lookback = None
        self.lookback_reach = 0
        # The run's one-step forecast error (tolerance_unit "run"): the sum of the logs of the
        # lookback errors brought back to distance 1, and how many.
        self._unit_log_sum = 0.0
        self._unit_count = 0
        # A planned speed target (target.plan_schedule): the steps that run the model; the
        # others are forecast without a check (None: the threshold decides); and the steps of it
        # that run cond's half of a CFG batch only (uncond from the last computed difference).
        self.plan: frozenset | None = None
        self.cond_only_plan: frozenset = frozenset()

    def progress(self, step_index: int) -> float:
        return min(max(step_index / self.total_steps, 0.0), 1.0)

    def decide(self, step_index: int, time: float, has_history: bool = True) -> Decision:
        c = self.config
        full = lambda why: Decision(StepMode.FULL, False, why)  # noqa: E731
        if not c.enabled:
            return full("disabled")
        planned = self.plan is not None      # a planned speed target: no warm-up, no check
        if (c.paper_schedule and not planned and self.last_full and has_history
                and step_index < self.total_steps - c.final_full_steps):
            # SpeCa's reference state machine: after a full step always one forecast, even
            # in warm-up (so warm-up 3 computes steps 0 and 2).
            return Decision(StepMode.FORECAST, False, "after_full")
        if step_index < c.warmup_steps and not planned:
            return full("warmup")
        if step_index >= self.total_steps - c.final_full_steps:
            return full("final")
        if not self.in_window(time):
            return full("window")
        if not has_history:
            return full("no_history")
        if planned:
            if step_index in self.cond_only_plan:
                return Decision(StepMode.FULL, False, "plan", cond_only=True)
            return full("plan") if step_index in self.plan else Decision(StepMode.FORECAST, False, "plan")
        if self.force_full_next:
            return full("after_reject")
        if not c.verifies:
            if self.forecasts_since_full >= self.max_forecasts:
                return full("interval")
            return Decision(StepMode.FORECAST, False, "interval")
        if self.forecasts_since_full >= self.max_forecasts:
            return full("max_forecast")
        if c.acceptance == "lookback":
            return self._decide_lookback(step_index)
        verify = self.forecasts_since_full >= c.unverified_forecasts
        if verify and self.forecasts_since_full == 0:
            if c.backoff and self.cooldown > 0:
                return full("backoff")
            if not self.probe_allowed():
                return full("budget")
        if c.predict_errors and verify:
            predicted = self.predicted_error(self.forecasts_since_full + 1)
            tau = self.threshold_for(step_index)
            # Only a prediction from this run of forecasts may refuse one (the error at d = 1
            # is always measured again, or the cache could never recover from a bad start).
            if predicted is not None and predicted > tau and self.last_verified is not None:
                return full("predicted_reject")
            if predicted is not None and predicted < c.skip_verify_below * tau:
                return Decision(StepMode.FORECAST, False, "predicted_accept")
        return Decision(StepMode.FORECAST, verify, "speculate")

    def in_window(self, time: float) -> bool:
        """Whether forecasting is allowed at this time (sigma: higher is earlier)."""
        return self.start_time >= time > self.end_time

    def _decide_lookback(self, step_index: int) -> Decision:
        """Lookback acceptance: nothing runs on a forecast step, so a forecast is checked after
        the fact. The computed step that ends a run of forecasts measured the error of the
        output forecast at its distance d0 from the computed step before it; a forecast at
        distance d is taken while e0 * (d / d0)**(order + 1) (the Taylor remainder's growth)
        stays under the step's threshold, and never beyond twice the longest distance measured
        (the growth law is not trusted further than that)."""
        full = lambda why: Decision(StepMode.FULL, False, why)  # noqa: E731
        if self.lookback is None:
            return full("no_measurement")
        d = self.forecasts_since_full + 1
        if d > 2 * self.lookback_reach:
            return full("reach")
        d0, e0 = self.lookback
        predicted = e0 * (d / d0) ** (self.config.order + 1)
        if not predicted <= self.threshold_for(step_index):
            return full("predicted_reject")
        return Decision(StepMode.FORECAST, False, "lookback")

    def record_lookback(self, error: float) -> None:
        """The output forecast's error measured at a computed step, at distance
        forecasts_since_full + 1 from the computed step before it (call before record_full)."""
        d = self.forecasts_since_full + 1
        self.lookback = (d, float(error) if math.isfinite(error) else float("inf"))
        self.lookback_reach = max(self.lookback_reach, d)

    def measure_unit(self, error: float) -> None:
        """A lookback error at distance forecasts_since_full + 1, into the run's unit (tolerance_unit
        "run"; call before record_full). It stands for the error at distance 1 that the growth law of
        _decide_lookback implies, e(d) = e(1) d^(order + 1); a zero error counts as 1e-6, and a
        non-finite one is left out (the cap bounds the unit from above)."""
        if not math.isfinite(error):
            return
        d = self.forecasts_since_full + 1
        self._unit_log_sum += math.log(max(float(error), 1e-6) / d ** (self.config.order + 1))
        self._unit_count += 1

    def run_unit(self) -> float | None:
        """The unit of a "run" tolerance: the geometric mean of the one-step forecast errors measured
        so far in this run (capped at run_unit_cap), or None before the first measurement; with
        FEW_STEPS steps or fewer, ``few_steps_unit`` where set (two or three measurements are too
        few to count in, and a short run's large steps make every error large). A
        geometric mean, because the errors spread over orders of magnitude along a schedule and
        the tolerance compares them by ratio."""
        if self.total_steps <= FEW_STEPS and self.config.few_steps_unit > 0.0:
            return self.config.few_steps_unit
        if self._unit_count == 0:
            return None
        return min(math.exp(self._unit_log_sum / self._unit_count), self.config.run_unit_cap)

    def forget_lookback(self) -> None:
        """A stream's history started over (new weights): forecast again only once measured again."""
        self.lookback = None
        self.lookback_reach = 0
        self._unit_log_sum, self._unit_count = 0.0, 0

    def probe_allowed(self) -> bool:
        """Whether one more probe fits the overhead budget: the units spent beyond an
        uncached run so far (negative once forecasts saved more than probes wasted), plus
        the waste of one more rejected probe, must stay within ``max_overhead`` of the
        whole uncached run (projected from the evaluations so far). So even when every
        forecast fails, the run costs at most 1 + max_overhead of an uncached one (plus the
        first probe's waste, unknown before it runs). With FEW_STEPS steps or fewer the budget
        is zero and the first probe's waste is taken to be what a probe costs (``probe_cost``,
        set by the run): such a run never costs more than the uncached one."""
        few = self.total_steps <= FEW_STEPS
        waste = self.probe_waste if self.probe_waste is not None else (self.probe_cost if few else None)
        if waste is None or self.evaluations == 0 or self.config.max_overhead == float("inf"):
            return True
        budget = 0.0 if few else self.config.max_overhead
        projected_full = self.units_full / self.evaluations * max(self.total_steps, self.evaluations)
        over = self.units_spent - self.units_full
        return over + waste <= budget * projected_full

    def set_ledger(self, units_spent: float, units_full: float, evaluations: int) -> None:
        self.units_spent, self.units_full, self.evaluations = float(units_spent), float(units_full), int(evaluations)

    def record_rejected_probe(self, waste: float, distance: int) -> None:
        """A verified forecast at ``distance`` from the last full step failed; ``waste``:
        the units its probe cost on top of the full recomputation."""
        if waste > 0:
            self.probe_waste = waste if self.probe_waste is None else max(self.probe_waste, waste)
        if distance == 1:
            self.first_rejections += 1
            # 1, 3, 7, ... full steps before the next attempt, from the second failure on
            self.cooldown = 2 ** (self.first_rejections - 1) - 1

    def record_accepted(self) -> None:
        self.first_rejections = 0

    def predicted_error(self, distance: int):
        if self.last_verified is not None:
            d0, e0 = self.last_verified
            if d0 == distance - 1 and d0 > 0:
                return e0 * (distance / d0) ** self.growth
            return None
        if distance == 1:
            return self.first_error
        return None

    def record_error(self, error: float) -> None:
        """The verification error of the forecast at distance forecasts_since_full + 1."""
        d = self.forecasts_since_full + 1
        if self.last_verified is not None and self.last_verified[0] == d - 1 and error > 0 and self.last_verified[1] > 0:
            import math
            g = math.log(error / self.last_verified[1]) / math.log(d / (d - 1))
            self.growth = 0.5 * self.growth + 0.5 * min(max(g, 0.5), 6.0)
        if d == 1:
            self.first_error = error if self.first_error is None else 0.5 * self.first_error + 0.5 * error
        self.last_verified = (d, error)

    def record_full(self) -> None:
        if self.cooldown > 0 and self.forecasts_since_full == 0:
            self.cooldown -= 1
        self.forecasts_since_full = 0
        self.force_full_next = False
        self.last_full = True
        self.last_verified = None

    def record_forecast(self) -> None:
        self.forecasts_since_full += 1
        self.last_full = False

    def request_full_next(self) -> None:
        self.force_full_next = True
