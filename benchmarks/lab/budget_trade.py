"""Trading a planned target's full calls for cond-only calls: is half a call in a run of forecasts
worth more than a whole one placed by the plan?

    .venv/bin/python -m benchmarks.lab.budget_trade --trade 0 1 --out lab_budget_trade \
        --case reference_deep:50:10 reference_deep:50:8 reference:50:10 reference_wan:50:10 \
               reference_deep:28:8 reference:28:6 reference_wan:28:6 reference_deep:28:4

A planned target spends its budget in whole calls and, when the budget ends in a half, one
cond-only call (``cache_core.target.planned_budget``). Its first cond-only call turned the first run
of forecasts from a reuse into a line and was worth 3 dB at 6x on the 19-block model (4 calls and
one cond-only: 31.7 dB; 5 calls: 28.9 dB). Here each ``--case`` (model:steps:target) and ``--trade`` value ``n`` runs the node's target
with ``n`` of its full calls traded for ``2n`` cond-only calls (the same compute), placed by
``place_cond_only``; ``0`` is the node as it is. The node's own plan, correction and forecasts
otherwise, through ComfyUI's real sampler (euler, simple, cfg 2). Prints compute and PSNR against
the uncached run; ``--out`` writes benchmarks/results/<out>.json."""

from __future__ import annotations

import argparse
import sys

from devkit import comfy_env

from .node_runs import load_pack, pack_module, target_run, uncached_reference, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", default=["reference_deep:50:10"], help="model:steps:target")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--trade", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", help="results name (benchmarks/results/<out>.json)")
    args = ap.parse_args(argv)
    finals = load_pack()
    run_module = pack_module("cache_core.run")
    node_budget = run_module.planned_budget
    rows = []
    for case in args.case:
        model, steps, target = case.split(":")
        steps, target = int(steps), float(target)
        reference = uncached_reference(model, args.samples, steps)
        for trade in args.trade:
            def traded(total_steps, target_speedup, cond_only, trade=trade):
                full, halves = node_budget(total_steps, target_speedup, cond_only)
                n = min(trade, full - 2) if cond_only else 0    # keep the first and the last step
                return full - n, halves + 2 * n
            run_module.planned_budget = traded
            try:
                measured = target_run(target, reference, finals)
            finally:
                run_module.planned_budget = node_budget
            entry = {"model": reference[0].name, "steps": steps, "target_speedup": target, "trade": trade,
                     **measured}
            rows.append(entry)
            print(f"{model} {steps} steps, {target:g}x, {trade} traded: compute "
                  f"{entry['compute_fraction']:.4f}, PSNR {entry['psnr_db']:.2f} dB, calls "
                  f"{entry['planned_steps']}, cond-only {entry['cond_only_steps']}", flush=True)
    write_result(args.out, {"samples": args.samples, "cfg": 2.0, "sampler": "euler", "scheduler": "simple",
                            "comfyui": comfy_env.comfyui_version(comfy_env.find_comfyui()), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
