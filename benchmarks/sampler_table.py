"""Fidelity per sampler: the node as dropped into a graph (every input at its default) on
the reference model, for ComfyUI's samplers, ancestral and SDE ones included.

    .venv/bin/python -m benchmarks.sampler_table [--samples 4] [--model reference] \
        [--mode speed_target --speed 0.5]

For each sampler: the same seeds uncached and cached, PSNR of the cached images to the
uncached ones (all samples together; "inf": identical), compute fraction, steps computed,
what accepted forecast steps served (the output forecast, looked back on or probed, or the
block stages' forecasts) and whether the trajectory correction ran (Euler steps only).
Writes benchmarks/results/samplers_<model>[_<mode>].{json,md}.
Stochastic samplers draw the same noise in both runs (same seed), so the difference is the
cache's alone."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import import_module

from devkit import comfy_env
from .run_benchmark import RESULTS

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "er_sde", "res_multistep",
            "res_multistep_ancestral", "seeds_2", "sa_solver", "deis", "ipndm", "uni_pc"]


def served(runs) -> str:
    """What the accepted forecast steps of these runs served."""
    if all(s.get("acceptance") == "lookback" for s in runs):
        spaces = sorted({s["output_space"] for s in runs})
        return f"output, lookback ({'/'.join(spaces)} space)"
    return "output" if all(s["serve_output"] for s in runs) else "stages"


def correction(runs) -> str:
    """The trajectory correction in these runs: how many steps it corrected, or why it was off."""
    states = sorted({s.get("correction", "") for s in runs})
    corrected = sum(s.get("corrected", 0) for s in runs)
    if states == ["on"]:
        return f"on ({corrected} steps)"
    return "; ".join(x or "not asked" for x in states)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--model", default="reference")
    ap.add_argument("--mode", default="auto", help="the main node's mode (default: auto)")
    ap.add_argument("--speed", type=float, default=0.5, help="the main node's speed (default 0.5)")
    args = ap.parse_args(argv)
    if comfy_env.find_comfyui() is None:
        print("ComfyUI not found. Looked in: " + comfy_env.where_looked())
        return 1
    comfy_env.setup_comfyui()
    import comfy.samplers

    from devkit import reference_model as rm
    from .metrics import psnr
    nodes = comfy_env.pack_nodes()
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    stats = []
    hooks.STEP_CACHE.listeners.append(lambda nid, s, final: final and stats.append(s))
    model = rm.load_reference(args.model)
    cached = nodes.SpeculativeCacheSimple.execute(model, mode=args.mode, speed=args.speed).result[0]
    labels = [i % len(rm.CLASSES) for i in range(args.samples)]
    seeds = [500 + i for i in range(args.samples)]
    available = set(comfy.samplers.KSampler.SAMPLERS)
    rows, started = [], time.time()
    for i, sampler in enumerate(s for s in SAMPLERS if s in available):
        ref = rm.sample(model, labels, seeds, steps=args.steps, sampler=sampler)
        n0 = len(stats)
        out = rm.sample(cached, labels, seeds, steps=args.steps, sampler=sampler)
        runs = stats[n0:]
        row = {"sampler": sampler,
               # over all samples together (a mean of per-sample PSNRs is infinite as soon as one
               # sample had no accepted forecast)
               "psnr_db": round(psnr(out, ref), 2),
               "compute_fraction": round(sum(s["compute_fraction"] for s in runs) / len(runs), 3),
               "computed": sum(s["computed"] for s in runs), "steps": sum(s["steps"] for s in runs),
               "evaluations_per_step": round(sum(s["evaluations"] for s in runs) / sum(s["steps"] for s in runs), 2),
               "served": served(runs), "correction": correction(runs)}
        rows.append(row)
        print(f"  [{i + 1}] {sampler}: {row['psnr_db']} dB at compute {row['compute_fraction']} "
              f"({time.time() - started:.0f} s)", flush=True)
    result = {"model": args.model, "samples": args.samples, "steps": args.steps, "cfg": 2.0,
              "mode": args.mode, "speed": args.speed,
              "comfyui": comfy_env.comfyui_version(comfy_env.find_comfyui()), "rows": rows}
    at_defaults = args.mode == "auto" and args.speed == 0.5
    name = f"samplers_{args.model}" + ("" if at_defaults else f"_{args.mode}_{args.speed:g}")
    node = "the node at its defaults" if at_defaults else f"the node at mode {args.mode}, speed {args.speed:g}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"Model `{args.model}`, {args.samples} samples, {args.steps} steps, cfg 2, {node}, "
             f"ComfyUI {result['comfyui']}.", "",
             "| sampler | PSNR dB to uncached | compute fraction | steps computed | evaluations per step | served | "
             "trajectory correction |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['psnr_db']:.2f} | {r['compute_fraction']:.3f} | "
                     f"{r['computed']}/{r['steps']} | {r['evaluations_per_step']} | {r['served']} | "
                     f"{r['correction']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
