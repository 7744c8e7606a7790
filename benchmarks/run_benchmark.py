"""Side-by-side benchmark: every method on the same model, conditions and seeds, in one
process, against the uncached run.

    .venv/bin/python -m benchmarks.run_benchmark            # full run on the reference model
    .venv/bin/python -m benchmarks.run_benchmark --quick    # smoke test (< 3 min on 2 cores)
    .venv/bin/python -m benchmarks.run_benchmark --recipe my_flux.json   # any ComfyUI model (GPU)
    .venv/bin/python -m benchmarks.run_benchmark --reproduce benchmarks/results/reference_beyond.json \
        --grid beyond --model reference            # rerun committed rows: did a change keep behaviour?

Per row: compute fraction (multiply-accumulates counted in the transformer, verification
included, over the uncached run), wall-clock speedup (same process), PSNR and SSIM of the
final images against the uncached ones, peak cache memory, verification overhead.
Writes benchmarks/results/<name>.json, .md and .png."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devkit import comfy_env

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Method:
    method: str
    settings: dict
    apply: object  # model -> patched model
    prepare: object = None  # (workload, sample_one) -> None: run once before the row (a calibration)


@dataclass
class Workload:
    name: str
    model: object                     # ModelPatcher
    samples: list                     # [(positive, negative, seed)]
    latent_shape: tuple
    steps: int = 28
    cfg: float = 2.0
    sampler: str = "euler"
    scheduler: str = "simple"
    decode: object = None             # samples -> images in [0, 1] (None: latent space)
    info: dict = field(default_factory=dict)


# ---- methods --------------------------------------------------------------------------
def ours(**inputs):
    """The Speculative Cache node with these inputs (the others at their defaults)."""
    nodes = comfy_env.pack_nodes()
    return lambda m: nodes.SpeculativeCache.execute(m, **inputs).result[0]


def main_node(options: dict | None = None, **inputs):
    """The main Speculative Cache node (mode, speed, start/end) with these inputs, fed by an
    Options node with ``options`` (the others at their defaults) when given."""
    nodes = comfy_env.pack_nodes()
    opts = nodes.SpeculativeCacheOptions.execute(**options).result[0] if options else None
    return lambda m: nodes.SpeculativeCacheSimple.execute(m, options=opts, **inputs).result[0]


def engine(**fields):
    """The cache installed with exactly these CacheConfig fields (the others at their
    defaults), for engine settings no node input reaches (SpecDiff's token tiers)."""
    glue = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.glue")
    core = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core")
    config = core.CacheConfig(**fields)
    return lambda m: glue.install(m, glue.CacheSettings(config=config))[0]


def easy(cls, th):
    """ComfyUI's EasyCache / LazyCache node at reuse threshold ``th``."""
    return lambda m: cls.execute(m, reuse_threshold=th, start_percent=0.15, end_percent=0.95,
                                 verbose=False).result[0]


def taylorseer_row(n: int) -> Method:
    """Fixed-interval TaylorSeer (order 1): one computed step every ``n``, after 3 warm-up steps."""
    return Method("taylorseer", {"interval": n, "order": 1},
                  ours(preset="custom", method="taylorseer", order=1, max_forecast_steps=n - 1,
                       warmup_steps=3, final_full_steps=0))


def learned_row(target: float) -> Method:
    """The L2P-style learned linear predictor at the node's planned schedule for ``target``
    (benchmarks/learned_predictor.py), calibrated on uncached runs of the workload at other seeds."""
    from .learned_predictor import LearnedPredictor
    predictor = LearnedPredictor(target)
    return Method("l2p", predictor.settings(), predictor.apply, predictor.prepare)


def peer_rows(plan) -> list[Method]:
    """The peers as users have them: a first-block cache (where the model has a block plan) and
    ComfyUI's own EasyCache and LazyCache nodes."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from .baselines import apply_fbcache
    rows = []
    if plan is not None:
        for th in (0.1, 0.2):
            rows.append(Method("fbcache", {"threshold": th}, lambda m, th=th: apply_fbcache(m, th, plan)))
    for th in (0.2, 0.5):
        rows.append(Method("easycache", {"reuse_threshold": th}, easy(EasyCacheNode, th)))
        rows.append(Method("lazycache", {"reuse_threshold": th}, easy(LazyCacheNode, th)))
    return rows


def focus_grid(plan) -> list[Method]:
    """The rows that decide the defaults: the node as dropped into a graph, SpeCa's threshold
    on both acceptance metrics, a threshold so strict that every forecast fails (the
    back-off's cost bound), the fixed-interval TaylorSeer it must beat, and the peers."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    # auto (lookback acceptance) along the speed slider
    for speed in (0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0):
        grid.append(Method("speca", {"acceptance": "lookback", "speed": speed}, main_node(speed=speed)))
    # the same without the trajectory correction (the Options switch)
    for speed in (0.5, 0.75):
        grid.append(Method("speca", {"acceptance": "lookback", "speed": speed, "trajectory_correction": False},
                           main_node(speed=speed, options={"trajectory_correction": "off"})))
    # the probe (SpeCa's per-step check; the node's default before lookback)
    grid.append(Method("speca", {"mode": "probe", "speed": 0.5}, main_node(mode="probe")))
    for th in (0.05, 0.1, 0.2, 0.3, 0.5):
        grid.append(Method("speca", {"threshold": th}, ours(threshold=th)))
    for th in (0.3, 0.6, 1.0):
        grid.append(Method("speca", {"threshold": th, "order": 1}, ours(threshold=th, order=1)))
    for target in (2.0, 3.0, 4.0, 5.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", speed=(target - 1.0) / 4.0)))
    for th in (0.2, 0.35, 0.5, 0.7):
        grid.append(Method("speca", {"metric": "relative_change", "threshold": th},
                           ours(metric="relative_change", threshold=th)))
    grid.append(Method("speca", {"threshold": 1e-4, "note": "every forecast fails"}, ours(threshold=1e-4)))
    for n in (2, 3, 4, 6):
        grid.append(taylorseer_row(n))
    grid.append(Method("reuse", {"interval": 2}, ours(preset="custom", method="reuse", max_forecast_steps=1,
                                                      warmup_steps=3, final_full_steps=0)))
    grid += peer_rows(plan)
    return grid


def beyond_grid(plan=None) -> list[Method]:
    """Speed targets from 4x to beyond the slider's 5x (the Options node's ``target_speedup``),
    planned (their default from 4x on) and adaptive, against the fixed-interval TaylorSeer at
    the same compute, and the node's defaults."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    for target in (4.0, 5.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", speed=(target - 1.0) / 4.0)))
    for target in (6.0, 7.0, 8.0, 10.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target})))
    for target in (5.0, 7.0):        # the threshold loop placing the calls (before planning)
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target,
                                     "target_schedule": "adaptive"},
                           main_node(mode="speed_target", options={"target_speedup": target,
                                                                   "target_schedule": "adaptive"})))
    for n in (4, 6, 7, 8):
        grid.append(taylorseer_row(n))
    return grid


def tokens_grid(plan=None) -> list[Method]:
    """SpecDiff's token tiers against what they must beat: SpeCa at block granularity
    without tiers (the same verification, the same history), ClusCa (the other token-level
    refresh) and TaylorSeer at fixed intervals, and the node's defaults. The tiers have no
    node input, so every row but the defaults sets the engine's config directly."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    tiers = [{}, {"token_compute": 0.1}, {"token_compute": 0.25}, {"token_compute": 0.1, "token_reuse": 0.3}]
    for th in (0.1, 0.2, 0.3):
        for t in tiers:
            grid.append(Method("specdiff" if t else "speca", {"threshold": th, "granularity": "block", **t},
                               engine(threshold=th, granularity="block", **t)))
    fixed = dict(order=1, warmup_steps=3, final_full_steps=0)
    for n in (2, 3, 4):
        grid.append(Method("clusca", {"interval": n, "order": 1, "clusters": 16, "gamma": 0.005},
                           engine(method="clusca", max_forecast_steps=n - 1, **fixed)))
        grid.append(Method("taylorseer", {"interval": n, "order": 1},
                           engine(method="taylorseer", max_forecast_steps=n - 1, **fixed)))
        grid.append(Method("specdiff", {"interval": n, "order": 1, "method": "taylorseer", "token_compute": 0.25},
                           engine(method="taylorseer", max_forecast_steps=n - 1, token_compute=0.25, **fixed)))
    return grid


def method_grid(quick: bool, plan) -> list[Method]:
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from .baselines import apply_fbcache

    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    intervals = [3, 5] if quick else [2, 3, 4, 5, 6]
    for n in intervals:   # FORA: reuse at a fixed interval n (n-1 reused steps per computed one)
        grid.append(Method("reuse", {"interval": n}, ours(preset="custom", method="reuse", max_forecast_steps=n - 1,
                                                           warmup_steps=3, final_full_steps=0)))
    if plan is not None:
        for th in ([0.1, 0.3] if quick else [0.03, 0.05, 0.1, 0.2, 0.3, 0.5]):
            grid.append(Method("fbcache", {"threshold": th}, lambda m, th=th: apply_fbcache(m, th, plan)))
    for th in ([0.2, 0.5] if quick else [0.05, 0.1, 0.2, 0.3, 0.5, 0.8]):
        grid.append(Method("easycache", {"reuse_threshold": th}, easy(EasyCacheNode, th)))
        grid.append(Method("lazycache", {"reuse_threshold": th}, easy(LazyCacheNode, th)))
    for order in ([1] if quick else [1, 2]):
        for n in intervals:
            grid.append(Method("taylorseer", {"interval": n, "order": order},
                               ours(preset="custom", method="taylorseer", order=order, max_forecast_steps=n - 1,
                                    warmup_steps=3, final_full_steps=0)))
    if not quick:
        for n in intervals:
            grid.append(Method("hicache", {"interval": n, "order": 2, "scale": 0.7},
                               ours(preset="custom", method="hicache", order=2, max_forecast_steps=n - 1,
                                    warmup_steps=3, final_full_steps=0)))
            grid.append(Method("foca", {"interval": n},
                               ours(preset="custom", method="foca", max_forecast_steps=n - 1, warmup_steps=3,
                                    final_full_steps=0)))
            grid.append(Method("clusca", {"interval": n, "order": 1, "clusters": 16, "gamma": 0.005},
                               ours(preset="custom", method="clusca", order=1, max_forecast_steps=n - 1,
                                    warmup_steps=3, final_full_steps=0, clusters=16, gamma=0.005)))
    speca = [(0.1, 8), (0.3, 8)] if quick else [
        (th, mf) for mf in (4, 8) for th in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)]
    for th, mf in speca:
        grid.append(Method("speca", {"threshold": th, "max_forecast_steps": mf},
                           ours(preset="custom", threshold=th, max_forecast_steps=mf)))
    if not quick:   # towards 4x less compute: longer runs, fewer fixed full steps
        for th in (0.3, 0.5, 1.0):
            grid.append(Method("speca", {"threshold": th, "max_forecast_steps": 12, "order": 1,
                                         "warmup_steps": 2, "final_full_steps": 0},
                               ours(preset="custom", threshold=th, max_forecast_steps=12, order=1, warmup_steps=2,
                                    final_full_steps=0)))
    if not quick:
        for th in (0.05, 0.1, 0.2, 0.3):
            grid.append(Method("speca", {"threshold": th, "max_forecast_steps": 8, "granularity": "block"},
                               ours(preset="custom", threshold=th, max_forecast_steps=8, granularity="block")))
        for fc in ("hicache", "foca"):
            for th in (0.1, 0.2, 0.3):
                grid.append(Method("speca", {"threshold": th, "max_forecast_steps": 8, "forecaster": fc},
                                   ours(preset="custom", threshold=th, max_forecast_steps=8, forecaster=fc)))
        for th in (3.0, 7.0, 15.0):
            grid.append(Method("speca", {"preset": "paper_flux", "threshold": th},
                               ours(preset="paper_flux", threshold=th)))
    return grid


# ---- measurement --------------------------------------------------------------------
class Probe:
    """Per-run measurements that are not the pack's own stats: MACs counted by hooks,
    cache bytes of any holder found in transformer_options, our stats, timing."""

    def __init__(self, workload: Workload):
        dm = workload.model.model.diffusion_model
        self.dm = dm
        self.blocks = [b for name in ("double_blocks", "single_blocks", "blocks", "transformer_blocks",
                                      "joint_blocks", "layers") for b in (getattr(dm, name, None) or [])]
        self.macs = None
        comfy_env.pack_nodes()
        hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
        self.our_stats = []
        hooks.STEP_CACHE.listeners.append(lambda nid, s, final: final and self.our_stats.append(s))
        self.holder_bytes = 0

    def calc_cond_batch_probe(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        to = args[-1].get("transformer_options", {})
        for key in ("easycache",):
            holder = to.get(key)
            if holder is not None:
                self.holder_bytes = max(self.holder_bytes, _tensor_bytes(vars(holder)))
        return out


def _tensor_bytes(obj, depth=0) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 2:
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in obj)
    return 0


def _sample_one(workload, patched, positive, negative, seed, callback=None):
    """One picture of the workload through ComfyUI's sampler; ``callback``: the sampler's
    per-step callback."""
    import comfy.sample
    latent = comfy.sample.fix_empty_latent_channels(patched, torch.zeros(workload.latent_shape))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patched, noise, workload.steps, workload.cfg, workload.sampler,
                               workload.scheduler, positive, negative, latent, disable_pbar=True, seed=seed,
                               callback=callback)


def time_against_base(workload: Workload, method: Method, samples: int, repeats: int) -> tuple[float, float]:
    """Wall clock of the method and of the uncached model on the same samples, with no
    counting hooks. Each sample is timed in pairs (base, then method, back to back, ``repeats``
    times), so that a slow spell of the machine falls on both; each sample's time is the median
    of its repeats, and the totals are summed over the samples. (Timing whole runs of samples,
    base then method, best of 3, read 84-112 % of 1/compute for the same schedules on this
    2-core VM: the pairing and the median take the drift between the two out.)"""
    patched = method.apply(workload.model)
    times = {"base": [], "method": []}
    for positive, negative, seed in workload.samples[:samples]:
        runs = {"base": [], "method": []}
        for _ in range(repeats):
            for name, model in (("base", workload.model), ("method", patched)):
                t = time.perf_counter()
                _sample_one(workload, model, positive, negative, seed)
                runs[name].append(time.perf_counter() - t)
        for name in runs:
            times[name].append(statistics.median(runs[name]))
    return sum(times["base"]), sum(times["method"])


def run_method(workload: Workload, method: Method, probe: Probe, images_ref=None):
    import comfy.patcher_extension as pe
    from .baselines import fbcache_outer_sample
    from .metrics import MacCounter, psnr, ssim

    if method.prepare is not None:
        method.prepare(workload, lambda m, positive, negative, seed: _sample_one(workload, m, positive, negative, seed))
    probe.macs = MacCounter(probe.dm, probe.blocks)
    patched = method.apply(workload.model).clone()
    patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "bench_probe", probe.calc_cond_batch_probe)
    outputs, seconds, macs, verified, cache_bytes = [], 0.0, 0, 0, 0
    last_block_macs, acceptance, corrected = 0, "", 0
    for positive, negative, seed in workload.samples:
        probe.macs.total, probe.macs.by_block = 0, {}
        probe.holder_bytes = 0
        n_stats = len(probe.our_stats)
        fbcache_outer_sample.last = None
        t = time.perf_counter()
        out = _sample_one(workload, patched, positive, negative, seed)
        seconds += time.perf_counter() - t
        macs += probe.macs.total
        if probe.blocks:
            last_block_macs = probe.macs.by_block.get(len(probe.blocks) - 1, 0)
        outputs.append(out)
        if len(probe.our_stats) > n_stats:
            s = probe.our_stats[-1]
            verified += s["verified"]
            acceptance = s.get("acceptance", "")
            corrected += s.get("corrected", 0)
            cache_bytes = max(cache_bytes, s["cache_bytes"])
        if fbcache_outer_sample.last:
            cache_bytes = max(cache_bytes, fbcache_outer_sample.last["cache_bytes"])
        cache_bytes = max(cache_bytes, probe.holder_bytes)
    probe.macs.close()
    images = [workload.decode(o) if workload.decode else o for o in outputs]
    row = {"method": method.method, "settings": method.settings, "seconds": seconds, "macs": macs,
           "cache_bytes": cache_bytes, "verified": verified, "last_block_macs_per_run": last_block_macs,
           "acceptance": acceptance, "corrected": corrected}
    if images_ref is not None:
        peak = 1.0 if workload.decode else max(float(r.abs().max()) for r in images_ref) * 2
        row["psnr_db"] = sum(min(psnr(a, b, peak), 100.0) for a, b in zip(images, images_ref)) / len(images)
        row["ssim"] = sum(ssim(a, b, peak) for a, b in zip(images, images_ref)) / len(images)
    return row, images


