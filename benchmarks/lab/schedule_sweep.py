"""Quick comparison of cache settings on a reference model: compute, PSNR, timelines.

    .venv/bin/python -m benchmarks.lab.schedule_sweep --model reference_deep --samples 8 \
        'ts3=ours(preset="custom", method="taylorseer", order=1, max_forecast_steps=2, final_full_steps=0)' \
        't3=main_node(mode="speed_target", speed=0.5)' \
        't3_w4=main_node(mode="speed_target", speed=0.5, options={"warmup_steps": 4})'

Each argument is ``label=expression``; the expression builds a method from ``main_node``
(the main node, with an optional Options dict), ``ours`` (the legacy node's full settings),
as in run_benchmark, or ``engine`` (the main node's mode and speed with CacheConfig fields
replaced, e.g. ``engine(serve_output=True, step_weighting=True)``). Samples use the benchmark's labels and seeds (1000 + i). PSNR is that of
all samples together (pooled squared error), so one bad picture weighs fully; the per-picture
mean is what run_benchmark's tables report. No timing: this is for choosing settings, the
benchmark measures them."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from devkit import comfy_env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="reference (6 blocks), reference_deep (19 blocks) or reference_wan")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--output-level", action="store_true",
                    help="treat the model as one without block patches (Lumina 2, HiDream, Cosmos Predict2, "
                         "OmniGen2): forecast its output as a whole, with that level's preset")
    ap.add_argument("settings", nargs="+", help="label=expression")
    args = ap.parse_args(argv)
    comfy_env.setup_comfyui()
    comfy_env.pack_nodes()                 # loads the pack under its module name
    from devkit import reference_model as rm
    from ..run_benchmark import main_node, ours
    hooks = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.glue")
    if args.output_level:
        adapters = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.adapters")
        for name in ("glue", "legacy_node", "node"):
            module = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.{name}")
            module.select_adapter = lambda diffusion_model: adapters.OutputAdapter()
    seen = []
    hooks.STEP_CACHE.listeners.append(lambda nid, s, final: final and seen.append(s))
    model = rm.load_reference(args.model)
    labels = [i % len(rm.MODELS[args.model]["classes"]) for i in range(args.samples)]
    seeds = [1000 + i for i in range(args.samples)]
    reference = rm.sample(model, labels, seeds, steps=args.steps, name=args.model)
    def engine(mode="auto", speed=0.5, **fields):
        """The main node's config for (mode, speed) with these CacheConfig fields replaced
        (engine settings no node input reaches, such as serve_output)."""
        import dataclasses
        recipe = import_module(f"{comfy_env.PACK_MODULE}.cache_core.recipe")
        adapters = import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.adapters")

        def apply(m):
            adapter = (adapters.OutputAdapter() if args.output_level
                       else adapters.select_adapter(m.get_model_object("diffusion_model")))
            config = recipe.resolve(mode, speed, 0.0, 1.0, adapters.tuned_family(adapter), None).config
            settings = hooks.CacheSettings(config=dataclasses.replace(config, **fields))
            return hooks.install(m, settings, adapter)[0]
        return apply

    names = {"main_node": main_node, "ours": ours, "engine": engine}
    for item in args.settings:
        label, _, expression = item.partition("=")
        method = eval(expression, dict(names))        # the user's own command line
        first = len(seen)
        images = rm.sample(method(model), labels, seeds, steps=args.steps, name=args.model)
        runs = seen[first:]
        compute = sum(s["compute_fraction"] for s in runs) / max(len(runs), 1)
        mean = sum(rm.psnr(images[i:i + 1], reference[i:i + 1]) for i in range(len(seeds))) / len(seeds)
        print(f"{label:24s} compute {compute:.3f}  PSNR {rm.psnr(images, reference):6.2f} dB "
              f"(per-picture mean {mean:6.2f})  "
              f"{runs[0]['timeline'] if runs else ''}"
              + (f"  unit {sum(s['run_unit'] for s in runs) / len(runs):.4f}" if runs and runs[0].get("run_unit") else "")
              + (f"  corrected {sum(s['corrected'] for s in runs)} ({runs[0]['correction']})"
                 if runs and runs[0].get("correction") else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
