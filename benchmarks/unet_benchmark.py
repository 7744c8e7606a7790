"""U-Net benchmark: Token Pruning (DaTo) against the uncached run, ComfyUI's own ToMe node and
the Speculative Cache node, on the reference U-Net (devkit/reference_unet.py, SD1.5's
config class), through ComfyUI's real sampler.

    .venv/bin/python -m benchmarks.unet_benchmark [--samples 8]

Compute is counted, not timed: every linear and convolution layer's multiply-accumulates
and the attention matmuls from the shapes each attention call really sees. PSNR and SSIM
against the uncached pictures, per picture, averaged. Writes
benchmarks/results/token_pruning_unet.{json,md}."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

import torch

from devkit import comfy_env
from .edit_benchmark import AttentionCounter

RESULTS = Path(__file__).resolve().parent / "results"


class LayerMacs:
    """Multiply-accumulates of every Linear and Conv2d call in a module tree."""

    def __init__(self, module):
        self.total = 0
        self.handles = []
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))
            elif isinstance(m, torch.nn.Conv2d):
                self.handles.append(m.register_forward_hook(self._conv))

    def _linear(self, mod, inputs, output):
        x = inputs[0]
        self.total += (x.numel() // x.shape[-1]) * mod.in_features * mod.out_features

    def _conv(self, mod, inputs, output):
        kh, kw = mod.kernel_size
        self.total += output.numel() * (mod.in_channels // mod.groups) * kh * kw

    def close(self):
        for h in self.handles:
            h.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    comfy_env.setup_comfyui()
    nodes = comfy_env.pack_nodes()
    from devkit import reference_model as rm
    from devkit import reference_unet as ru
    from .metrics import psnr, ssim
    pruning = import_module(f"{comfy_env.PACK_MODULE}.nodes.token_pruning.pruning")
    from comfy_extras.nodes_tomesd import TomePatchModel
    model = ru.load()
    dm = model.get_model_object("diffusion_model")
    labels = [i % len(rm.CLASSES) for i in range(args.samples)]
    seeds = [1000 + i for i in range(args.samples)]

    def prune(**kw):
        return lambda m: nodes.SpeculativeCacheTokenPruning.execute(m, **kw).result[0]

    def tome(ratio):
        def apply(m):
            out = TomePatchModel.execute(m, ratio=ratio)
            return out.result[0] if hasattr(out, "result") else out[0]
        return apply

    def main_node(**kw):
        return lambda m: nodes.SpeculativeCacheSimple.execute(m, **kw).result[0]

    methods = [("none", "uncached", lambda m: m),
               ("token_pruning", "the node as dropped into a graph (ratio 0.5, refresh every 3, self-attention)",
                prune()),
               ("token_pruning", "ratio 0.3, refresh every 3", prune(ratio=0.3)),
               ("token_pruning", "ratio 0.7, refresh every 3", prune(ratio=0.7)),
               ("token_pruning", "ratio 0.5, refresh every 2", prune(refresh_interval=2)),
               ("token_pruning", "ratio 0.5, refresh every 5", prune(refresh_interval=5)),
               ("token_pruning", "ratio 0.5, self- and cross-attention", prune(layers="self- and cross-attention")),
               ("tome (ComfyUI)", "ratio 0.3", tome(0.3)),
               ("tome (ComfyUI)", "ratio 0.5", tome(0.5)),
               ("speca", "the Speculative Cache node as dropped into a graph (output level)", main_node()),
               ("speca + token_pruning", "both nodes at their defaults", lambda m: main_node()(prune()(m)))]
    stats = []
    pruning.PRUNING.listeners.append(lambda nid, s, final: stats.append(s))
    rows, reference, base = [], None, None
    for method, settings, apply in methods:
        patched = apply(model).clone()
        attention = AttentionCounter()
        patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = attention
        layers = LayerMacs(dm)
        n_stats = len(stats)
        images = ru.sample(patched, labels, seeds, steps=args.steps)
        layers.close()
        macs = layers.total + attention.macs
        if reference is None:
            reference, base = images, macs
        row = {"method": method, "settings": settings, "compute_fraction": macs / base,
               "psnr_db": sum(min(psnr(a, b), 100.0) for a, b in zip(images, reference)) / len(images),
               "ssim": sum(ssim(a, b) for a, b in zip(images, reference)) / len(images)}
        if len(stats) > n_stats:
            row["computed_token_fraction"] = sum(s["computed_token_fraction"] for s in stats[n_stats:]) / \
                (len(stats) - n_stats)
        rows.append(row)
        print(f"{method:22s} {settings:70s} compute {row['compute_fraction']:.3f}  PSNR {row['psnr_db']:6.2f} dB  "
              f"SSIM {row['ssim']:.3f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"model": "reference_unet (SD1.5 config class)", "samples": args.samples, "steps": args.steps,
            "sampler": "euler/normal, cfg 3", "comfyui": comfy_env.comfyui_version(comfy_env.setup_comfyui())}
    out = RESULTS / "token_pruning_unet"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Token pruning on the reference U-Net ({args.samples} samples, {args.steps} steps, "
             f"ComfyUI {meta['comfyui']})", "",
             "| method | settings | compute fraction | PSNR dB | SSIM | attention queries computed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['computed_token_fraction']:.3f}" if "computed_token_fraction" in r else ""
        lines.append(f"| {r['method']} | {r['settings']} | {r['compute_fraction']:.3f} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.3f} | {share} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
