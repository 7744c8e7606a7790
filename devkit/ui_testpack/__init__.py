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
        from devkit.comfy_server import PACK_DIR_NAME
        module_name, _, attr_path = where.partition(":")
        # (ComfyUI names a custom-node package after its path: ".../custom_nodes/speculative-cache")
        module = next(m for name, m in list(sys.modules.items())
                      if name.endswith(f"{PACK_DIR_NAME}.{module_name}") and m is not None)
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


def _memory() -> dict:
    """What the server process holds: open Speculative Cache runs, the bytes of every stream
    cache still alive, all torch tensors, and the resident memory."""
    import gc
    import os
    import warnings

    import torch
    gc.collect()
    runs = streams = tensors = 0
    open_runs, cache_bytes = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            name = type(o).__name__
            if name == "SpeculativeRun":
                runs += 1
                open_runs += not o.closed
            elif name == "StreamCache":
                streams += 1
                cache_bytes += o.nbytes()
            elif isinstance(o, torch.Tensor):
                tensors += 1
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"runs": runs, "open_runs": open_runs, "streams": streams, "cache_bytes": cache_bytes,
            "tensors": tensors, "rss": rss}


try:  # a route for the soak test (benchmarks/soak.py): memory held after many prompts
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/sc_test/memory")
    async def _memory_route(request):
        return web.json_response(_memory())
except Exception:  # not inside a ComfyUI server
    pass
