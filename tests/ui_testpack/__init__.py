"""Test-only ComfyUI node pack: a tiny FLUX model (ComfyUI's own class, random weights),
its conditioning and a latent sink, so a real ComfyUI server can run a Speculative Cache
graph without model files. Loaded by the server tests, never shipped to users."""

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
        from benchmarks import tiny_models
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
        from benchmarks import tiny_models
        return tiny_models.conditioning("flux", seed=seed)


class SCTestLatentSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "sink"
    OUTPUT_NODE = True
    CATEGORY = "testing/speculative_cache"

    def sink(self, samples):
        s = samples["samples"]
        return {"ui": {"text": [f"{tuple(s.shape)} finite={bool(s.isfinite().all())}"]}}


NODE_CLASS_MAPPINGS = {"SCTestTinyFlux": SCTestTinyFlux, "SCTestConditioning": SCTestConditioning,
                       "SCTestLatentSink": SCTestLatentSink}