FLUX_BLOCKS = 57   # FLUX.1: 19 double + 38 single blocks


def benchmark(workload: Workload, quick: bool, plan, log=print, timing_samples: int = 3,
              timing_repeats: int = 3, grid=None) -> dict:
    probe = Probe(workload)
    grid = method_grid(quick, plan) if grid is None else grid
    started = time.perf_counter()
    # warm-up (allocator, lazy init) so the first timed row is not penalised
    run_method(Workload(**{**workload.__dict__, "samples": workload.samples[:1]}), grid[0], probe)
    base, images_ref = run_method(workload, grid[0], probe)
    rows = []
    n_samples = len(workload.samples)
    for i, method in enumerate(grid):
        if i:
            left = (time.perf_counter() - started) / i * (len(grid) - i)
            log(f"[{i + 1}/{len(grid)}] about {left / 60:.0f} min left")
        row, _ = run_method(workload, method, probe, images_ref)
        row["compute_fraction"] = row["macs"] / base["macs"]
        t_base, t_method = time_against_base(workload, method, timing_samples, timing_repeats)
        row["speedup"] = t_base / t_method
        row["seconds_per_sample"] = t_method / min(timing_samples, n_samples)
        # One verification = one call of the last block; in the uncached run that block runs
        # once per step, so its MACs per call are counted there.
        full_step = base["macs"] / (n_samples * workload.steps)
        per_verification = base["last_block_macs_per_run"] / workload.steps
        row["verify_fraction"] = row["verified"] * per_verification / base["macs"]
        row["verify_cost_per_step"] = per_verification / full_step if row["verified"] else 0.0
        # The same run if a probe cost what one block costs in FLUX.1 (1/57 of the blocks)
        # instead of one of this model's few blocks: a projection, labelled as such.
        n_blocks = max(len(probe.blocks), 1)
        row["compute_fraction_at_flux_depth"] = (row["compute_fraction"] - row["verify_fraction"]
                                                 + row["verify_fraction"] * n_blocks / FLUX_BLOCKS)
        for k in ("macs", "last_block_macs_per_run", "seconds"):
            row.pop(k)
        rows.append(row)
        log(f"{row['method']:>10} {json.dumps(row['settings']):<60} compute {row['compute_fraction']:.3f}  "
            f"speedup {row['speedup']:.2f}x  PSNR {row['psnr_db']:.2f} dB  SSIM {row['ssim']:.4f}  "
            f"cache {row['cache_bytes'] / 2**20:.2f} MiB")
    return {"model": workload.name, "steps": workload.steps, "samples": n_samples, "cfg": workload.cfg,
            "sampler": workload.sampler, "scheduler": workload.scheduler, "info": workload.info, "rows": rows}


