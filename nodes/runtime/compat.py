"""Every ComfyUI name this pack relies on, in one list, checked against the running ComfyUI.

When a future ComfyUI renames or moves one of them, ``missing()`` names it: the test suite
fails on it by name, and the node logs it once at load instead of failing deep inside a
sampler. Positional parameters are listed where a wrapper reads its arguments by position."""

from __future__ import annotations

import importlib
import inspect
import logging

log = logging.getLogger("speculative_cache")

# (module, attribute path) that must exist.
NAMES = [
    ("comfy.patcher_extension", "WrappersMP.OUTER_SAMPLE"),
    ("comfy.patcher_extension", "WrappersMP.SAMPLER_SAMPLE"),
    ("comfy.patcher_extension", "WrappersMP.CALC_COND_BATCH"),
    ("comfy.patcher_extension", "WrappersMP.DIFFUSION_MODEL"),
    ("comfy.patcher_extension", "WrappersMP.APPLY_MODEL"),
    ("comfy.model_patcher", "create_model_options_clone"),
    ("comfy.model_patcher", "ModelPatcher.clone"),
    ("comfy.model_patcher", "ModelPatcher.add_wrapper_with_key"),
    ("comfy.model_patcher", "ModelPatcher.remove_wrappers_with_key"),
    ("comfy.model_patcher", "ModelPatcher.set_model_patch_replace"),
    ("comfy.model_patcher", "ModelPatcher.get_model_object"),
    ("comfy.model_patcher", "ModelPatcher.model_dtype"),
    ("comfy.model_management", "InterruptProcessingException"),
    ("comfy.model_management", "get_free_memory"),
    ("comfy.ldm.flux.layers", "apply_mod"),
    ("comfy.ldm.flux.layers", "DoubleStreamBlock"),
    ("comfy.ldm.flux.layers", "SingleStreamBlock"),
    ("comfy.ldm.flux.model", "Flux"),
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo"),
    ("comfy.ldm.chroma.model", "Chroma"),
    ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"),
    ("comfy.model_sampling", "CONST"),
    ("comfy_api.latest", "ComfyExtension"),
    ("comfy_api.latest", "io.ComfyNode"),
    ("comfy_api.latest", "io.Schema"),
    ("comfy_api.latest", "io.NodeOutput"),
    ("comfy_api.latest", "io.Float.Input"),
    ("comfy_api.latest", "io.Int.Input"),
    ("comfy_api.latest", "io.Combo.Input"),
    ("comfy_api.latest", "io.Model.Input"),
    ("comfy_api.latest", "io.Model.Output"),
    ("comfy_api.latest", "io.Hidden.unique_id"),
    ("comfy_api.latest", "io.NumberDisplay.slider"),
]

# (module, callable path, [(position, parameter name), ...]) the wrappers read by position;
# position counts after ``self``.
SIGNATURES = [
    ("comfy.samplers", "CFGGuider.outer_sample", [(0, "noise"), (3, "sigmas")]),
    ("comfy.samplers", "KSAMPLER.sample", [(2, "extra_args"), (3, "callback")]),
    ("comfy.samplers", "calc_cond_batch", [(3, "timestep"), (4, "model_options")]),
    ("comfy.ldm.flux.layers", "DoubleStreamBlock.forward", [(2, "vec")]),
    ("comfy.ldm.flux.layers", "SingleStreamBlock.forward", [(1, "vec")]),
]

# (module, object path, text) that must appear in the object's source: the block patch
# keys the model forwards look up.
SOURCE = [
    ("comfy.ldm.flux.model", "Flux.forward_orig", '("double_block", i)'),
    ("comfy.ldm.flux.model", "Flux.forward_orig", '("single_block", i)'),
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo.forward_orig", '("double_block", i)'),
    ("comfy.ldm.chroma.model", "Chroma.forward_orig", '("double_block", i)'),
]


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing() -> list[str]:
    """Descriptions of every contract item the running ComfyUI does not meet."""
    out = []
    for module, path in NAMES:
        try:
            _resolve(module, path)
        except Exception as e:  # ImportError, AttributeError
            out.append(f"{module}.{path} ({type(e).__name__})")
    for module, path, params in SIGNATURES:
        try:
            names = [p for p in inspect.signature(_resolve(module, path)).parameters if p != "self"]
        except Exception as e:
            out.append(f"{module}.{path} ({type(e).__name__})")
            continue
        for pos, name in params:
            if pos >= len(names) or names[pos] != name:
                out.append(f"{module}.{path}: parameter {pos} is no longer {name!r} ({names})")
    for module, path, text in SOURCE:
        try:
            source = inspect.getsource(_resolve(module, path))
        except Exception as e:
            out.append(f"{module}.{path} ({type(e).__name__})")
            continue
        if text not in source:
            out.append(f"{module}.{path} no longer calls block patches {text}")
    return out


_checked = False


def warn_if_incompatible() -> None:
    """Log, once per process, what the running ComfyUI lacks."""
    global _checked
    if _checked:
        return
    _checked = True
    gone = missing()
    if gone:
        log.warning("Speculative Cache: this ComfyUI lacks names the pack uses; affected runs fall back to "
                    "sampling without the cache. Missing: %s", "; ".join(gone))
