"""What each kind of step costs in wall clock: the node's runs timed step by step.

    .venv/bin/python -m benchmarks.lab.step_cost --model reference_deep --samples 4 --out reference_deep_step_cost

Whole-run timing (run_benchmark's ``cost`` grid) mixes every cost into one ratio and, on a shared
2-core VM, moves by 0.05-0.1 between runs of the same rows. Here each step of a sampling run is timed
from the sampler's callback to the next (ComfyUI's real euler sampler, 28 steps, cfg 2) and sorted by
what the node did there (its timeline: C computed, F forecast; cond-only steps apart). A forecast
or cond-only step's whole time is its cost (the sampler's own step included), over the median step
of the uncached run it is paired with (each sample runs uncached, then every row, back to back); a
computed step is compared with the same step of that uncached run, so its extra cost is a
difference of two timings and as noisy as the machine. Each run's time is also split into the time
inside the diffusion model's forward and the rest (``ModelClock``); what a row spends beyond its
compute fraction times the uncached run's is reported per run in each part: inside the model
(calls that cost more than their multiply-accumulates say: a half batch) and outside it (forecast
steps, the sampler's own steps, the node's bookkeeping). Rows: the defaults and the 4x and 6x
targets. Writes benchmarks/results/<out>.json."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from devkit import comfy_env

from ..run_benchmark import _sample_one, main_node, reference_workload
from .node_runs import load_pack, write_result

STEPS = 28
CFG = 2.0
ROWS = {"defaults": {}, "4x": {"mode": "speed_target", "options": {"target_speedup": 4.0}},
        "6x": {"mode": "speed_target", "options": {"target_speedup": 6.0}}}


class ModelClock:
    """The seconds spent inside the diffusion model's forward (every call, whole), so that a
    run's time splits into the model's and everything else's: the sampler, ComfyUI's
    preparation of each call, and the node's forecasts and bookkeeping."""

    def __init__(self, diffusion_model):
        self.seconds = 0.0
        forward = diffusion_model.forward

        def timed_forward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        diffusion_model.forward = timed_forward


def timed_run(workload, patcher, sample, clock: ModelClock) -> tuple[list, float, float]:
    """(seconds of each step, seconds of the whole run, seconds inside the model) of one
    sampling run of ``sample`` (positive, negative, seed)."""
    ticks = []
    clock.seconds = 0.0
    start = time.perf_counter()
    _sample_one(workload, patcher, *sample, callback=lambda *_: ticks.append(time.perf_counter()))
    total = time.perf_counter() - start
    return [b - a for a, b in zip([start] + ticks[:-1], ticks)], total, clock.seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference_deep")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", help="results name (benchmarks/results/<out>.json)")
    args = ap.parse_args(argv)
    finals = load_pack()
    workload = reference_workload(args.samples, STEPS, CFG, args.model)    # euler, simple
    model = workload.model
    clock = ModelClock(model.model.diffusion_model)
    patched = {row: main_node(**inputs)(model) for row, inputs in ROWS.items()}
    samples = workload.samples
    for p in [model, *patched.values()]:        # warm-up: lazy allocations, first-call paths
        timed_run(workload, p, samples[0], clock)
    # each sample: the uncached run, then every row's, back to back, so that a slow spell of the
    # machine falls on the pair (this VM's model step moved between 50 and 95 ms within minutes)
    uncached, runs = [], {row: [] for row in patched}
    for sample in samples:
        uncached.append(timed_run(workload, model, sample, clock))
        for row, p in patched.items():
            steps, total, inside = timed_run(workload, p, sample, clock)
            runs[row].append((steps, total, finals[-1], inside))
    model_step = statistics.median(t for steps, _, _ in uncached for t in steps)
    outside_uncached = statistics.median(total - inside for _, total, inside in uncached)
    result = {"model": args.model, "steps": STEPS, "cfg": CFG, "samples": args.samples,
              "comfyui": comfy_env.comfyui_version(comfy_env.find_comfyui()),
              "uncached_step_ms": round(model_step * 1000, 2),
              "uncached_outside_model_ms_per_run": round(outside_uncached * 1000, 2), "rows": {}}
    print(f"uncached: median step {model_step * 1000:.1f} ms, {outside_uncached * 1000:.1f} ms per run "
          "outside the model")
    # the uncached runs' totals, for every row: wall clock (all samples), and per run the time
    # inside the model and outside it
    n = len(samples)
    base_wall = sum(total for _, total, _ in uncached)
    base_inside = sum(inside for _, _, inside in uncached) / n
    base_outside = base_wall / n - base_inside
    for row in patched:
        kinds: dict = {}
        for (steps, _, s, _), (base_steps, _, _) in zip(runs[row], uncached):
            base = statistics.median(base_steps)        # this pair's model step
            cond_only = set(s["cond_only_steps"])
            for i, (seconds, letter) in enumerate(zip(steps, s["timeline"])):
                kind = "cond-only" if i in cond_only else letter
                cost = seconds - base_steps[i] if kind == "C" else seconds    # C: extra over the uncached step
                kinds.setdefault(kind, []).append((cost, cost / base))
        compute = statistics.mean(s["compute_fraction"] for _, _, s, _ in runs[row])
        wall = sum(total for _, total, _, _ in runs[row])
        # Where the run's time goes beyond compute x the uncached run's, per run: inside the model
        # (calls that cost more than their multiply-accumulates say, e.g. a half batch) and outside
        # it (the forecast steps, the sampler's own steps, the node's bookkeeping).
        inside = sum(i for _, _, _, i in runs[row]) / n
        outside = wall / n - inside
        excess_inside, excess_outside = inside - compute * base_inside, outside - compute * base_outside
        entry = {"timelines": [s["timeline"] for _, _, s, _ in runs[row]], "compute_fraction": round(compute, 4),
                 "wall_speedup": round(base_wall / wall, 3),
                 "wall_over_inverse_compute": round(base_wall / wall * compute, 3),
                 "model_time_over_uncached": round(inside / base_inside, 4),
                 "ms_per_run": {"inside_model": round(inside * 1000, 1), "outside_model": round(outside * 1000, 1),
                                "inside_beyond_compute": round(excess_inside * 1000, 1),
                                "outside_beyond_compute": round(excess_outside * 1000, 1)},
                 "steps": {}}
        print(f"{row}: compute {compute:.3f} (mean of the samples), wall {entry['wall_speedup']:.2f}x = "
              f"{entry['wall_over_inverse_compute']:.3f} of 1/compute; time in the model {inside / base_inside:.3f} "
              f"of the uncached run's; per run beyond compute x uncached: {excess_inside * 1000:.1f} ms in the "
              f"model, {excess_outside * 1000:.1f} ms outside it")
        for kind, values in kinds.items():
            ms = statistics.median(v[0] for v in values) * 1000
            share = statistics.median(v[1] for v in values)
            what = "extra over the uncached step" if kind == "C" else "whole step"
            entry["steps"][kind] = {"count": len(values) // args.samples, "median_ms": round(ms, 3),
                                    "share_of_a_model_step": round(share, 4), "measures": what}
            print(f"   {kind}: {len(values) // args.samples} per run, {what} {ms:.2f} ms "
                  f"= {100 * share:.1f} % of a model step (of its pair)")
        result["rows"][row] = entry
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