# ---- workloads ------------------------------------------------------------------------
def reference_workload(n_samples: int, steps: int, cfg: float, name: str = "reference") -> Workload:
    from devkit import reference_model as rm
    model = rm.load_reference(name)
    samples = []
    classes = rm.MODELS[name]["classes"]
    for i in range(n_samples):
        label = i % len(classes)
        samples.append((rm.conditioning(label), rm.conditioning(rm.NULL_CLASS), 1000 + i))
    weights = rm.model_files(name)[0]
    family = rm.MODELS[name]["family"]
    title = "reference_flux_tiny" if name == "reference" else (
        name if family == "wan" else f"{name}_flux_tiny")
    return Workload(title, model, samples, rm.latent_shape(name), steps=steps, cfg=cfg,
                    decode=lambda s: rm.decode(s, name),
                    info={"weights": str(weights.relative_to(comfy_env.PACK_ROOT)), "family": family,
                          "classes": classes, "unet_config": rm.MODELS[name]["unet"]})


def recipe_workload(path: Path) -> Workload:
    """A ComfyUI diffusion-model file plus a conditioning recipe (JSON), e.g. real FLUX:
    {"model": "flux1-dev.safetensors", "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
     "clip_type": "flux", "prompts": ["a red fox ..."], "negative": "", "guidance": 3.5,
     "latent": [1, 16, 128, 128], "seeds": [0, 1], "steps": 28, "cfg": 1.0, "vae": "ae.safetensors"}
    Optional "unet_config" (+ "model_config": "Flux") for models ComfyUI cannot auto-detect."""
    import comfy.sd
    import comfy.utils
    recipe = json.loads(Path(path).read_text())
    base = Path(path).parent
    resolve = lambda p: str(Path(p) if Path(p).is_absolute() else base / p)  # noqa: E731
    if recipe.get("unet_config"):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models as sm
        from devkit.tiny_models import complete_unet_config
        cfg = getattr(sm, recipe.get("model_config", "Flux"))(complete_unet_config(recipe["unet_config"]))
        cfg.set_inference_dtype(torch.float32 if not torch.cuda.is_available() else torch.bfloat16, None)
        bm = cfg.get_model({}, device=torch.device("cpu"))
        bm.diffusion_model.load_state_dict(cfg.process_unet_state_dict(comfy.utils.load_torch_file(resolve(recipe["model"]))),
                                          strict=True)
        model = comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
    else:
        model = comfy.sd.load_diffusion_model(resolve(recipe["model"]))
    samples = []
    seeds = recipe.get("seeds", [0])
    cond = recipe.get("conditioning", "text")
    if cond == "reference_classes":
        from devkit import reference_model as rm
        for i, seed in enumerate(seeds):
            samples.append((rm.conditioning(i % len(rm.CLASSES)), rm.conditioning(rm.NULL_CLASS), seed))
    else:
        clip = comfy.sd.load_clip([resolve(p) for p in recipe["text_encoders"]],
                                  clip_type=getattr(comfy.sd.CLIPType, recipe.get("clip_type", "flux").upper()))

        def encode(text):
            tokens = clip.tokenize(text)
            c = clip.encode_from_tokens_scheduled(tokens)
            if recipe.get("guidance") is not None:
                c = [[t, {**d, "guidance": recipe["guidance"]}] for t, d in c]
            return c
        negative = encode(recipe.get("negative", ""))
        for prompt in recipe["prompts"]:
            for seed in seeds:
                samples.append((encode(prompt), negative, seed))
    decode = None
    if recipe.get("vae"):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(resolve(recipe["vae"])))
        decode = lambda s: vae.decode(s).movedim(-1, 1).float()  # noqa: E731
    return Workload(Path(path).stem, model, samples, tuple(recipe["latent"]), steps=recipe.get("steps", 28),
                    cfg=recipe.get("cfg", 1.0), sampler=recipe.get("sampler", "euler"),
                    scheduler=recipe.get("scheduler", "simple"), decode=decode, info={"recipe": recipe})


