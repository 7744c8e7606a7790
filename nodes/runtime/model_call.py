"""Reading the arguments of a ComfyUI model forward, whichever model it is."""

from __future__ import annotations

import inspect


def find_transformer_options(args, kwargs) -> dict | None:
    """Where ComfyUI's model forwards put ``transformer_options``: the last positional
    argument (Flux, HunyuanVideo, Wan, ...), ``kwargs`` (Lumina2, Cosmos) or the one
    before last (LTXV)."""
    if args and isinstance(args[-1], dict):
        return args[-1]
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    if len(args) >= 2 and isinstance(args[-2], dict):
        return args[-2]
    return None


_signatures: dict = {}


def forward_argument(module, name: str, args, kwargs):
    """The value a forward call passes for parameter ``name`` (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    cls = type(module)
    sig = _signatures.get(cls)
    if sig is None:
        try:
            sig = inspect.signature(cls.forward)
        except (TypeError, ValueError):
            return None
        _signatures[cls] = sig
    params = [p for p in sig.parameters.values() if p.name != "self"]
    for i, p in enumerate(params):
        if p.name == name:
            if i < len(args) and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                return args[i]
            return None
    return None


def sampling_sigma(timestep) -> float:
    """The sigma of a model call (the largest of the batch's timesteps)."""
    import torch
    return float(torch.as_tensor(timestep).max())


def sampler_sigmas(args, kwargs):
    """The sigmas an OUTER_SAMPLE call samples (``CFGGuider.outer_sample(noise, latent_image,
    sampler, sigmas, ...)``), passed by position or by name."""
    if len(args) > 3:
        return args[3]
    if "sigmas" in kwargs:
        return kwargs["sigmas"]
    raise ValueError("the sampling call passed no sigmas")
