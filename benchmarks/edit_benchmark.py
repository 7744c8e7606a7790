"""Inpainting benchmark: the Edit Region node (EEdit) against the uncached run and the
step cache, on the reference models, through ComfyUI's real sampler.

    .venv/bin/python -m benchmarks.edit_benchmark [--model reference|reference_deep] [--samples 8]

Each label's photograph is inpainted with a mask (Set Latent Noise Mask semantics: 1 =
regenerate) as that class. Compute is counted, not timed: every linear layer's
multiply-accumulates (benchmarks.metrics.MacCounter) plus the attention matmuls from the
shapes each attention call really sees (no wall clock: it runs beside other work) (queries x keys, so a partial call whose region
attends to the whole picture is counted as such). PSNR: over the whole picture and over
the masked pixels only (the unmasked ones are the source picture in every run); "outside":
the largest difference outside the mask. Writes benchmarks/results/edit_region_<model>.{json,md}."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

import torch

from devkit import comfy_env

RESULTS = Path(__file__).resolve().parent / "results"


def masks():
    """Masks at latent resolution (32 x 32 latent pixels = 16 x 16 tokens)."""
    small = torch.zeros(1, 1, 32, 32)
    small[..., 12:20, 12:20] = 1                 # 6 % of the picture
    quarter = torch.zeros(1, 1, 32, 32)
    quarter[..., 8:24, 8:24] = 1                 # 25 %
    half = torch.zeros(1, 1, 32, 32)
    half[..., :, :16] = 1                        # 50 %
    return {"small (6 %)": small, "quarter (25 %)": quarter, "half (50 %)": half}


class AttentionCounter:
    """An attention override that adds 2 x B x heads x queries x keys x head_dim per call."""

    def __init__(self):
        self.macs = 0

    def __call__(self, func, *args, **kwargs):
        q, k = args[0], args[1]
        if q.ndim == 4:
            b, h, lq, d = q.shape
            lk = k.shape[2]
        else:
            b, lq, hd = q.shape
            h, d, lk = 1, hd, k.shape[1]
        self.macs += 2 * b * h * lq * lk * d
        return func(*args, **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--region", nargs="*", default=None, metavar="MARGIN,INTERVAL[,ORDER]",
                    help="only these Edit Region settings (and no other method); implies --no-write")
    ap.add_argument("--mask", nargs="*", default=None, help="only these masks (small, quarter, half)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    comfy_env.setup_comfyui()
    nodes = comfy_env.pack_nodes()
    from devkit import reference_model as rm
    from .metrics import MacCounter, psnr
    edit = import_module(f"{comfy_env.PACK_MODULE}.nodes.edit_region.region")
    model = rm.load_reference(args.model)
    dm = model.get_model_object("diffusion_model")
    labels = [i % len(rm.CLASSES) for i in range(args.samples)]
    seeds = [1000 + i for i in range(args.samples)]
    edit_stats = []
    edit.EDIT.listeners.append(lambda nid, s, final: edit_stats.append(s))

    def counted(patcher):
        m = patcher.clone()
        counter = AttentionCounter()
        to = m.model_options.setdefault("transformer_options", {})
        to["optimized_attention_override"] = counter
        return m, counter

    def region_edit(margin, interval, order=None):
        if order is None:
            return lambda m: edit.SpeculativeCacheEditRegion.execute(m, margin=margin, refresh_interval=interval).result[0]
        settings = edit.EditRegionSettings(margin=margin, refresh_interval=interval, context_order=order)
        return lambda m: edit.install(m, settings)

    def main_node(**kw):
        return lambda m: nodes.SpeculativeCacheSimple.execute(m, **kw).result[0]

    methods = [("none", "uncached", lambda m: m)]
    if args.region is not None:
        args.no_write = True
        for item in args.region:
            mg, iv, *order = (int(v) for v in item.split(","))
            methods.append(("edit_region", f"margin {mg}, refresh every {iv}, context order {order or 'default'}",
                            region_edit(mg, iv, *order)))
    else:
        node = lambda m: edit.SpeculativeCacheEditRegion.execute(m).result[0]  # noqa: E731
        methods.append(("edit_region", "the node as dropped into a graph (margin 2, refresh every 3, "
                                       "linear context)", node))
        methods += [("edit_region", f"margin {mg}, refresh every {iv}, {'linear' if o else 'reuse'} context",
                     region_edit(mg, iv, o)) for mg, iv, o in ((2, 3, 0), (2, 2, 1), (2, 4, 1), (1, 3, 1), (0, 3, 1))]
        methods += [("speca", "the Speculative Cache node as dropped into a graph", main_node()),
                    ("speca", "speed_target 2x", main_node(mode="speed_target", speed=0.25))]
        methods += [("edit_region + speca", f"both nodes at their defaults{extra}",
                     lambda m, kw=kw: main_node(**kw)(node(m)))
                    for extra, kw in (("", {}), (", speed_target 2x", dict(mode="speed_target", speed=0.25)),
                                      (", speed_target 3x", dict(mode="speed_target", speed=0.5)))]
    rows = []
    for mask_name, mask in masks().items():
        if args.mask and mask_name.split()[0] not in args.mask:
            continue
        up = torch.nn.functional.interpolate(mask, size=(128, 128))
        reference = None
        base_macs = None
        for method, settings, apply in methods:
            patched, attention = counted(apply(model))
            linear = MacCounter(dm)
            n_stats = len(edit_stats)
            images = rm.inpaint(patched, labels, seeds, mask, steps=args.steps)
            linear.close()
            macs = linear.total + attention.macs
            if reference is None:
                reference, base_macs = images, macs
            inside = up.expand_as(images) > 0
            row = {"mask": mask_name, "method": method, "settings": settings,
                   "compute_fraction": macs / base_macs,
                   "psnr_db": sum(min(psnr(a, b), 100.0) for a, b in zip(images, reference)) / len(images),
                   "psnr_masked_db": min(psnr(images[inside], reference[inside]), 100.0),
                   "outside_max_diff": float((images - reference).abs()[~inside].max())}
            if len(edit_stats) > n_stats:
                s = edit_stats[-1]
                row["region_tokens"] = f"{s['region_tokens']}/{s['image_tokens']}"
                row["estimated_compute"] = s["compute_fraction"]
            rows.append(row)
            print(f"{mask_name:15s} {method:12s} {settings:52s} compute {row['compute_fraction']:.3f}  "
                  f"PSNR {row['psnr_db']:6.2f} / masked {row['psnr_masked_db']:6.2f} dB  "
                  f"outside {row['outside_max_diff']:.1e}  {row.get('region_tokens', '')}", flush=True)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"edit_region_{args.model}"
        meta = {"model": args.model, "samples": args.samples, "steps": args.steps, "comfyui": comfy_env.comfyui_version(comfy_env.setup_comfyui())}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"# Inpainting on the {args.model} model ({args.samples} samples, {args.steps} steps, "
                 f"ComfyUI {meta['comfyui']})", "",
                 "| mask | method | settings | compute fraction | PSNR dB | PSNR masked dB | max diff outside | region tokens |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['mask']} | {r['method']} | {r['settings']} | {r['compute_fraction']:.3f} | "
                         f"{r['psnr_db']:.2f} | {r['psnr_masked_db']:.2f} | {r['outside_max_diff']:.1e} | "
                         f"{r.get('region_tokens', '')} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