def block_plan(model):
    comfy_env.pack_nodes()
    adapters = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.adapters")
    found = adapters.stack_plan_for(model.get_model_object("diffusion_model"))
    return None if found is None else found[1].blocks


# ---- reproducing committed rows ---------------------------------------------------------
def spectrum_grid(plan=None) -> list[Method]:
    """Spectrum (CVPR 2026, arXiv 2603.01623; cache_core/forecasters/spectrum.py) against the node:
    at the paper's kind of schedule (a fixed interval after a warm-up, no verification) and at the
    node's planned schedules (speed targets with Spectrum as the forecaster), beside the node's
    defaults and planned targets (Taylor, corrected) at the same compute."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    for target in (4.0, 5.0, 6.0, 7.0, 8.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target})))
        grid.append(Method("spectrum", {"schedule": "planned", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target,
                                                                   "forecaster": "spectrum"})))
    for n in (2, 3, 4, 5, 6, 8):
        grid.append(Method("spectrum", {"schedule": "interval", "interval": n},
                           ours(preset="custom", method="spectrum", max_forecast_steps=n - 1,
                                warmup_steps=3, final_full_steps=0)))
    return grid


def few_steps_grid(plan=None) -> list[Method]:
    """Rows for runs of 4 to 8 steps (distilled models' step counts, ``--steps 4``): the node at
    its defaults, along the slider, in probe mode and at speed targets, against fixed-interval
    TaylorSeer, a first-block cache and ComfyUI's EasyCache and LazyCache. Nothing may cost more
    than the uncached run."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from .baselines import apply_fbcache
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    for speed in (0.3, 0.7, 1.0):
        grid.append(Method("speca", {"acceptance": "lookback", "speed": speed}, main_node(speed=speed)))
    grid.append(Method("speca", {"mode": "probe", "speed": 0.5}, main_node(mode="probe")))
    for target in (2.0, 3.0, 4.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target})))
    grid.append(Method("taylorseer", {"interval": 2, "order": 1},
                       ours(preset="custom", method="taylorseer", order=1, max_forecast_steps=1,
                            warmup_steps=1, final_full_steps=0)))
    if plan is not None:
        grid.append(Method("fbcache", {"threshold": 0.1}, lambda m: apply_fbcache(m, 0.1, plan)))
    for th in (0.2, 0.5):
        grid.append(Method("easycache", {"reuse_threshold": th}, easy(EasyCacheNode, th)))
        grid.append(Method("lazycache", {"reuse_threshold": th}, easy(LazyCacheNode, th)))
    return grid


