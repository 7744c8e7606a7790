"""One sampling run: policy, verifier, per-stream caches and stats together.

The ComfyUI glue creates one ``SpeculativeRun`` when sampling starts, calls
``begin_evaluation`` once per model evaluation, opens a ``Chunk`` for each batch the
model is called with, and calls ``close`` when the run ends (also on error).

An evaluation's chunks may run concurrently, one thread per device (ComfyUI's MultiGPU CFG
Split): what they add to the run (units, outcome, errors) goes through one lock, and what the
policy learns from an evaluation (its verification or lookback error, the worst of its chunks)
is booked once, when the evaluation ends, whatever order the chunks finished in."""

from __future__ import annotations

import math
import threading

import torch

from .config import CacheConfig
from .correction import MAX_CORRECTED_STREAK
from .forecasters import make_forecaster
from .output_space import can_forecast_noise
from .policy import FEW_STEPS, Decision, Policy, StepMode
from .state import StreamCache
from .stats import COMPUTED, FORECAST, REJECTED, RunStats
from .target import SpeedTarget, place_cond_only, plan_schedule, planned_budget
from .agreement import RankAgreement
from .verifier import Verifier, metric_from_sums, metric_sums, relative_norm


def step_scales(sigmas, clamp: float = 4.0) -> list[float]:
    """Per sampler step: mean step size / this step's size in sigma, clamped to
    [1/clamp, clamp]. A velocity error e at step k moves the sample by about
    (sigma_k - sigma_k+1) * e, so equal scaled thresholds mean equal effect on the sample."""
    s = [float(x) for x in sigmas]
    sizes = [abs(a - b) for a, b in zip(s[:-1], s[1:])]
    if not sizes:
        return []
    mean = sum(sizes) / len(sizes)
    return [min(max(mean / d, 1.0 / clamp), clamp) if d > 0 else clamp for d in sizes]


# A planned target that runs the model this many times or fewer in a run says so before it.
FEW_CALLS = 5

# Decisions the policy takes whatever the threshold: the speed target does not learn from them.
_FORCED = ("disabled", "warmup", "final", "window", "no_history", "plan")


