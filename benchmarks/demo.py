"""Demo: sample through ComfyUI's real sampler on small FLUX and HunyuanVideo models on the
CPU, with and without the Speculative Cache node, and print what it did.

    make demo            (or: .venv/bin/python -m benchmarks.demo)

The models are ComfyUI's own Flux and HunyuanVideo classes at a small size with random
weights: the timings and step counts are real, the pictures mean nothing (the
benchmark's trained reference model is where fidelity is measured)."""

from __future__ import annotations

import argparse
import math
import sys
import time

from . import comfy_env


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    peak = float(b.abs().max()) or 1.0
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threshold", type=float, default=None, help="node threshold (default: node default)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    if comfy_env.find_comfyui() is None:
        print("ComfyUI not found: set COMFYUI_PATH (see README). Nothing to demo.")
        return 1
    comfy_env.setup_comfyui()
    import torch
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    from . import tiny_models as tm
    nodes = comfy_env.pack_nodes()
    from importlib import import_module
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.hooks")
    stats = []
    hooks.STATS_LISTENERS.append(lambda nid, s, final: final and stats.append(s))

    settings = {} if args.threshold is None else {"threshold": args.threshold}
    # Big enough that the transformer blocks dominate the time, small enough for 2 CPU cores.
    demos = [
        ("FLUX", "flux", dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=3,
                              depth_single_blocks=6), 2, 1.0),
        ("HunyuanVideo", "hunyuan_video", dict(hidden_size=256, num_heads=4, axes_dim=[16, 24, 24],
                                               depth=3, depth_single_blocks=6), 2, 1.0),
    ]
    print(f"Speculative Cache demo: ComfyUI {comfy_env.find_comfyui()}, {args.steps} steps, euler, CPU")
    for title, name, overrides, scale, cfg in demos:
        spec = dict(tm.CONFIGS[name])
        spec["unet"] = {**spec["unet"], **overrides}
        tm.CONFIGS[f"demo_{name}"] = spec
        model = tm.build(f"demo_{name}", seed=0)
        run = lambda m: tm.sample(m, f"demo_{name}", steps=args.steps, cfg=cfg, scale=scale)  # noqa: E731
        run(model)  # warm-up
        ref, t_ref = timed(lambda: run(model), args.repeats)
        patched = nodes.SpeculativeCache.execute(model, **settings).result[0]
        out, t_cache = timed(lambda: run(patched), args.repeats)
        s = stats[-1]
        print(f"\n{title} (tiny, random weights; latent {tuple(ref.shape)}):")
        print(f"  computed {s['computed']}/{s['steps']} steps, forecast {s['forecast']}, "
              f"rejected {s['rejected']} of {s['verified']} verified")
        print(f"  timeline {s['timeline']}")
        print(f"  compute fraction {s['compute_fraction']:.3f} (est. speedup {s['speedup']:.2f}x)")
        print(f"  wall clock: uncached {t_ref:.3f} s, cached {t_cache:.3f} s -> {t_ref / t_cache:.2f}x")
        print(f"  vs uncached output: PSNR {psnr(out, ref):.1f} dB, "
              f"relative error {float((out - ref).norm() / ref.norm()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