def slider_grid(plan=None) -> list[Method]:
    """The main node's speed slider in auto mode at every 0.1 from 0.1 to 0.9 (and 0.25), to show
    that each step of travel saves compute and costs fidelity on every model, beside the node's
    defaults."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    for speed in (0.1, 0.2, 0.25, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9):
        grid.append(Method("speca", {"acceptance": "lookback", "speed": speed}, main_node(speed=speed)))
    return grid


def held_out_grid(plan=None) -> list[Method]:
    """One run on a model nothing was tuned on: the slider (slider_grid), speed targets from 2x to 8x
    (with Taylor and with Spectrum as the forecaster), the probe, and every peer: the L2P-style
    learned predictor at the node's 4x, 6x and 8x schedules, fixed-interval TaylorSeer and Spectrum,
    a first-block cache (FBCache-style) and ComfyUI's EasyCache and LazyCache."""
    recipe = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.recipe")
    grid = slider_grid(plan)
    # the slider as it was before its tolerance counted the run's own error (an absolute tolerance,
    # which the Options node's threshold still sets)
    for speed in (0.1, 0.3, 0.5, 0.7):
        absolute = recipe.speed_to_threshold(speed, recipe.LOOKBACK_THRESHOLD)
        grid.append(Method("speca", {"acceptance": "lookback", "speed": speed, "tolerance": "absolute (before)"},
                           main_node(speed=speed, options={"threshold": absolute})))
    grid.append(Method("speca", {"mode": "probe", "speed": 0.5}, main_node(mode="probe")))
    for target in (2.0, 3.0, 4.0, 5.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", speed=(target - 1.0) / 4.0)))
    for target in (6.0, 8.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target})))
    for target in (4.0, 6.0, 8.0):
        grid.append(Method("spectrum", {"schedule": "planned", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target,
                                                                   "forecaster": "spectrum"})))
    for target in (4.0, 6.0, 8.0):
        grid.append(learned_row(target))
    for n in (2, 3, 4, 6):
        grid.append(taylorseer_row(n))
        grid.append(Method("spectrum", {"schedule": "interval", "interval": n},
                           ours(preset="custom", method="spectrum", max_forecast_steps=n - 1,
                                warmup_steps=3, final_full_steps=0)))
    grid += peer_rows(plan)
    return grid