class SpeculativeRun:
    def __init__(self, config: CacheConfig, total_steps: int, *,
                 start_time: float = float("inf"), end_time: float = float("-inf"),
                 mode: str = "", sigmas=None, cond_only: bool = False):
        self.config = config
        self.verifier = Verifier(config.metric, config.threshold,
                                 config.threshold_decay, config.threshold_floor)
        self.step_scales = step_scales(sigmas) if (config.step_weighting and sigmas is not None) else None
        self.policy = Policy(config, total_steps, start_time, end_time, self.threshold)
        self.streams: dict = {}
        self.stats = RunStats(method=config.method, mode=mode, steps=int(total_steps),
                              on_reject=config.on_reject, target_speedup=float(config.target_speedup),
                              acceptance=config.acceptance)
        self.target = None
        if config.target_speedup >= 1.0 and config.verifies and config.enabled:
            self.target = SpeedTarget(config.target_speedup, total_steps, config.final_full_steps)
            self.policy.max_forecasts = min(config.max_forecast_steps, self.target.streak_cap)
            if config.plans_target:
                self._plan_target(total_steps, sigmas, cond_only)
        # the ranks that run this picture together (sequence parallelism, FSDP) agree on every
        # decision taken from a tensor; on one process: inactive
        self.agreement = RankAgreement.from_environment()
        self.tolerance_scale = 1.0  # 1, or the config's uncorrected_threshold_scale (note_correction)
        self.correction = None      # the trajectory correction the glue attached (correction.py), or None
        self._allowed = None        # the speed target's allowed cost for this evaluation
        self.step_index = 0
        self.time = float("nan")
        self.decision: Decision | None = None
        self._eval_outcome = None
        self._eval_lookback = None     # (worst lookback error, threshold) measured in this evaluation
        self._eval_verified = None     # (worst verification error, threshold, every chunk passed)
        self._call_outcomes = set()    # the outcomes of the chunks of the sampler's current call
        self._recompute_from = None    # (full units, outcome, decision) before a recomputation
        self._lock = threading.Lock()  # chunks of one evaluation may finish in several threads
        self._eval_start_units = (0.0, 0.0)
        self.closed = False

    def _plan_target(self, total_steps: int, sigmas, cond_only: bool = False) -> None:
        """Place the target's model calls before the run (target.plan_schedule). Without the
        sigmas, steps of equal size are assumed. ``cond_only``: the sampler runs cond and
        uncond (CFG) and the glue can run cond's half alone, so the budget may end in a half
        call (target.planned_budget)."""
        steps = max(int(total_steps), 1)
        if sigmas is None or len(sigmas) != steps + 1:
            sigmas = [1.0 - i / steps for i in range(steps + 1)]
        sigmas = [float(x) for x in sigmas]
        final = range(max(steps - self.config.final_full_steps, 0), steps)
        outside = [k for k in range(steps) if not self.policy.in_window(sigmas[k])]
        # a flow model's output forecast in noise space cannot be turned back this close to sigma 1
        unservable = ([k for k in range(1, steps) if not can_forecast_noise(sigmas[k])]
                      if self.config.output_space == "noise" else [])
        full, halves = planned_budget(steps, self.config.target_speedup, cond_only)
        plan = plan_schedule(sigmas, full, [*final, *outside, *unservable])
        self.policy.cond_only_plan = frozenset(place_cond_only(plan, halves))
        self.policy.plan = frozenset(plan) | self.policy.cond_only_plan
        self.stats.planned_steps = plan

    # ---- evaluation (one model call of the sampler, all chunks) -------------------
    def begin_evaluation(self, sigma: float, step_index: int | None = None) -> Decision:
        """``sigma``: the sampler's noise level of this evaluation (decides the window);
        the forecast coordinate ``time`` is sigma, or the step index on the step axis."""
        self.end_evaluation()
        if step_index is not None:
            self.step_index = int(step_index)
        self.sigma = float(sigma)
        self.time = self.sigma if self.config.time_axis == "sigma" else float(self.step_index)
        has_history = bool(self.streams) and any(s.forecasters for s in self.streams.values())
        st = self.stats
        self.policy.set_ledger(st.block_units, st.block_units_full, st.evaluations)
        # a probe runs one block (one unit) per stream
        self.policy.probe_cost = float(max(len(self.streams), 1))
        self._eval_start_units = (st.block_units, st.block_units_full)
        self.decision = self.policy.decide(self.step_index, self.sigma, has_history)
        self._allowed = None
        if self.target is not None and self.decision.reason not in _FORCED:
            self._allowed = self.target.allowed_fraction(self.step_index, st.block_units, st.block_units_full,
                                                         st.evaluations)
        self.stats.evaluations += 1
        self._eval_outcome = None
        self._call_outcomes = set()
        return self.decision

    def few_steps_note(self) -> str:
        """One line when the run has too few steps to save much (under 1.5x at best), saying
        why; '' otherwise. Distilled models (FLUX.1 schnell, Lightning LoRAs) sample in 4 to 8
        steps, and the warm-up and final steps are computed whatever the speed."""
        c, steps = self.config, self.policy.total_steps
        if not c.enabled:
            return ""
        if self.policy.plan is not None:
            forecastable = steps - len(self.policy.plan)
            why = f"the planned target computes {len(self.policy.plan)}"
        else:
            fixed = min(steps, c.warmup_steps + c.final_full_steps)
            forecastable = steps - fixed
            why = f"{min(c.warmup_steps, steps)} warm-up and {c.final_full_steps} final steps are always computed"
        best = steps / max(steps - forecastable, 1)
        probes = (c.verifies and not c.looks_back and self.policy.plan is None and steps <= FEW_STEPS
                  and c.max_overhead != float("inf"))
        if best >= 1.5 and not probes:
            return ""
        line = f"Speculative Cache: {steps} steps leave at most {forecastable} to forecast ({why}), at most {best:.2f}x"
        if probes:
            return (line + "; with this few steps a verification probe runs only once forecasts have paid for it, "
                    "so the cache never costs more than the uncached run (mode auto checks without probes).")
        return line + "; few-step models gain little, and a step that is not forecast costs nothing extra."

    def few_calls_note(self) -> str:
        """One line before a planned target that runs the model FEW_CALLS times or fewer in the whole
        run, where the picture falls off: on the three reference models 6x to 8x on 28 steps (4 or 5
        calls, a cond-only call counted as one) kept 20.9 to 31.7 dB of the uncached picture, where
        8x on 50 steps (6 calls) kept 27.4 to 31.7 (docs/nodes.md, "Speed target"). '' otherwise."""
        calls = len(self.policy.plan or ())
        if not calls or calls > FEW_CALLS:
            return ""
        steps = self.policy.total_steps
        return (f"Speculative Cache: the {self.config.target_speedup:g}x target on {steps} steps runs the model "
                f"{calls} times in all; on the reference models runs of {FEW_CALLS} calls or fewer kept 21-32 dB of "
                f"the uncached picture, visibly changed. More steps at the same target keep more of it.")

    def count(self, **increments) -> None:
        """Add to the stats' counters, from whichever device's thread the chunk runs in."""
        with self._lock:
            for name, n in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def begin_call(self) -> None:
        """A call of the sampler's batch function begins (every stream of the evaluation, or
        one context window's): ``needs_recompute`` looks at its chunks only."""
        self._call_outcomes = set()

    def needs_recompute(self) -> bool:
        """Whether the sampler's current call must be made again with every chunk computed: a
        chunk's forecast was rejected in "redo" mode (the call is recomputed whole, as one batch
        would be), or its chunks came back mixed, one keeping a forecast while another computed
        (a forecast that could not be used). One batch takes one outcome for all its streams;
        when ComfyUI splits the batch (MultiGPU CFG Split: one chunk per device; a batch too big
        for memory) the picture must not depend on the split."""
        outcomes = self._call_outcomes
        redo = self.config.on_reject == "redo"
        if redo and REJECTED in outcomes:
            return True
        kept = {FORECAST} if redo else {FORECAST, REJECTED}
        return bool(outcomes & kept) and bool(outcomes - kept)

    def recompute_evaluation(self) -> None:
        """Compute the current call again, all of it (after ``needs_recompute``): its chunks
        record their features at this time again (a forecaster replaces a point at the same
        time); the units they spend count, their full units do not count twice."""
        with self._lock:
            self._recompute_from = (self.stats.block_units_full, self._eval_outcome, self.decision)
        self.decision = Decision(StepMode.FULL, reason="recompute")
        self._call_outcomes = set()

    def end_recompute(self) -> None:
        """The evaluation stays booked as what it was (rejected, recomputed), over the same
        full units; the recomputation's units count as spent."""
        with self._lock:
            if self._recompute_from is not None:
                self.stats.block_units_full, self._eval_outcome, self.decision = self._recompute_from
                self._recompute_from = None

    def book_partial_evaluation(self, share: float) -> None:
        """The current evaluation ran ``share`` of its batch (a cond-only step): book it as that
        share of an evaluation's full units so far, whatever its chunks counted (cond alone
        is a whole chunk to them, batched with uncond or not)."""
        st = self.stats
        units0, full0 = self._eval_start_units
        ran_full = st.block_units_full - full0
        fraction = (st.block_units - units0) / ran_full if ran_full > 0 else 1.0
        earlier = st.evaluations - 1
        per_evaluation = full0 / earlier if earlier > 0 and full0 > 0 else ran_full
        st.block_units_full = full0 + per_evaluation
        st.block_units = units0 + per_evaluation * share * fraction
        if self.step_index not in st.cond_only_steps:
            st.cond_only_steps.append(self.step_index)

    @property
    def progress(self) -> float:
        return self.policy.progress(self.step_index)

    def threshold(self, step_index: int | None = None) -> float:
        """The acceptance threshold of a step: the schedule's tau(progress), times the step's
        weight when step_weighting is on."""
        step = self.step_index if step_index is None else int(step_index)
        tau = self.verifier.threshold_at(self.policy.progress(step))
        if self.step_scales is not None and 0 <= step < len(self.step_scales):
            tau *= self.step_scales[step]
        if self.target is not None:
            tau *= self.target.scale
        if self.config.tolerance_unit == "run":
            # the threshold counts this run's one-step forecast errors (none before the first
            # measurement, when nothing is forecast yet: end_evaluation books that step's own)
            unit = self.policy.run_unit()
            tau *= unit if unit is not None else float("nan")
        return tau * self.tolerance_scale

    def attach_correction(self, correction) -> None:
        """The trajectory correction of this run (``TrajectoryCorrection``); the run frees it
        on close and makes it forget its points when the weights change."""
        self.correction = correction
        self.note_correction()

    def note_correction(self) -> None:
        """The correction's state into the stats. Once it is off (the sampler cannot have it),
        the tolerance falls back to what suits forecasts that stand uncorrected."""
        c = self.correction
        self.stats.corrected = c.corrected
        self.stats.correction = "on" if c.active else c.off_reason
        if not c.active:
            self.tolerance_scale = self.config.uncorrected_threshold_scale

    def _correction_on(self) -> bool:
        """Whether this forecast will be corrected: the correction is on and the run of forecasts
        no longer than it corrects (the fitted curvature forecasts only such)."""
        return (self.correction is not None and self.correction.active
                and self.policy.forecasts_since_full < MAX_CORRECTED_STREAK)

    _RANK = {FORECAST: 0, REJECTED: 1, COMPUTED: 2}

    def _mark(self, outcome: str) -> None:
        # An evaluation is as bad as its worst chunk: computed > rejected > forecast.
        with self._lock:
            self._call_outcomes.add(outcome)
            if self._eval_outcome is None or self._RANK[outcome] > self._RANK[self._eval_outcome]:
                self._eval_outcome = outcome

    def current_outcome(self) -> str | None:
        """The current evaluation's outcome so far (its worst chunk), None before any chunk."""
        return self._eval_outcome

    def end_evaluation(self) -> None:
        """Book the current evaluation (also done by the next ``begin_evaluation``)."""
        outcome, self._eval_outcome = self._eval_outcome, None
        lookback, self._eval_lookback = self._eval_lookback, None
        verified, self._eval_verified = self._eval_verified, None
        if outcome is None:
            return
        evaluation = self.stats.evaluations - 1
        if verified is not None:
            error, tau, ok = verified
            self.policy.record_error(error)
            self.stats.verified += 1
            self.stats.errors.append((evaluation, self.time, error, tau, ok))
            self.stats.rejected += int(not ok)
        if lookback is not None:
            error, tau = lookback
            if self.config.tolerance_unit == "run":
                # this measurement is part of the unit its own step's tolerance is counted in
                self.policy.measure_unit(error)
                tau = self.threshold()
                self.stats.run_unit = self.policy.run_unit() or 0.0
            self.stats.looked_back += 1
            self.stats.errors.append((evaluation, self.time, error, tau, Verifier.accepts_below(error, tau)))
            lookback = error
        if self._allowed is not None:
            units0, full0 = self._eval_start_units
            full = self.stats.block_units_full - full0
            if full > 0:
                self.target.update((self.stats.block_units - units0) / full, self._allowed)
                self.stats.threshold_scale = self.target.scale
            self._allowed = None
        steps = self.stats.step_outcomes
        previous = steps.get(self.step_index)
        if previous is None or self._RANK[outcome] > self._RANK[previous]:
            steps[self.step_index] = outcome
        kept_forecast = outcome == FORECAST or (outcome == REJECTED and self.config.on_reject == "next")
        if kept_forecast:
            self.stats.forecast += 1
            if outcome == FORECAST:
                self.policy.record_accepted()
            self.policy.record_forecast()
            if outcome == REJECTED:
                # SpeCa's behaviour: the rejected forecast stands, the next step is full.
                self.policy.request_full_next()
        else:
            # Computed, or rejected and recomputed ("redo").
            self.stats.computed += 1
            distance = self.policy.forecasts_since_full + 1
            if lookback is not None:
                self.policy.record_lookback(lookback)
            self.policy.record_full()
            if outcome == REJECTED:
                units0, full0 = self._eval_start_units
                waste = (self.stats.block_units - units0) - (self.stats.block_units_full - full0)
                self.policy.record_rejected_probe(waste, distance)

    # ---- streams -----------------------------------------------------------------
    def stream(self, key) -> StreamCache:
        s = self.streams.get(key)
        if s is None:
            with self._lock:
                s = self.streams.get(key)
                if s is None:
                    s = self.streams[key] = StreamCache(lambda: make_forecaster(self.config, self._correction_on))
                    self.stats.streams += 1
        return s

    def cache_bytes(self) -> int:
        return sum(s.nbytes() for s in list(self.streams.values()))

    def chunk(self, stream_keys, batch: int, units_full: float, weights_key=None) -> "Chunk":
        """``weights_key``: identifies the model weights of this call (LoRA hook keyframes
        change them mid-run); a stream whose history was computed with others starts over."""
        return Chunk(self, list(stream_keys), batch, units_full, weights_key)

    # ---- end ---------------------------------------------------------------------
    def close(self) -> RunStats:
        """Finish the stats and drop every cached tensor. Safe to call twice."""
        if not self.closed:
            self.end_evaluation()
            for s in self.streams.values():
                s.reset()
            self.streams.clear()
            if self.correction is not None:
                self.correction.release()
            self.closed = True
        return self.stats


