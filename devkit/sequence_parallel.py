"""Sequence parallelism for ComfyUI's Flux class on the CPU, the way USP splits a sequence (for
the tests; raylight and xDiT do this on GPUs): every rank holds a contiguous share of the image
tokens and of the text tokens from the input projections on, so that each token is on exactly
one rank; each attention gathers the other ranks' keys and values (the queries stay local; the
order of the keys does not change attention); the last layer's output is gathered back into the
whole image, so every rank's sampler sees the whole latent.

    python devkit/sequence_parallel.py RANK WORLD PORT OUT.pt

runs the cases below on ComfyUI's real sampler (tiny FLUX, gloo on the loopback; WORLD 1: one
process, no torch.distributed) and saves each case's latent and decision timeline."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

STEPS = 12
# The node's inputs per case (options: a Speculative Cache Options node's inputs).
CASES = {
    "speed 0": dict(speed=0.0),
    "auto": dict(),
    "probe": dict(mode="probe", options=dict(threshold=5.0)),
    "probe, rejecting": dict(mode="probe", options=dict(threshold=0.35)),
    # between the two ranks' own errors at the first verified step (0.357 and 0.368 on the tiny
    # model; the whole image's: 0.361): ranks deciding from their shards would part there
    "probe, between the shards": dict(mode="probe", options=dict(threshold=0.364)),
    "block granularity": dict(mode="probe", options=dict(threshold=5.0, granularity="block")),
    "planned 4x": dict(mode="speed_target", options=dict(target_speedup=4.0)),
    "adaptive target": dict(mode="speed_target", speed=0.4),
}


def _gather_tokens(t: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


class FluxSequenceShards:
    """Splits one Flux diffusion model's image tokens between the ranks of the default group."""

    seen: list = []     # (queries, keys) of each attention: the test checks the split happened

    def __init__(self, diffusion_model, rank: int, world: int):
        self.rank, self.world = rank, world
        self.local = {}             # tokens on this rank: {"img": n, "txt": n}
        dm = diffusion_model
        img_in, txt_in = dm.img_in.forward, dm.txt_in.forward
        pe_embedder, final_layer = dm.pe_embedder.forward, dm.final_layer.forward

        def share(tokens, name):
            n = tokens.shape[1]
            if n % world:
                raise ValueError(f"{n} {name} tokens do not split between {world} ranks")
            self.local[name] = n // world
            return tokens[:, rank * (n // world):(rank + 1) * (n // world)]

        def shard_ids(ids, *a, **k):        # ids: text's, then the image's
            n_txt = ids.shape[1] - self.local["img"] * world
            return pe_embedder(torch.cat((share(ids[:, :n_txt], "txt"), share(ids[:, n_txt:], "img")), dim=1), *a, **k)

        dm.img_in.forward = lambda img, *a, **k: img_in(share(img, "img"), *a, **k)
        dm.txt_in.forward = lambda txt, *a, **k: txt_in(share(txt, "txt"), *a, **k)
        dm.pe_embedder.forward = shard_ids
        dm.final_layer.forward = lambda x, *a, **k: _gather_tokens(final_layer(x, *a, **k), dim=1)

    def attention(self, func, q, k, v, *args, **kwargs):
        """``optimized_attention_override``: the keys and values of every rank's tokens."""
        k, v = _gather_tokens(k, dim=2), _gather_tokens(v, dim=2)
        self.seen.append((q.shape[2], k.shape[2]))     # (local queries, all keys)
        return func(q, k, v, *args, **kwargs)


def sharded(patcher, rank: int, world: int):
    """A clone of ``patcher`` whose model runs on this rank's share of the image tokens."""
    patched = patcher.clone()
    if world > 1:
        shards = FluxSequenceShards(patched.model.diffusion_model, rank, world)
        # (a function, not the bound method: ComfyUI deep-copies model options, and a bound
        # method's copy would be of a copy of ``shards``)
        patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
            lambda func, *a, **k: shards.attention(func, *a, **k)
    return patched


def inpaint(patcher):
    """The tiny FLUX's sampling with a noise mask (the middle of the latent regenerated)."""
    import comfy.sample
    from devkit import tiny_models as tm
    latent = tm.latent("flux", 1, 2, None)              # 32 x 32: 256 image tokens
    mask = torch.zeros(1, 1, *latent.shape[-2:])
    mask[..., 12:20, 12:20] = 1
    positive, negative = tm.conditioning("flux")
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(patcher, noise, STEPS, 2.0, "euler", "simple", positive, negative, latent,
                               noise_mask=mask, disable_pbar=True, seed=42)


def run(rank: int, world: int, port: int, out: Path) -> None:
    from devkit import comfy_env
    from devkit import tiny_models as tm
    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comfy_env.setup_comfyui(comfy_env.find_comfyui())
    nodes = comfy_env.pack_nodes()
    agreement = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.agreement")
    hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    if world > 1:
        import torch.distributed as dist
        agreement.use_sequence_group(dist.group.WORLD)      # every rank holds a share of the one image
    seen, attention_calls, shard_errors = [], [], []
    FluxSequenceShards.seen = attention_calls
    verifier = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.verifier")
    sum_shards = agreement.RankAgreement.sum_shards

    def recording(self, sums):      # (this rank's own error, the whole image's)
        whole = sum_shards(self, sums)
        metric = "relative_change" if len(sums) == 3 else "relative_norm"
        shard_errors.append((verifier.metric_from_sums(metric, sums), verifier.metric_from_sums(metric, whole)))
        return whole
    agreement.RankAgreement.sum_shards = recording
    hooks.STEP_CACHE.listeners.append(lambda node_id, stats, final: final and seen.append(stats))
    results = {}
    for name, inputs in CASES.items():
        inputs = dict(inputs)
        if "options" in inputs:
            inputs["options"] = nodes.SpeculativeCacheOptions.execute(**inputs["options"]).result[0]
        model = sharded(tm.build("flux", seed=3), rank, world)
        patched = nodes.SpeculativeCacheSimple.execute(model, **inputs).result[0]
        attention_calls.clear()
        shard_errors.clear()
        latent = tm.sample(patched, "flux", steps=STEPS)
        stats = seen[-1]
        results[name] = dict(latent=latent, timeline=stats["timeline"], mode=stats["mode"],
                             attention_keys=sorted(set(attention_calls)), shard_errors=list(shard_errors),
                             compute_fraction=stats["compute_fraction"], errors=[e[2] for e in stats["errors"]],
                             internal_error=stats["internal_error"])
    results["plain"] = dict(latent=tm.sample(sharded(tm.build("flux", seed=3), rank, world), "flux", steps=STEPS))
    # The Edit Region on an inpainting run: its region is laid out on the whole image's tokens
    edit = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.edit_region.region")
    edit_seen = []
    edit.EDIT.listeners.append(lambda node_id, stats, final: final and edit_seen.append(stats))
    model = sharded(tm.build("flux", seed=3), rank, world)
    region = nodes.SpeculativeCacheEditRegion.execute(model).result[0]
    results["edit region"] = dict(latent=inpaint(region), disabled=edit_seen[-1]["disabled"] if edit_seen else None,
                                  partial_calls=edit_seen[-1]["partial_calls"] if edit_seen else None)
    results["inpaint, plain"] = dict(latent=inpaint(model))
    torch.save(results, out)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.append(str(Path(__file__).resolve().parent.parent))  # appended: ComfyUI's `nodes` wins over ours
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