def cost_grid(plan=None) -> list[Method]:
    """What a forecast step costs in wall clock: the defaults and the 4x and 6x targets, to time with
    more pairs (``--timing-samples 8``) and hold against 1/compute."""
    grid = [Method("none", {}, lambda m: m), Method("speca", {"defaults": True}, main_node())]
    for target in (4.0, 6.0):
        grid.append(Method("speca", {"mode": "speed_target", "target_speedup": target},
                           main_node(mode="speed_target", options={"target_speedup": target})))
    return grid


GRIDS = {"focus": focus_grid, "tokens": tokens_grid, "beyond": beyond_grid, "spectrum": spectrum_grid,
         "few_steps": few_steps_grid, "slider": slider_grid, "held_out": held_out_grid,
         "cost": cost_grid}


def reproduce(path: Path, grid_name: str, model: str, only=(), log=print) -> int:
    """Rerun the rows of a committed results file that the grid still has (compute fraction and
    PSNR; no timing) and compare: the check that a change kept behaviour. Returns how many rows
    moved by more than 1e-4 in compute or 0.01 dB in PSNR."""
    committed = json.loads(Path(path).read_text())
    workload = reference_workload(committed["samples"], committed["steps"], committed["cfg"], model)
    plan = block_plan(workload.model)
    grid = GRIDS[grid_name](plan) if grid_name != "full" else method_grid(False, plan)
    rows = {(r["method"], json.dumps(r["settings"], sort_keys=True)): r for r in committed["rows"]}
    probe = Probe(workload)
    base, images_ref = run_method(workload, grid[0], probe)
    moved = checked = 0
    for method in grid[1:]:
        key = (method.method, json.dumps(method.settings, sort_keys=True))
        if key not in rows or (only and not any(o in f"{key[0]} {key[1]}" for o in only)):
            continue
        row, _ = run_method(workload, method, probe, images_ref)
        compute, was = row["macs"] / base["macs"], rows[key]
        same = abs(compute - was["compute_fraction"]) <= 1e-4 and abs(row["psnr_db"] - was["psnr_db"]) <= 0.01
        moved += not same
        checked += 1
        log(f"{'same ' if same else 'MOVED'} {key[0]:>10} {key[1]:<70} compute {was['compute_fraction']:.4f} -> "
            f"{compute:.4f}  PSNR {was['psnr_db']:.3f} -> {row['psnr_db']:.3f} dB")
    log(f"{checked} rows of {path} rerun, {moved} moved")
    return moved