class Chunk:
    """One model call: a batch whose rows belong to one or more streams, in order,
    ``batch // len(streams)`` rows each (ComfyUI's layout of ``uuids``)."""

    def __init__(self, run: SpeculativeRun, stream_keys: list, batch: int, units_full: float,
                 weights_key=None):
        self.run = run
        self.keys = stream_keys
        n = max(len(stream_keys), 1)
        if batch % n != 0:
            raise ValueError(f"batch {batch} does not split into {n} streams")
        self.rows = batch // n
        self.units_full = float(units_full)
        self.units = 0.0
        self.errors: list[float] = []
        self.rejected = False
        self.nonfinite = False
        with run._lock:
            run.stats.block_units_full += self.units_full
        for s in self.streams():
            if s.set_weights(weights_key):
                with run._lock:
                    run.stats.weight_changes += 1
                run.policy.forget_lookback()     # what was measured was of the other weights
                if run.correction is not None:
                    run.correction.forget()

    # tensors of this chunk are [batch, ...]: split them per stream
    def split(self, t: torch.Tensor):
        return [t[i * self.rows:(i + 1) * self.rows] for i in range(len(self.keys))]

    def streams(self):
        return [self.run.stream(k) for k in self.keys]

    def can_forecast(self, names) -> bool:
        """Every stream has a history for ``names``."""
        return all(s.can_predict(names) for s in self.streams())

    def predict(self, name: str) -> torch.Tensor:
        t = self.run.time
        parts = [s.predict(t, (name,))[name] for s in self.streams()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def record(self, features: dict[str, torch.Tensor]) -> None:
        """Store full-chunk features computed at this evaluation's time."""
        per_stream = {n: self.split(v) for n, v in features.items()}
        changed = sum(bool(s.update(self.run.time, {n: parts[i] for n, parts in per_stream.items()}))
                      for i, s in enumerate(self.streams()))
        b = self.run.cache_bytes()
        with self.run._lock:
            self.run.stats.shape_changes += changed
            self.run.stats.peak_cache_bytes = max(self.run.stats.peak_cache_bytes, b)

    def anchor(self, name: str) -> torch.Tensor:
        """The value of ``name`` at each stream's last computed point (its forecast anchor)."""
        parts = [s.forecasters[name].get_anchor() for s in self.streams()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def verify(self, pred: torch.Tensor, real: torch.Tensor, feature: str | None = None,
               rows: torch.Tensor | None = None) -> bool:
        """Per-stream errors; the chunk passes only if every stream passes. ``feature``: the
        name of the verified feature (the metric relative_change compares with its anchor).
        ``rows``: compare only these token rows (dim 1), e.g. an edit region's tokens."""
        run = self.run
        ok = True
        anchors = [None] * len(self.keys)
        if run.verifier.needs_anchor and feature is not None:
            anchor = self.anchor(feature)
            anchors = self.split(anchor if rows is None else anchor.index_select(1, rows))
        if rows is not None:
            pred, real = pred.index_select(1, rows), real.index_select(1, rows)
        tau = run.threshold()
        agreement = run.agreement
        errors = [run.verifier.sharded_error(p, r, a, agreement) if agreement.shards else run.verifier.error(p, r, a)
                  for p, r, a in zip(self.split(pred), self.split(real), anchors)]
        for err in agreement.worst(errors):     # (the same errors on every rank; unchanged on one)
            self.errors.append(err)
            ok = ok and run.verifier.accepts_below(err, tau)
        # booked when the evaluation ends: its worst chunk, once (SpeculativeRun.end_evaluation)
        with run._lock:
            seen = run._eval_verified
            worst = max(self.errors) if seen is None else max(seen[0], max(self.errors))
            run._eval_verified = (worst, tau, ok if seen is None else (seen[2] and ok))
        if not ok:
            self.rejected = True
        return ok

    def look_back(self, pred: torch.Tensor, real: torch.Tensor) -> float:
        """Lookback acceptance, at a computed step: the error of the output forecast ``pred``
        against the real output ``real`` (relative norm, the worst stream). The policy takes
        the next forecasts while the error predicted from this one stays under the threshold."""
        run = self.run
        # max() would pass over a NaN stream, so a non-finite stream counts as infinite first
        agreement = run.agreement
        if agreement.shards:
            errors = [metric_from_sums("relative_norm", agreement.sum_shards(metric_sums("relative_norm", p, r)))
                      for p, r in zip(self.split(pred), self.split(real))]
        else:
            errors = [relative_norm(p, r) for p, r in zip(self.split(pred), self.split(real))]
        errors = agreement.worst(errors)
        err = max(e if math.isfinite(e) else float("inf") for e in errors)
        tau = run.threshold()
        with run._lock:     # booked when the evaluation ends, its worst chunk once
            seen = run._eval_lookback
            run._eval_lookback = (err if seen is None else max(seen[0], err), tau)
        return err

    def add_units(self, units: float) -> None:
        self.units += units
        with self.run._lock:
            self.run.stats.block_units += units

    def finish(self, outcome: str) -> None:
        """outcome: COMPUTED, FORECAST or REJECTED (forecast rejected and kept, "next" mode)."""
        self.run._mark(outcome)

    @property
    def decision(self) -> Decision:
        return self.run.decision


__all__ = ["SpeculativeRun", "Chunk", "StepMode", "COMPUTED", "FORECAST", "REJECTED"]
