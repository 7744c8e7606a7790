"""Several devices against one: the node's decisions and pictures under ComfyUI's MultiGPU CFG
Split and under sequence-parallel ranks, per mode.

    COMFYUI_PATH=<ComfyUI 0.29> .venv/bin/python -m benchmarks.multigpu     (about 2 minutes on 2 cores)

Measured on the CPU with tiny random-weight models (timing means nothing here; decisions and
fidelity do): MultiGPU CFG Split through ComfyUI 0.29's own ``create_multigpu_deepclones`` and
thread pool with two faked devices (cpu:0, cpu:1; research/comfyui-internals.md §8), on a tiny
FLUX and a tiny Wan 2.1, 16 steps; sequence parallelism with two gloo processes on a tiny FLUX
(devkit/sequence_parallel.py), 12 steps. PSNR is of the latent, with the uncached latent's
peak-to-peak range as the peak. Writes benchmarks/results/multigpu.json and .md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEPS = 16
MODELS = ["flux", "wan21"]
MODES = {
    "auto (defaults)": dict(),
    "probe": dict(mode="probe", options=dict(threshold=5.0)),
    "probe, tight (rejects)": dict(mode="probe", options=dict(threshold=0.35)),
    "block granularity": dict(mode="probe", options=dict(threshold=5.0, granularity="block")),
    "planned 4x": dict(mode="speed_target", options=dict(target_speedup=4.0)),
    "planned 4.5x (a cond-only step)": dict(mode="speed_target", options=dict(target_speedup=4.5)),
    "adaptive target": dict(mode="speed_target", speed=0.4),
}


def latent_psnr(a: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((a.double() - reference.double()) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _db(x: float) -> str:
    return "identical" if x == float("inf") else f"{x:.1f}"


def _load_again(name, seed, **loader_options):
    from devkit import tiny_models as tm
    return tm.build(name, seed=seed)


def multigpu_rows() -> list[dict]:
    import comfy.model_management as mm
    import comfy.multigpu
    from devkit import comfy_env
    from devkit import tiny_models as tm
    nodes = comfy_env.pack_nodes()
    import importlib
    hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    seen = []
    hooks.STEP_CACHE.listeners.append(lambda node_id, stats, final: final and seen.append(stats))
    mm.get_all_torch_devices = lambda exclude_current=False: [torch.device("cpu", 0), torch.device("cpu", 1)]
    rows = []
    for name in MODELS:
        base = tm.build(name, seed=3)
        base.cached_patcher_init = (_load_again, (name, 3))
        uncached = tm.sample(base, name, steps=STEPS)
        for mode, inputs in MODES.items():
            if "granularity" in inputs.get("options", {}) and name != "flux":
                continue
            inputs = dict(inputs)
            if "options" in inputs:
                inputs["options"] = nodes.SpeculativeCacheOptions.execute(**inputs["options"]).result[0]
            one = tm.sample(nodes.SpeculativeCacheSimple.execute(base, **inputs).result[0], name, steps=STEPS)
            alone = seen[-1]
            patched = nodes.SpeculativeCacheSimple.execute(comfy.multigpu.create_multigpu_deepclones(base, 2),
                                                           **inputs).result[0]
            two = tm.sample(patched, name, steps=STEPS)
            split = seen[-1]
            again = tm.sample(patched, name, steps=STEPS)
            rows.append(dict(model=name, mode=mode, timeline_one=alone["timeline"], timeline_two=split["timeline"],
                             level=split["mode"], compute_one=alone["compute_fraction"],
                             compute_two=split["compute_fraction"],
                             psnr_one_db=latent_psnr(one, uncached), psnr_two_db=latent_psnr(two, uncached),
                             two_vs_one_db=latent_psnr(two, one), repeat_identical=bool(torch.equal(again, two))))
            print(rows[-1], flush=True)
    return rows


def sequence_parallel_rows() -> list[dict]:
    from devkit.comfy_server import free_port
    worker = ROOT / "devkit" / "sequence_parallel.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(worker), "0", "1", "0", str(tmp / "one.pt")], env=env, check=True,
                       cwd=ROOT, timeout=300)
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp / f"rank{r}.pt")],
                                  env=env, cwd=ROOT) for r in range(2)]
        for p in procs:
            if p.wait(timeout=300) != 0:
                raise RuntimeError("a rank failed")
        one, rank0, rank1 = (torch.load(tmp / f) for f in ("one.pt", "rank0.pt", "rank1.pt"))
    uncached = one["plain"]["latent"]
    rows = []
    from devkit.sequence_parallel import CASES
    for mode in CASES:
        rows.append(dict(mode=mode, timeline_one=one[mode]["timeline"], timeline_rank0=rank0[mode]["timeline"],
                         timeline_rank1=rank1[mode]["timeline"],
                         psnr_one_db=latent_psnr(one[mode]["latent"], uncached),
                         psnr_ranks_db=latent_psnr(rank0[mode]["latent"], uncached),
                         ranks_vs_one_db=latent_psnr(rank0[mode]["latent"], one[mode]["latent"]),
                         ranks_identical=bool(torch.equal(rank0[mode]["latent"], rank1[mode]["latent"]))))
        print(rows[-1], flush=True)
    return rows


def write(multigpu: list[dict], ranks: list[dict], version: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(comfyui=version, steps_multigpu=STEPS, steps_sequence_parallel=12,
                note="tiny random-weight models on the CPU; MultiGPU devices faked (cpu:0, cpu:1); sequence "
                     "parallel: two gloo processes; PSNR of the latent, peak = the uncached latent's range")
    (RESULTS / "multigpu.json").write_text(json.dumps(dict(meta=meta, multigpu_cfg_split=multigpu,
                                                            sequence_parallel=ranks), indent=1) + "\n")
    lines = [f"# Several devices against one (ComfyUI {version}, tiny random-weight models, CPU)", "",
             "MultiGPU CFG Split, two faked devices, 16 steps. PSNR of the latent against the uncached one "
             "(one device); `2 vs 1`: the two-device latent against the one-device latent.", "",
             "| model | mode | level | timeline (1 device) | same on 2 | compute 1 / 2 | PSNR 1 device | PSNR 2 devices | 2 vs 1 | repeat bit-identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in multigpu:
        lines.append(f"| {r['model']} | {r['mode']} | {r['level']} | `{r['timeline_one']}` | "
                     f"{'yes' if r['timeline_one'] == r['timeline_two'] else 'NO: `' + r['timeline_two'] + '`'} | "
                     f"{r['compute_one']:.3f} / {r['compute_two']:.3f} | {_db(r['psnr_one_db'])} | "
                     f"{_db(r['psnr_two_db'])} | {_db(r['two_vs_one_db'])} | {'yes' if r['repeat_identical'] else 'NO'} |")
    lines += ["", "Sequence parallelism, two gloo processes (each token on one rank), tiny FLUX, 12 steps.", "",
              "| mode | timeline (1 process) | rank 0 | rank 1 | PSNR 1 process | PSNR ranks | ranks vs 1 | ranks identical |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ranks:
        lines.append(f"| {r['mode']} | `{r['timeline_one']}` | `{r['timeline_rank0']}` | `{r['timeline_rank1']}` | "
                     f"{_db(r['psnr_one_db'])} | {_db(r['psnr_ranks_db'])} | {_db(r['ranks_vs_one_db'])} | "
                     f"{'yes' if r['ranks_identical'] else 'NO'} |")
    (RESULTS / "multigpu.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    from devkit import comfy_env
    torch.set_num_threads(2)
    path = comfy_env.find_comfyui()
    comfy_env.setup_comfyui(path)
    version = comfy_env.comfyui_version(path)
    import importlib.util
    if importlib.util.find_spec("comfy.multigpu") is None:
        print(f"ComfyUI {version} has no MultiGPU CFG Split (0.29 has it)")
        return 1
    multigpu = multigpu_rows()
    ranks = sequence_parallel_rows()
    write(multigpu, ranks, version)
    print((RESULTS / "multigpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
