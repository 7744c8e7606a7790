"""Speed target: steer the verification threshold during a run so that the run spends
the compute a target speed-up allows (closed loop).

The acceptance test stays SpeCa's (a forecast is used only when its verification error is
below the threshold); what moves is the threshold, as a multiplier on the configured
schedule. After every model evaluation in the part of the schedule where forecasting is
allowed, the controller compares what that evaluation cost (1 for a full evaluation, a
small fraction for a verified forecast) with the fraction the rest of the run may still
spend, and nudges the multiplier in log space (stochastic approximation: the multiplier
settles where the mean cost equals the allowed fraction):

    allowed = (budget - spent - cost of the forced full steps still ahead) / (free steps left)
    log m  += gain * (cost of this evaluation - allowed)

Spending more than allowed loosens the threshold, spending less tightens it, so a run
whose forecasts verify easily keeps its fidelity and a hard one gives some up to meet the
target. Warm-up and final full steps are paid first; when they alone exceed the budget the
target cannot be met and the stats say so."""

from __future__ import annotations

import math

# The highest speed-up a target may ask for (the config's check and the Options node's input).
MAX_TARGET_SPEEDUP = 20.0


def mapped_target(speed: float, lo: float = 1.0, hi: float = 5.0) -> float:
    """The target speed-up of the simple node's ``speed`` slider in target mode:
    linear from ``lo`` (speed 0) to ``hi`` (speed 1); 0.5 asks for 3x."""
    speed = min(max(float(speed), 0.0), 1.0)
    return lo + (hi - lo) * speed


def slider_speed(target_speedup: float, lo: float = 1.0, hi: float = 5.0) -> float:
    """The slider position that asks for ``target_speedup`` (the inverse of ``mapped_target``,
    1 for targets beyond the slider's end)."""
    return min(max((float(target_speedup) - lo) / (hi - lo), 0.0), 1.0)


def streak_cap(target_speedup: float) -> int:
    """Forecasts in a row a target allows: twice the mean streak it needs (target - 1
    forecasts per computed step), so that a loose start cannot spend the run's forecasts in
    one long, error-prone streak before the loop has learned."""
    return max(1, int(math.ceil(2.0 * (target_speedup - 1.0))))


class SpeedTarget:
    """Closed-loop threshold multiplier for a target speed-up (see the module docstring)."""

    def __init__(self, target_speedup: float, total_steps: int, forced_final_steps: int,
                 gain: float = 1.0, lo: float = 1.0 / 30.0, hi: float = 100.0):
        if not target_speedup >= 1.0:
            raise ValueError(f"target speed-up must be >= 1, got {target_speedup}")
        self.target = float(target_speedup)
        self.fraction = 1.0 / self.target          # compute fraction the run may spend
        self.total_steps = max(int(total_steps), 1)
        self.forced_final = max(int(forced_final_steps), 0)
        self.gain = float(gain)
        self.lo, self.hi = float(lo), float(hi)
        self.log_scale = 0.0
        self.trace: list[float] = []                # multiplier after each update

    @property
    def streak_cap(self) -> int:
        return streak_cap(self.target)

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def allowed_fraction(self, step_index: int, units_spent: float, units_full: float, evaluations: int) -> float:
        """The mean cost per free evaluation the rest of the run may spend (in units of a
        full evaluation); below 0 the target is already out of reach."""
        if evaluations <= 0 or units_full <= 0:
            return self.fraction
        per_step = units_full / max(step_index + 1, 1)            # full units per sampler step
        budget = self.fraction * per_step * self.total_steps
        steps_left = self.total_steps - (step_index + 1)
        forced_left = min(self.forced_final, steps_left)
        free_left = steps_left - forced_left
        if free_left <= 0:
            return 1.0
        return (budget - units_spent - forced_left * per_step) / (free_left * per_step)

    def update(self, cost: float, allowed: float) -> None:
        """``cost``: this evaluation's units over a full evaluation's (0..1+)."""
        allowed = min(max(allowed, -1.0), 1.0)     # below 0: over budget, loosen fast
        self.log_scale += self.gain * (cost - allowed)
        self.log_scale = min(max(self.log_scale, math.log(self.lo)), math.log(self.hi))
        self.trace.append(self.scale)

    def feasible(self, warmup: int, final: int) -> bool:
        """Whether the forced full steps alone leave room for the target."""
        return (warmup + final) < self.fraction * self.total_steps
