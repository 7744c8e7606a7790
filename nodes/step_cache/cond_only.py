"""Cond-only steps of a planned speed target: at such a step the model runs on the positive
conditioning's half of the CFG batch only, and the negative's output is the positive's plus
the difference between the two at the last computed step (FasterCache's observation,
arXiv 2410.19355: that difference changes slowly). The forecast steps after it, up to the
next computed step, take uncond's output the same way: cond's own forecast (its line now runs
through the cond-only step) plus the difference.

The difference is kept in the denoised space the sampler's CFG combines (``calc_cond_batch``
returns denoised outputs for every model type). The trajectory correction takes a cond-only
step for a forecast one (trajectory.py): its uncond half is not exact, and correcting
the path from it cost 3.3 dB. 19-block reference model, 28 steps, 6x, 8 samples: 4 calls and
one cond-only call (compute 0.161) give 31.7 dB, 4 calls 28.6 dB, 5 calls (0.179) 28.9 dB.
The plan places it (cache_core.target.place_cond_only) and counts it as half a call; this
module runs it. A call that is not a plain [cond, uncond] pair runs both halves (over budget
by half a call, never a wrong picture), and so does every call of a run that calls more than
once per evaluation."""

from __future__ import annotations

import math

import torch

from ...cache_core.stats import COMPUTED, FORECAST


def available(guider) -> bool:
    """Whether the sampler will call the model with cond and uncond (CFG above or below 1
    with a negative prompt): only then can a plan count on cond-only steps."""
    cfg = getattr(guider, "cfg", None)
    conds = getattr(guider, "conds", None) or {}
    return (isinstance(cfg, (int, float)) and not math.isclose(float(cfg), 1.0)
            and bool(conds.get("positive")) and bool(conds.get("negative")))


class GuidanceDifference:
    """One run's (uncond - cond) at its last computed step, kept while a cond-only step or
    the forecast steps after one still need it."""

    def __init__(self, steps: frozenset):
        self.steps = steps              # the planned cond-only steps
        self.difference: torch.Tensor | None = None
        self.derived = False            # uncond is derived from cond until the next computed step
        self.off = False                # set when one evaluation made several calls

    def needed_after(self, step: int) -> bool:
        return not self.off and (self.derived or any(h > step for h in self.steps))

    def release(self) -> None:
        self.difference = None
        self.derived = False

    def turn_off(self) -> None:
        """One evaluation made several calls: ComfyUI's context windows (long videos) call
        calc_cond_batch once per window, and one difference cannot stand for every window.
        From then on the run makes whole calls."""
        self.off = True
        self.release()


def _pair(args, kwargs):
    """(conds, x) of a calc_cond_batch call whose conds are exactly [cond, uncond], else None."""
    if len(args) < 3 or kwargs:
        return None
    conds, x = args[1], args[2]
    if not (isinstance(conds, (list, tuple)) and len(conds) == 2 and conds[0] and conds[1]
            and isinstance(x, torch.Tensor)):
        return None
    return conds, x


def calc_cond_batch(ctx, executor, args, kwargs):
    """``calc_cond_batch`` for a run with cond-only steps planned (the CALC_COND_BATCH wrapper
    calls this after the evaluation has begun)."""
    state, run = ctx.guidance, ctx.run
    step = run.step_index
    pair = _pair(args, kwargs)
    if ctx.evaluations.repeated:
        state.turn_off()
    if state.off or pair is None:
        state.release()
        return executor(*args, **kwargs)
    conds, x = pair
    difference = state.difference
    usable = difference is not None and difference.shape == x.shape
    decision = run.decision
    if decision is not None and decision.cond_only and usable:
        out = list(executor(args[0], [conds[0], None], *args[2:]))
        out[1] = out[0] + difference.to(out[0].dtype)
        run.book_partial_evaluation(len(conds[0]) / (len(conds[0]) + len(conds[1])))
        state.derived = True
        return out
    out = executor(*args, **kwargs)
    outcome = run.current_outcome()
    if outcome == COMPUTED:
        state.derived = False
        state.difference = (out[1] - out[0]).detach() if state.needed_after(step) else None
    elif outcome == FORECAST and state.derived and usable:
        out = list(out)
        out[1] = out[0] + difference.to(out[0].dtype)
    if not state.needed_after(step):
        state.release()
    return out
