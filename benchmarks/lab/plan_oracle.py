"""How far is a planned target's schedule from the best one? Every plan of its size, run.

    .venv/bin/python -m benchmarks.lab.plan_oracle --model reference --steps 28 --target 6 \
        --out lab_plan_oracle_reference_6x

A planned target (``cache_core.target``) places its full calls by an error model fitted on the
19-block reference model, and its cond-only call in the middle of the first run of forecasts. Here
every plan with the same number of full calls (the first and the last step always among them) runs
through the node's own target (its forecasts, correction and cond-only call where the node would
make one, placed as the node places it) on ``--screen`` samples; the best ``--confirm`` plans and
the node's own plan are then run on ``--samples`` samples. The answer bounds what any placement of
the same calls can reach with the node's forecasts: if the best plan is far below a fidelity goal,
no planner reaches it. Prints and writes (``--out``: benchmarks/results/<out>.json) compute and
PSNR against the uncached run."""

from __future__ import annotations

import argparse
import itertools
import sys

from devkit import comfy_env

from .node_runs import load_pack, pack_module, target_run, uncached_reference, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--target", type=float, default=6.0)
    ap.add_argument("--screen", type=int, default=4, help="samples for the sweep over every plan")
    ap.add_argument("--samples", type=int, default=8, help="samples for the best plans and the node's")
    ap.add_argument("--confirm", type=int, default=5)
    ap.add_argument("--out", help="results name (benchmarks/results/<out>.json)")
    args = ap.parse_args(argv)
    finals = load_pack()
    run_module = pack_module("cache_core.run")
    node_plan = run_module.plan_schedule

    def measure(reference, plan=None):
        """(compute, PSNR, the full calls, the cond-only steps) of the node's target run, with
        ``plan`` in place of its planner's choice of full calls (None: the node as it is)."""
        if plan is not None:
            run_module.plan_schedule = lambda sigmas, calls, forced=(): sorted(plan)
        try:
            run = target_run(args.target, reference, finals)
        finally:
            run_module.plan_schedule = node_plan
        return run["compute_fraction"], run["psnr_db"], run["planned_steps"], run["cond_only_steps"]

    screen = uncached_reference(args.model, args.screen, args.steps)
    node = measure(screen)
    calls = len(node[2])
    last = args.steps - 1
    plans = [[0, *middle, last] for middle in itertools.combinations(range(1, last), calls - 2)]
    print(f"{args.model}, {args.steps} steps, {args.target:g}x: the node plans {node[2]} + cond-only "
          f"{node[3]}; {len(plans)} plans of {calls} calls on {args.screen} samples", flush=True)
    swept = []
    for i, plan in enumerate(plans):
        compute, psnr, _, halves = measure(screen, plan)
        swept.append({"plan": plan, "cond_only_steps": halves, "compute_fraction": compute, "psnr_db": psnr})
        if (i + 1) % 25 == 0:
            best = max(swept, key=lambda r: r["psnr_db"])
            print(f"  {i + 1}/{len(plans)}: best so far {best['plan']} {best['psnr_db']:.2f} dB", flush=True)
    swept.sort(key=lambda r: -r["psnr_db"])
    node_screen = next(r for r in swept if r["plan"] == node[2])
    rank = swept.index(node_screen) + 1
    full = uncached_reference(args.model, args.samples, args.steps)
    confirmed = []
    for r in [node_screen] + [r for r in swept[:args.confirm] if r is not node_screen]:
        compute, psnr, plan, halves = measure(full, r["plan"])
        confirmed.append({"plan": plan, "cond_only_steps": halves, "compute_fraction": compute, "psnr_db": psnr,
                          "node_plan": plan == node[2], "screen_psnr_db": r["psnr_db"]})
        print(f"  {'node ' if plan == node[2] else 'best '}{plan} + cond-only {halves}: compute {compute:.4f}, "
              f"PSNR {psnr:.2f} dB on {args.samples} samples ({r['psnr_db']:.2f} on {args.screen})", flush=True)
    print(f"the node's plan ranks {rank} of {len(plans)} on {args.screen} samples", flush=True)
    write_result(args.out, {"model": full[0].name, "steps": args.steps, "target_speedup": args.target, "cfg": 2.0,
                            "screen_samples": args.screen, "samples": args.samples,
                            "comfyui": comfy_env.comfyui_version(comfy_env.find_comfyui()),
                            "node_plan_rank": rank, "plans": len(plans), "confirmed": confirmed, "screen": swept})
    return 0


if __name__ == "__main__":
    sys.exit(main())
