"""Demo: sample through ComfyUI's real sampler on the CPU with and without the Speculative
Cache node, and show what it did.

    make demo            (or: .venv/bin/python -m benchmarks.demo)

1. The reference models (ComfyUI's FLUX architecture, small, trained on real photographs;
   see benchmarks/reference_model.py; 6 blocks, and 19 blocks at FLUX's depth ratio when its
   weights are there): one sample per class, uncached and cached, side by
   side in benchmarks/results/demo.png, with steps computed, wall clock and PSNR.
2. ComfyUI's HunyuanVideo class at a small size with random weights: real step counts and
   timings of the video path (random weights say nothing about the picture)."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path

from . import comfy_env

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
    ap.add_argument("--threshold", type=float, default=None, help="node threshold (default: the node's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--update-results", action="store_true",
                    help="write the picture to benchmarks/results/ (the README's) instead of benchmarks/output/")
    args = ap.parse_args(argv)
    if comfy_env.find_comfyui() is None:
        print("ComfyUI not found. Looked in: " + comfy_env.where_looked())
        print("Set COMFYUI_PATH=/path/to/ComfyUI or COMFYUI_ARCHIVE=ComfyUI-X.tar.gz (see README). Nothing to demo.")
        return 1
    comfy_env.setup_comfyui()
    from . import reference_model as rm
    from . import tiny_models as tm
    from .metrics import psnr
    nodes = comfy_env.pack_nodes()
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.hooks")
    stats = []
    hooks.STATS_LISTENERS.append(lambda nid, s, final: final and stats.append(s))
    settings = {} if args.threshold is None else {"threshold": args.threshold}
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
        patched = nodes.SpeculativeCache.execute(model, **settings).result[0]
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

    # 3. HunyuanVideo path at a small size (random weights)
    print(f"[{parts}/{parts}] HunyuanVideo class, small, random weights "
          f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    spec = dict(tm.CONFIGS["hunyuan_video"])
    spec["unet"] = {**spec["unet"], **dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=3,
                                           depth_single_blocks=6)}
    tm.CONFIGS["demo_hunyuan_video"] = spec
    video = tm.build("demo_hunyuan_video", seed=0)
    vrun = lambda m: tm.sample(m, "demo_hunyuan_video", steps=args.steps, cfg=1.0, scale=2)  # noqa: E731
    vrun(video)
    vref, tv_ref = timed(lambda: vrun(video), args.repeats)
    vcached = nodes.SpeculativeCache.execute(video, **settings).result[0]
    vout, tv_cache = timed(lambda: vrun(vcached), args.repeats)
    report(f"HunyuanVideo (small, random weights; latent {tuple(vref.shape)}):", stats[-1], tv_ref, tv_cache)
    print(f"  relative difference to uncached latent: {float((vout - vref).norm() / vref.norm()):.4f}")
    print("  Random weights have no smooth features, so nearly every forecast fails verification; the back-off\n"
          "  stops probing once the wasted probes reach 2 % of the run, so the cache costs at most about that:\n"
          f"  compute fraction {stats[-1]['compute_fraction']:.3f}. The trained models above show the speed-up.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
