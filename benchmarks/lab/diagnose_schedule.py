"""Where should the full steps go? Per-step traces on a reference model.

    .venv/bin/python -m benchmarks.lab.diagnose_schedule [--model reference_deep] [--samples 4]

1. Sensitivity: for every step k alone, forecast only that step (Taylor order 1 from the
   computed steps before it) and measure how far the final image moves (PSNR to uncached).
   A step whose forecast barely moves the image is a cheap one to skip.
2. SpeCa at its defaults: the verification error of each checked forecast against the
   threshold, and which steps were computed.
3. Fixed-interval TaylorSeer at about the same compute: which steps it computes.

Writes benchmarks/results/<model>_schedule.{json,png}."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module


from devkit import comfy_env
from ..run_benchmark import RESULTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--taylorseer-interval", type=int, default=3)
    args = ap.parse_args(argv)
    comfy_env.setup_comfyui()
    from devkit import reference_model as rm
    from ..metrics import psnr
    nodes = comfy_env.pack_nodes()
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    stats = []
    hooks.STEP_CACHE.listeners.append(lambda nid, s, final: final and stats.append(s))
    model = rm.load_reference(args.model)
    labels = [i % len(rm.CLASSES) for i in range(args.samples)]
    seeds = [3000 + i for i in range(args.samples)]

    def run(m):
        return rm.sample(m, labels, seeds, steps=args.steps)

    def ours(**kw):
        return nodes.SpeculativeCache.execute(model, **kw).result[0]

    ref = run(model)

    def fidelity(images):
        return sum(min(psnr(a, b), 100.0) for a, b in zip(images, ref)) / len(ref)

    steps = args.steps
    sensitivity = []
    for k in range(2, steps):
        print(f"sensitivity: step {k}/{steps - 1}", flush=True)
        only_k = ours(preset="custom", method="taylorseer", order=1, warmup_steps=k, max_forecast_steps=1,
                      final_full_steps=steps - k - 1)
        sensitivity.append({"step": k, "psnr_db": fidelity(run(only_k))})

    n0 = len(stats)
    speca_images = run(ours())
    speca_runs = stats[n0:]
    n0 = len(stats)
    n = args.taylorseer_interval
    ts_images = run(ours(preset="custom", method="taylorseer", order=1, max_forecast_steps=n - 1, warmup_steps=3,
                         final_full_steps=0))
    ts_runs = stats[n0:]

    def summary(runs, images):
        return {"compute_fraction": sum(r["compute_fraction"] for r in runs) / len(runs),
                "psnr_db": fidelity(images), "timelines": [r["timeline"] for r in runs],
                "errors": [r["errors"] for r in runs]}

    result = {"model": args.model, "steps": steps, "samples": args.samples, "sensitivity": sensitivity,
              "speca_defaults": summary(speca_runs, speca_images),
              f"taylorseer_interval_{n}": summary(ts_runs, ts_images)}
    name = f"{args.model}_schedule"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{name}.png", n)
    print(json.dumps({k: v for k, v in result.items() if k != "sensitivity"}, default=str)[:2000])
    print(f"wrote {RESULTS / name}.json/.png")
    return 0


def plot(result, path, interval):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = result["steps"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), dpi=100, sharex=True,
                             gridspec_kw={"height_ratios": [2, 2, 1.2]})
    sens = result["sensitivity"]
    axes[0].bar([s["step"] for s in sens], [s["psnr_db"] for s in sens], color="#888")
    axes[0].set_ylabel("PSNR if only this\nstep is forecast (dB)")
    axes[0].set_title(f"{result['model']}: where forecasting costs fidelity ({result['samples']} samples, "
                      f"{steps} steps)")
    sp = result["speca_defaults"]
    for errs in sp["errors"]:
        if not errs:
            continue
        # errors: (evaluation, time, error, threshold, accepted); evaluation = step for euler
        xs = [e[0] for e in errs]
        axes[1].scatter(xs, [e[2] for e in errs], c=["#2a2" if e[4] else "#d60" for e in errs], s=14)
        axes[1].plot(xs, [e[3] for e in errs], color="k", linewidth=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("SpeCa verification error\n(green accepted, orange rejected;\nline: threshold)")
    ts = result[f"taylorseer_interval_{interval}"]
    for row, (name, data) in enumerate((("SpeCa defaults", sp), (f"TaylorSeer every {interval}", ts))):
        counts = [0] * steps
        for tl in data["timelines"]:
            for i, c in enumerate(tl[:steps]):
                counts[i] += c in "CR"
        frac = [c / max(len(data["timelines"]), 1) for c in counts]
        axes[2].bar(range(steps), frac, bottom=row * 1.2, color="#36c" if row == 0 else "#c63")
        axes[2].text(steps - 0.5, row * 1.2 + 0.5, f"{name}: compute {data['compute_fraction']:.2f}, "
                     f"{data['psnr_db']:.1f} dB", ha="right", va="center", fontsize=8)
    axes[2].set_yticks([])
    axes[2].set_ylabel("steps computed\n(share of samples)")
    axes[2].set_xlabel("sampler step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
