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

import torch

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


# Planned schedule (our extension): beyond a few x, a run has too few model calls for a
# threshold to learn where to put them, and measuring first spends them early, where forecasts
# are cheapest. So the target places its calls before the run, from the sampler's sigmas.
# Error model (fitted to 41 fixed schedules of forecast_lab on the 19-block reference model at
# 28 and 50 steps; correlation 0.89 with PSNR at both): a forecast at distance d steps from the
# last computed step costs the final image  w_k * d**GROWTH,  w_k = (sigma_k - sigma_k+1)**SIZE
# (a velocity error moves the sample by the step's size; the squared error is what PSNR sees).
# Big late steps therefore get short runs of forecasts, and the small early ones long runs.
PLAN_SIZE_EXPONENT = 2.0
PLAN_GROWTH_EXPONENT = 3.0
# From this target on, speed_target mode plans (target_schedule "auto"); below it the threshold
# loop places the calls (it measured better at 3x; see the README's "Planned targets").
PLANNED_FROM = 4.0


def planned_calls(total_steps: int, target_speedup: float) -> int:
    """Model calls a target allows on ``total_steps`` steps: the nearest whole number (so a
    run lands within half a call of its target), at least 2 (the first step and the last)."""
    steps = max(int(total_steps), 1)
    return min(steps, max(2, int(round(steps / float(target_speedup)))))


def planned_budget(total_steps: int, target_speedup: float, cond_only: bool) -> tuple[int, int]:
    """(full calls, cond-only calls) a planned target spends. A cond-only call (cond's half of
    a CFG batch; ``cond_only``: the run has cond and uncond) counts half a call, so a budget
    of steps / target calls is met in half calls: whole calls and one half call when that is
    nearer the budget than ``planned_calls`` (28 steps at 6x: 4.5 calls, not 5)."""
    steps = max(int(total_steps), 1)
    budget = steps / float(target_speedup)
    full = planned_calls(steps, target_speedup)
    floor = max(2, int(math.floor(budget)))
    if cond_only and floor < full and floor + 1 < steps and abs(floor + 0.5 - budget) < abs(full - budget):
        return floor, 1
    return full, 0


def _plan_costs(sigmas):
    """The error model's costs: per_step[a, k], a forecast at step k from a computed step a
    (0 for k <= a); gap[a, b], forecasting steps a+1 .. b-1 from a (inf for b <= a)."""
    s = torch.as_tensor([float(x) for x in sigmas], dtype=torch.float64)
    steps = s.numel() - 1
    weight = (s[:-1] - s[1:]).abs() ** PLAN_SIZE_EXPONENT
    k = torch.arange(steps, dtype=torch.float64)
    distance = (k[None, :] - k[:, None]).clamp(min=0)                # [a, k]: k - a, 0 for k <= a
    per_step = weight[None, :] * distance ** PLAN_GROWTH_EXPONENT
    gap = torch.zeros(steps, steps, dtype=torch.float64)
    gap[:, 1:] = per_step.cumsum(1)[:, :-1]
    return per_step, gap.masked_fill(k[None, :] <= k[:, None], float("inf"))


def place_cond_only(plan, count: int = 1) -> list[int]:
    """The steps for ``count`` cond-only calls among the planned full calls ``plan``. The first
    goes to the middle of the first run of forecasts. That run is forecast from one computed step
    (a reuse, where the later runs have a line), and it costs the picture most: forecast_lab,
    19-block model, 28 steps, the plan 0, 12, 21, 27 with every other step computed gives 26.9 dB
    when only steps 1-11 are forecast, 37.6 and 35.3 dB for 13-20 and 22-26. A cond-only step
    there (cond's real output, uncond's from the difference) turns the reuse into a line:
    at steps 4, 6, 8: 30.1, 31.4, 30.8 dB; in the second run (step 17) 27.4 dB. Each further
    one goes to the middle of the longest run of forecasts left (the earliest of equals). The
    budget asks for at most one (``planned_budget``); more are for the lab
    (``benchmarks/lab/budget_trade.py``). Fewer than ``count`` where there is no room: none
    when the first two calls are adjacent."""
    calls = sorted(set(plan))
    if len(calls) < 2 or calls[1] - calls[0] < 2 or count < 1:
        return []
    placed = [(calls[0] + calls[1]) // 2]
    while len(placed) < count:
        taken = sorted(set(calls) | set(placed))
        # the longest run of forecasts between two calls, the earliest of equals
        length, start = max(((b - a, a) for a, b in zip(taken, taken[1:])), key=lambda run: (run[0], -run[1]))
        if length < 2:
            break
        placed.append(start + length // 2)
    return sorted(placed)


def plan_schedule(sigmas, calls: int, forced=()) -> list[int]:
    """The steps to compute (0-based, of ``len(sigmas) - 1``) that minimise the error model
    above with ``calls`` computed steps: dynamic programming over the last computed step.
    ``forced``: steps that are computed whatever the plan (the final steps, steps outside the
    node's window); no run of forecasts spans one. Step 0 is always computed."""
    steps = len(sigmas) - 1
    if steps <= 0:
        return []
    forced = sorted({int(k) for k in forced if 0 <= int(k) < steps} | {0})
    if calls >= steps:
        return list(range(steps))
    calls = max(int(calls), len(forced))
    per_step, gap = _plan_costs(sigmas)
    # no gap may span a forced step: forced steps strictly between a and b
    forced_upto = torch.zeros(steps, dtype=torch.float64)
    forced_upto[forced] = 1.0
    forced_upto = forced_upto.cumsum(0)                                  # forced steps in 0..k
    spans_forced = torch.zeros(steps, steps, dtype=torch.bool)
    spans_forced[:, 1:] = (forced_upto[None, :-1] - forced_upto[:, None]) > 0
    gap = gap.masked_fill(spans_forced, float("inf"))
    # best[m][b]: the least cost with m + 1 computed steps, the last at b
    best = torch.full((steps,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for _ in range(calls - 1):
        total = best[:, None] + gap
        best, came_from = total.min(0)
        choices.append(came_from)
    # the run's tail after the last computed step is forecast too (and may not span a forced step)
    tail = per_step.sum(1).masked_fill(forced_upto[-1] - forced_upto > 0, float("inf"))
    last = int(torch.argmin(best + tail))
    plan = [last]
    for came_from in reversed(choices):
        plan.append(int(came_from[plan[-1]]))
    return sorted(set(plan))
