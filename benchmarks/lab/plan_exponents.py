"""The planned targets' error model with other exponents: where do the calls go, what does the
picture get?

    .venv/bin/python -m benchmarks.lab.plan_exponents --models reference_deep reference reference_wan \
        --exponents 2:3 3:3 4:3 --targets 8 6 5 4 --out lab_plan_exponents

The plan (``cache_core.target.plan_schedule``) puts a target's calls where a forecast at distance d
from the last computed step costs ``(sigma_k - sigma_k+1) ** SIZE * d ** GROWTH`` least; SIZE 2 and
GROWTH 3 were fitted on the 19-block reference model. Each ``SIZE:GROWTH`` pair here runs the node's
targets with the error model's exponents replaced (nothing else changes), on each model, 8 samples,
28 steps (``--steps``), ComfyUI's real sampler. Prints and writes (``--out``:
benchmarks/results/<out>.json) compute, PSNR and the planned calls."""

from __future__ import annotations

import argparse
import sys

from devkit import comfy_env

from .node_runs import load_pack, pack_module, target_run, uncached_reference, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["reference_deep", "reference", "reference_wan"])
    ap.add_argument("--exponents", nargs="+", default=["2:3", "3:3", "4:3"], help="SIZE:GROWTH")
    ap.add_argument("--targets", type=float, nargs="+", default=[8.0, 6.0, 5.0, 4.0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", help="results name (benchmarks/results/<out>.json)")
    args = ap.parse_args(argv)
    finals = load_pack()
    target_module = pack_module("cache_core.target")
    fitted = target_module.PLAN_SIZE_EXPONENT, target_module.PLAN_GROWTH_EXPONENT
    rows = []
    try:
        for model in args.models:
            reference = uncached_reference(model, args.samples, args.steps)
            for target in args.targets:
                for pair in args.exponents:
                    size, growth = (float(x) for x in pair.split(":"))
                    target_module.PLAN_SIZE_EXPONENT, target_module.PLAN_GROWTH_EXPONENT = size, growth
                    entry = {"model": reference[0].name, "target_speedup": target, "size_exponent": size,
                             "growth_exponent": growth, **target_run(target, reference, finals)}
                    rows.append(entry)
                    print(f"{model} {target:g}x, SIZE {size:g} GROWTH {growth:g}: compute "
                          f"{entry['compute_fraction']:.4f}, PSNR {entry['psnr_db']:.2f} dB, calls "
                          f"{entry['planned_steps']} + cond-only {entry['cond_only_steps']}", flush=True)
    finally:
        target_module.PLAN_SIZE_EXPONENT, target_module.PLAN_GROWTH_EXPONENT = fitted
    write_result(args.out, {"steps": args.steps, "samples": args.samples, "cfg": 2.0, "sampler": "euler",
                            "scheduler": "simple", "comfyui": comfy_env.comfyui_version(comfy_env.find_comfyui()),
                            "fitted": {"size_exponent": fitted[0], "growth_exponent": fitted[1]}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
