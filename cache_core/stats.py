"""What a run did, in plain numbers: the log line, the UI and the benchmark all read this."""

from __future__ import annotations

from dataclasses import dataclass, field

# One letter per sampler step in the timeline.
COMPUTED, FORECAST, REJECTED = "C", "F", "R"


@dataclass
class RunStats:
    method: str = ""
    mode: str = ""              # "stack" / "block" (block-level granularities) or "output" (fallback)
    steps: int = 0              # sampler steps of the schedule
    evaluations: int = 0        # model evaluations (Heun & co. make several per step)
    computed: int = 0           # evaluations on which the model ran fully
    forecast: int = 0           # evaluations served by an accepted forecast
    verified: int = 0           # forecasts checked against a real block
    looked_back: int = 0        # lookback acceptance: computed steps that measured the output forecast's error
    acceptance: str = "probe"   # how forecasts were accepted: "probe" or "lookback"
    corrected: int = 0          # computed steps whose update carried the trajectory correction
    correction: str = ""        # the trajectory correction: "" not asked, "on", or why it turned off
    rejected: int = 0           # forecasts that failed verification
    nonfinite: int = 0          # forecasts that were not finite (fell back to full)
    streams: int = 0            # distinct streams (cond/uncond entries) seen
    block_units: float = 0.0    # blocks actually run (verification included)
    block_units_full: float = 0.0  # blocks an uncached run would have run
    peak_cache_bytes: int = 0
    errors: list = field(default_factory=list)    # (eval, time, error, threshold, accepted)
    step_outcomes: dict = field(default_factory=dict)  # sampler step -> worst outcome letter
    on_reject: str = "redo"
    internal_error: str = ""    # set when an error ended the cache early in this run
    target_speedup: float = 0.0  # the speed target (0: none)
    threshold_scale: float = 1.0  # the speed target's last threshold multiplier
    run_unit: float = 0.0       # tolerance_unit "run": this run's one-step forecast error (0: not measured)
    planned_steps: list = field(default_factory=list)  # a planned speed target's computed steps (0-based)
    cond_only_steps: list = field(default_factory=list)  # its steps that ran cond's half of the batch only
    elapsed_seconds: float = 0.0  # wall clock of the run so far (set by the ComfyUI glue)
    estimated_cache_bytes: int = 0  # the cache estimate made before the run (0: none)
    weight_changes: int = 0     # stream histories dropped because the model's weights changed mid-run
    shape_changes: int = 0      # stream histories dropped because a feature's shape changed mid-run
    serve_output: bool = False  # accepted forecast steps served the output forecast (not the stages')
    output_space: str = "model"  # the space of the output forecast: "model" or "noise"
    # SpecDiff token tiers: image tokens (per double block, row and forecast step) per tier
    tokens_computed: int = 0
    tokens_forecast: int = 0
    tokens_reused: int = 0

    @property
    def timeline(self) -> str:
        """One letter per sampler step: C computed, F forecast accepted, R forecast
        rejected (recomputed in "redo" mode, kept in "next" mode), . not reached."""
        return "".join(self.step_outcomes.get(i, ".") for i in range(self.steps))

    def step_counts(self) -> dict:
        t = self.timeline
        rejected = t.count(REJECTED)
        redo = self.on_reject == "redo"
        return {"computed": t.count(COMPUTED) + (rejected if redo else 0),
                "forecast": t.count(FORECAST) + (0 if redo else rejected),
                "rejected": rejected, "done": len(t) - t.count(".")}

    @property
    def compute_fraction(self) -> float:
        if self.block_units_full <= 0:
            return 1.0
        return self.block_units / self.block_units_full

    @property
    def estimated_speedup(self) -> float:
        f = self.compute_fraction
        return 1.0 / f if f > 0 else float("inf")

    @property
    def saved_seconds(self) -> float:
        """Estimated wall clock saved: the run's time had every evaluation been computed
        (elapsed / compute fraction) minus its time. An estimate: it assumes the time of a
        step is proportional to the blocks it ran."""
        f = self.compute_fraction
        if self.elapsed_seconds <= 0 or f <= 0:
            return 0.0
        return self.elapsed_seconds / f - self.elapsed_seconds

    def to_dict(self) -> dict:
        """What the UI, the log and the benchmark read. ``computed``/``forecast`` count
        sampler steps; ``eval_*`` count model evaluations (Heun makes two per step);
        ``verified``/``rejected`` count verification checks."""
        steps = self.step_counts()
        return {
            "method": self.method, "mode": self.mode, "steps": self.steps,
            "computed": steps["computed"], "forecast": steps["forecast"],
            "verified": self.verified, "rejected": self.rejected,
            "acceptance": self.acceptance, "looked_back": self.looked_back,
            "correction": self.correction, "corrected": self.corrected,
            "evaluations": self.evaluations, "eval_computed": self.computed, "eval_forecast": self.forecast,
            "nonfinite": self.nonfinite, "streams": self.streams,
            "compute_fraction": round(self.compute_fraction, 4),
            "speedup": round(self.estimated_speedup, 3),
            "cache_bytes": self.peak_cache_bytes,
            "cache_estimate_bytes": self.estimated_cache_bytes,
            "timeline": self.timeline,
            "internal_error": self.internal_error,
            "target_speedup": self.target_speedup, "target_missed": self.target_missed,
            "threshold_scale": round(self.threshold_scale, 4),
            "run_unit": round(self.run_unit, 6),
            "target_schedule": ("planned" if self.planned_steps else "adaptive") if self.target_speedup else "",
            "planned_steps": list(self.planned_steps),
            "cond_only_steps": list(self.cond_only_steps),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "saved_seconds": round(self.saved_seconds, 3),
            "weight_changes": self.weight_changes, "shape_changes": self.shape_changes,
            "serve_output": self.serve_output, "output_space": self.output_space,
            "token_tiers": {"computed": self.tokens_computed, "forecast": self.tokens_forecast,
                            "reused": self.tokens_reused},
            "errors": [list(e) for e in self.errors],
        }

    def summary_line(self) -> str:
        return (f"Speculative Cache ({self.method}, {self.mode}): {self.steps} steps, "
                f"{self.evaluations} evaluations: {self.computed} computed, {self.forecast} forecast, "
                f"{self.rejected} rejected of {self.verified} verified; compute fraction "
                f"{self.compute_fraction:.3f}, est. speedup {self.estimated_speedup:.2f}x, "
                f"peak cache {self.peak_cache_bytes / 2**20:.1f} MiB"
                + (f"; one-step forecast error {self.run_unit:.4f}" if self.run_unit else "")
                + (f"; target {self.target_speedup:.2f}x ({self._target_how()})" if self.target_speedup else "")
                + ("; target missed (too few steps for it, or forecasts that would not hold)"
                   if self.target_missed else ""))

    def _target_how(self) -> str:
        if self.planned_steps:
            shown = ", ".join(map(str, self.planned_steps[:16])) + (", ..." if len(self.planned_steps) > 16 else "")
            half = ", ".join(map(str, self.cond_only_steps))
            return (f"planned: {len(self.planned_steps)} calls at steps {shown}"
                    + (f", cond only at step {half}" if half else ""))
        return f"threshold x{self.threshold_scale:.2f}"

    @property
    def target_missed(self) -> bool:
        """A speed target the run fell short of by more than 10 % (the slider's 2x and 5x land
        6-7 % short on the reference models: the steps are whole)."""
        return bool(self.target_speedup) and self.estimated_speedup < 0.9 * self.target_speedup