# ---- reports ---------------------------------------------------------------------------
def pareto(rows):
    """Rows not dominated in (compute_fraction lower, psnr higher)."""
    out = []
    for r in rows:
        dominated = any(o is not r and o["compute_fraction"] <= r["compute_fraction"] and o["psnr_db"] >= r["psnr_db"]
                        and (o["compute_fraction"] < r["compute_fraction"] or o["psnr_db"] > r["psnr_db"])
                        for o in rows)
        if not dominated:
            out.append(r)
    return out


def markdown(result) -> str:
    lines = [f"Model `{result['model']}`, {result['samples']} samples, {result['steps']} steps, "
             f"{result['sampler']}/{result['scheduler']}, cfg {result['cfg']}.", "",
             "| method | settings | compute fraction | at FLUX depth* | speedup (wall) | PSNR dB | SSIM | cache MiB | verify fraction |",
             "|---|---|---|---|---|---|---|---|---|"]
    front = {id(r) for r in pareto(result["rows"])}
    for r in sorted(result["rows"], key=lambda r: (r["method"], -r["compute_fraction"])):
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "note") or "-"
        if r["settings"].get("defaults"):
            s = "**the node as dropped into a graph (every input at its default)**"
        mark = " **(Pareto)**" if id(r) in front and r["method"] != "none" else ""
        lines.append(f"| {r['method']}{mark} | {s} | {r['compute_fraction']:.3f} | "
                     f"{r['compute_fraction_at_flux_depth']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['cache_bytes'] / 2**20:.2f} | {r['verify_fraction']:.4f} |")
    lines += ["", "*compute fraction if each verification probe cost one of FLUX.1's 57 blocks instead of one "
              "of this model's blocks (a projection; equal to the measured value for methods without probes). "
              "Pareto: no other row has both less compute and a higher PSNR."]
    return "\n".join(lines) + "\n"


