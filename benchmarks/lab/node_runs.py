"""What the lab scripts that run the node share: ComfyUI and the pack loaded, each run's final
stats collected, an uncached reference run, a results file written."""

from __future__ import annotations

import importlib
import json

from devkit import comfy_env

from ..run_benchmark import RESULTS, Method, Probe, main_node, reference_workload, run_method


def load_pack() -> list:
    """Load ComfyUI and the pack; returns the list that collects the final stats of every
    sampling run the node makes from now on (its ``STEP_CACHE`` listener)."""
    comfy_env.setup_comfyui()
    comfy_env.pack_nodes()
    hooks = pack_module("nodes.step_cache.run_context")
    finals: list = []
    hooks.STEP_CACHE.listeners.append(lambda node_id, stats, final: final and finals.append(stats))
    return finals


def pack_module(name: str):
    """A module of the pack as ComfyUI loaded it (``cache_core.run``, ...): patching it patches
    what the node runs."""
    return importlib.import_module(f"{comfy_env.PACK_MODULE}.{name}")


def uncached_reference(model: str, samples: int, steps: int, cfg: float = 2.0):
    """(workload, probe, uncached row, uncached pictures) of a reference model: what
    ``run_method`` compares a method's compute and PSNR against."""
    workload = reference_workload(samples, steps, cfg, model)
    probe = Probe(workload)
    base, pictures = run_method(workload, Method("none", {}, lambda m: m), probe)
    return workload, probe, base, pictures


def write_result(out: str | None, result: dict) -> None:
    """benchmarks/results/<out>.json (nothing without ``out``)."""
    if out:
        path = RESULTS / f"{out}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


def target_run(target: float, reference, finals: list) -> dict:
    """The node's speed target ``target`` run on ``reference`` (``uncached_reference``'s tuple):
    compute fraction and PSNR against the uncached run, the full calls it planned and its
    cond-only steps (from its final stats; ``finals``: ``load_pack``'s list)."""
    workload, probe, base, pictures = reference
    method = Method("speca", {"mode": "speed_target", "target_speedup": target},
                    main_node(mode="speed_target", options={"target_speedup": target}))
    row, _ = run_method(workload, method, probe, pictures)
    stats = finals[-1]
    return {"compute_fraction": round(row["macs"] / base["macs"], 4), "psnr_db": round(row["psnr_db"], 2),
            "planned_steps": stats["planned_steps"], "cond_only_steps": stats["cond_only_steps"]}
