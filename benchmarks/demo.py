"""Demo: sample through ComfyUI's real sampler on the CPU with and without the Speculative
Cache node, and show what it did.

    make demo            (or: .venv/bin/python -m benchmarks.demo)

1. The reference models (ComfyUI's FLUX architecture, small, trained on real photographs;
   see devkit/reference_model.py; 6 blocks, and 19 blocks at FLUX's depth ratio when its
   weights are there) through the Speculative Cache node as dropped into a graph: one sample
   per class, uncached and cached, side by side in benchmarks/output/demo*.png, with steps
   computed, wall clock and PSNR.
2. The same node in speed-target mode asked for 2x on the 6-block model: what it reached
   and at what fidelity."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path

from devkit import comfy_env

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUT = Path(__file__).resolve().parent / "output"


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def report(title, s, t_ref, t_cache, psnr_db=None):
    print(f"\n{title}")
    print(f"  computed {s['computed']}/{s['steps']} steps, forecast {s['forecast']}, "
          f"rejected {s['rejected']} of {s['verified']} verified forecasts")
    print(f"  timeline {s['timeline']}  (C computed, F forecast, R rejected)")
    print(f"  compute fraction {s['compute_fraction']:.3f} (estimated speedup {s['speedup']:.2f}x)")
    print(f"  wall clock: uncached {t_ref:.2f} s, cached {t_cache:.2f} s -> {t_ref / t_cache:.2f}x")
    if psnr_db is not None:
        print(f"  fidelity to the uncached images: PSNR {psnr_db:.1f} dB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--speed", type=float, default=0.5, help="the node's speed slider (default: the node's, 0.5)")
    ap.add_argument("--target", type=float, default=2.0, help="speed-up asked for in part 2 (default 2)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--update-results", action="store_true",
                    help="write the picture to benchmarks/results/ (the README's) instead of benchmarks/output/")
    args = ap.parse_args(argv)
    if comfy_env.find_comfyui() is None:
        print("ComfyUI not found. Looked in: " + comfy_env.where_looked())
        print("Set COMFYUI_PATH=/path/to/ComfyUI or COMFYUI_ARCHIVE=ComfyUI-X.tar.gz (see README). Nothing to demo.")
        return 1
    comfy_env.setup_comfyui()
    from devkit import reference_model as rm
    from .metrics import psnr
    nodes = comfy_env.pack_nodes()
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    stats = []
    hooks.STEP_CACHE.listeners.append(lambda nid, s, final: final and stats.append(s))
    settings = {"speed": args.speed}
    print(f"Speculative Cache demo: ComfyUI at {comfy_env.find_comfyui()}, {args.steps} steps, euler, CPU")

    labels = list(range(len(rm.CLASSES)))
    seeds = [7000 + i for i in labels]
    folder = RESULTS if args.update_results else OUTPUT
    folder.mkdir(exist_ok=True)
    started = time.perf_counter()
    models = [m for m in ("reference", "reference_deep") if rm.model_files(m)[0].is_file()]
    parts = len(models) + 1
    for part, name in enumerate(models, start=1):
        # 1-2. the trained reference models: 6 blocks, and FLUX's depth ratio (19 blocks)
        model = rm.load_reference(name)
        patched = nodes.SpeculativeCacheSimple.execute(model, **settings).result[0]
        run = lambda m: rm.sample(m, labels, seeds, steps=args.steps)  # noqa: E731
        t0 = time.perf_counter()
        rm.sample(model, labels[:1], seeds[:1], steps=args.steps)      # warm-up
        estimate = (time.perf_counter() - t0) * len(labels) * args.repeats * 2
        print(f"[{part}/{parts}] {name}: {len(labels)} samples x {args.repeats} repeats, uncached then cached "
              f"(about {estimate / 60:.1f} min)", flush=True)
        ref, t_ref = timed(lambda: run(model), args.repeats)
        n0 = len(stats)
        out, t_cache = timed(lambda: run(patched), args.repeats)
        runs = stats[n0:n0 + len(labels)]
        total = {k: sum(s[k] for s in runs) for k in ("computed", "forecast", "rejected", "verified")}
        s = dict(runs[0], **total, steps=sum(s["steps"] for s in runs),
                 compute_fraction=sum(s["compute_fraction"] for s in runs) / len(runs))
        s["speedup"] = 1 / s["compute_fraction"]
        s["timeline"] = runs[0]["timeline"] + f"  (class 0; {len(runs)} samples in all)"
        unet = rm.MODELS[name]["unet"]
        blocks = unet["depth"] + unet["depth_single_blocks"]
        report(f"{name} (FLUX architecture, {blocks} blocks, trained; {len(labels)} samples of 128x128, cfg 2):",
               s, t_ref, t_cache, sum(psnr(a, b) for a, b in zip(out, ref)) / len(labels))
        picture = folder / ("demo.png" if name == "reference" else f"demo_{name}.png")
        rm.save_grid([ref, out], picture, ["uncached", "Speculative Cache"])
        print(f"  side by side: {picture}")

    # 3. speed target on the 6-block model
    print(f"[{parts}/{parts}] speed target {args.target:.1f}x on the 6-block reference model "
          f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    model = rm.load_reference("reference")
    speed = (args.target - 1.0) / 4.0          # the node's mapping: target = 1 + 4 x speed
    targeted = nodes.SpeculativeCacheSimple.execute(model, mode="speed_target", speed=speed).result[0]
    ref, t_ref = timed(lambda: rm.sample(model, labels, seeds, steps=args.steps), args.repeats)
    n0 = len(stats)
    out, t_cache = timed(lambda: rm.sample(targeted, labels, seeds, steps=args.steps), args.repeats)
    runs = stats[n0:n0 + len(labels)]
    reached = [1 / s["compute_fraction"] for s in runs]
    print(f"\nspeed_target, speed {speed:.2f} (target {args.target:.1f}x): reached "
          f"{min(reached):.2f}x-{max(reached):.2f}x in compute over {len(runs)} samples; wall clock "
          f"{t_ref / t_cache:.2f}x; PSNR {sum(psnr(a, b) for a, b in zip(out, ref)) / len(labels):.1f} dB")
    print(f"  timeline (class 0) {runs[0]['timeline']}; threshold multiplier at the end "
          f"{runs[0]['threshold_scale']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