def plot(result, path: Path):
    """Speedup against PSNR: every row as a dot, each method's own Pareto front as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    methods = sorted({r["method"] for r in result["rows"] if r["method"] != "none"})
    for m in methods:
        rows = [r for r in result["rows"] if r["method"] == m]
        front = sorted((r["speedup"], min(r["psnr_db"], 60)) for r in pareto(rows))
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", label=m,
                        linewidth=2.5 if m == "speca" else 1.2)
        ax.scatter([r["speedup"] for r in rows], [min(r["psnr_db"], 60) for r in rows], s=12,
                   color=line.get_color(), alpha=0.35)
    ax.set_xlabel("wall-clock speedup vs uncached (x)")
    ax.set_ylabel("PSNR vs uncached output (dB, capped at 60)")
    ax.set_title(f"{result['model']}: {result['samples']} samples, {result['steps']} steps "
                 "(lines: each method's best settings)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Speculative Cache benchmark")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 samples, few settings")
    ap.add_argument("--recipe", help="JSON recipe for another ComfyUI model (see recipe_workload)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="output name (default: the model's or the recipe's name)")
    ap.add_argument("--model", default="reference", help="reference (6 blocks), reference_deep (19 blocks) or "
                    "reference_wan (the held-out Wan model)")
    ap.add_argument("--grid", choices=["full", *GRIDS], default="full",
                    help="focus: the defaults row, both acceptance metrics, TaylorSeer and the peers; "
                         "tokens: SpecDiff's token tiers against SpeCa, ClusCa and TaylorSeer; "
                         "beyond: speed targets above 5x against TaylorSeer; spectrum: Spectrum at a fixed "
                         "interval and at the node's planned schedules against the node; few_steps: for --steps 4 to 8; "
                         "slider: auto along the speed slider; held_out: the slider, targets and every peer; "
                         "cost: the defaults, 4x and 6x, for timing")
    ap.add_argument("--reproduce", metavar="RESULTS_JSON",
                    help="rerun the rows of a committed results file (with --grid and --model as it was made; "
                         "no timing) and say which moved")
    ap.add_argument("--only", nargs="*", default=(), help="with --reproduce: rows whose method or settings "
                                                           "contain one of these strings")
    ap.add_argument("--timing-samples", type=int, default=3)
    ap.add_argument("--timing-repeats", type=int, default=3)
    args = ap.parse_args(argv)

    if comfy_env.find_comfyui() is None:
        print("ComfyUI not found: set COMFYUI_PATH (see README).")
        return 1
    comfy_env.setup_comfyui()
    torch.manual_seed(0)
    if args.reproduce:
        return int(reproduce(Path(args.reproduce), args.grid, args.model, args.only) > 0)
    if args.recipe:
        workload = recipe_workload(Path(args.recipe))
    else:
        n = 4 if args.quick else args.samples
        workload = reference_workload(n, args.steps, args.cfg, args.model)
    name = args.out or (workload.name if args.recipe else (f"{args.model}_quick" if args.quick else args.model))
    print(f"benchmark {name}: {len(workload.samples)} samples, {workload.steps} steps, cfg {workload.cfg}, "
          f"ComfyUI {comfy_env.comfyui_version(comfy_env.find_comfyui())}")
    plan = block_plan(workload.model)
    grid = GRIDS[args.grid](plan) if args.grid != "full" else None
    result = benchmark(workload, args.quick, plan, timing_samples=args.timing_samples,
                       timing_repeats=args.timing_repeats, grid=grid)
    result["comfyui"] = comfy_env.comfyui_version(comfy_env.find_comfyui())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
