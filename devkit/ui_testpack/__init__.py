"""Test-only ComfyUI node pack: tiny models (ComfyUI's own classes, random weights), their
conditioning, an inpainting conditioning and a latent sink, so a real ComfyUI server can run a
Speculative Cache graph, or a shipped workflow with its model files swapped for tiny models
(``devkit.comfy_server.with_tiny_models``), without model files. Loaded by the server tests,
never shipped to users."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # appended: ComfyUI's own `nodes` module must win

_models = {}


class SCTestTinyFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing/speculative_cache"

    def build(self, seed):
        from devkit import tiny_models
        if seed not in _models:
            _models[seed] = tiny_models.build("flux", seed=seed)
        return (_models[seed],)


class SCTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "make"
    CATEGORY = "testing/speculative_cache"

    def make(self, seed):
        from devkit import tiny_models
        return tiny_models.conditioning("flux", seed=seed)


class SCTestTinyModel:
    """A tiny model of one family (a devkit.tiny_models name), in place of a loader."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {"default": "flux"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing/speculative_cache"

    def build(self, family, seed):
        from devkit import tiny_models
        key = (family, seed)
        if key not in _models:
            _models[key] = tiny_models.build(family, seed=seed)
        return (_models[key],)


class SCTestTextConditioning:
    """One conditioning of a family's tiny shapes, in place of a text encoder."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ("STRING", {"default": "flux"}),
                             "seed": ("INT", {"default": 1, "min": 0, "max": 100000}),
                             "negative": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/speculative_cache"

    def make(self, family, seed, negative):
        from devkit import tiny_models
        positive, neg = tiny_models.conditioning(family, seed=seed)
        return (neg if negative else positive,)


class SCTestInpaintConditioning:
    """What ComfyUI's InpaintModelConditioning gives a FLUX Fill model (the masked image's latent
    and the mask on the conditioning, the mask on the latent), without a VAE: a square hole in
    the middle of a random image latent."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "width": ("INT", {"default": 128}), "height": ("INT", {"default": 128})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "make"
    CATEGORY = "testing/speculative_cache"

    def make(self, positive, negative, width, height):
        import torch
        import node_helpers
        g = torch.Generator().manual_seed(7)
        image_latent = torch.randn(1, 16, height // 8, width // 8, generator=g)
        mask = torch.zeros(1, 1, height, width)
        mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
        values = {"concat_latent_image": image_latent * (1 - torch.nn.functional.interpolate(
            mask, size=image_latent.shape[-2:])), "concat_mask": mask}
        out = [node_helpers.conditioning_set_values(c, values) for c in (positive, negative)]
        return (out[0], out[1], {"samples": torch.zeros_like(image_latent), "noise_mask": mask})


class SCTestLatentSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "sink"
    OUTPUT_NODE = True
    CATEGORY = "testing/speculative_cache"

    def sink(self, samples):
        import hashlib
        s = samples["samples"]
        digest = hashlib.sha1(s.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"ui": {"text": [f"{tuple(s.shape)} finite={bool(s.isfinite().all())} digest={digest}"]}}


class SCTestFailOnce:
    """Test only: makes the pack's own code raise once, at one hook point, in the runs after it
    (``where``: "module:Owner.attr" inside the pack, e.g. "cache_core.run:Chunk.predict"; the
    ``on_call``-th call raises, then the original is back). The model passes through."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "where": ("STRING", {"default": "cache_core.run:Chunk.predict"}),
                             "on_call": ("INT", {"default": 1, "min": 1, "max": 10000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "arm"
    CATEGORY = "testing/speculative_cache"

    def arm(self, model, where, on_call):
        module_name, _, attr_path = where.partition(":")
        module = _pack_module(module_name)
        owner_name, _, attr = attr_path.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr)
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == on_call:
                setattr(owner, attr, original)
                raise RuntimeError(f"injected failure in {attr_path} (test)")
            return original(*args, **kwargs)
        setattr(owner, attr, failing)
        return (model,)


NODE_CLASS_MAPPINGS = {"SCTestTinyFlux": SCTestTinyFlux, "SCTestConditioning": SCTestConditioning,
                       "SCTestLatentSink": SCTestLatentSink, "SCTestTinyModel": SCTestTinyModel,
                       "SCTestTextConditioning": SCTestTextConditioning,
                       "SCTestInpaintConditioning": SCTestInpaintConditioning, "SCTestFailOnce": SCTestFailOnce}


def _pack_module(name: str):
    """The pack's module ``name`` as the server loaded it (ComfyUI names a custom-node package
    after its path: ".../custom_nodes/speculative-cache")."""
    from devkit.comfy_server import PACK_DIR_NAME
    return next(m for key, m in list(sys.modules.items()) if key.endswith(f"{PACK_DIR_NAME}.{name}") and m is not None)


# The pack's run objects: a run of any node, its model calls, and through them every cache it keeps
RUN_CLASSES = {"RunContext", "SpeculativeRun", "EditRun", "PruningRun", "EditCall", "BlockCall", "BlockwiseCall"}


def _memory() -> dict:
    """What the server process holds: the pack's run objects still alive (any, after a prompt,
    is a leak), the open step-cache runs, the bytes of every cache the pack keeps (step-cache
    streams, Edit Region context and residuals, Token Pruning caches), all torch tensors, and
    the resident memory."""
    import gc
    import os
    import warnings

    import torch
    from devkit.comfy_server import PACK_DIR_NAME
    gc.collect()
    runs_alive = streams = tensors = open_runs = cache_bytes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            kind = type(o)
            if kind.__name__ in RUN_CLASSES and PACK_DIR_NAME in kind.__module__:
                runs_alive += 1
                open_runs += kind.__name__ == "SpeculativeRun" and not o.closed
                if kind.__name__ == "EditRun":      # kept keys and values, served residuals
                    cache_bytes += sum(t.numel() * t.element_size() for blocks in o.context.values()
                                       for kept in blocks.values() for _, *kv in kept for t in kv)
                    cache_bytes += sum(t.numel() * t.element_size() for blocks in o.residuals.values()
                                       for t in blocks.values())
                elif kind.__name__ == "PruningRun":
                    cache_bytes += int(o.stats.cache_bytes)
            elif kind.__name__ == "StreamCache":
                streams += 1
                cache_bytes += o.nbytes()
            elif isinstance(o, torch.Tensor):
                tensors += 1
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"runs_alive": runs_alive, "open_runs": open_runs, "streams": streams, "cache_bytes": cache_bytes,
            "tensors": tensors, "rss": rss}


_finals: dict = {}


def _finals_of_the_other_nodes() -> dict:
    """Final stats of every Edit Region and Token Pruning run since the first call (they send
    no UI event: the soak reads them here)."""
    if not _finals:
        for key, module, feature in (("edit", "nodes.edit_region.region", "EDIT"),
                                     ("pruning", "nodes.token_pruning.pruning", "PRUNING")):
            _finals[key] = []
            getattr(_pack_module(module), feature).listeners.append(
                lambda node_id, stats, final, key=key: final and _finals[key].append(dict(stats)))
    return _finals


try:  # routes for the soak test (benchmarks/soak.py): memory held after many prompts, final stats
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/sc_test/memory")
    async def _memory_route(request):
        return web.json_response(_memory())

    @PromptServer.instance.routes.get("/sc_test/finals")
    async def _finals_route(request):
        return web.json_response(_finals_of_the_other_nodes())
except Exception:  # not inside a ComfyUI server
    pass
