"""Which weights the model runs with on this call.

ComfyUI's hooks (Create Hook LoRA + hook keyframes on the conditioning) patch the model's
weights per conditioning and change their strength at keyframes during sampling. A
forecast from features computed with other weights extrapolates a different model, so
the cache keys each stream's history by the weights it was computed with and starts the
stream over when they change."""

from __future__ import annotations


def weights_key(base_model):
    """A hashable summary of the hooks applied to ``base_model`` right now: each hook and
    its current keyframe strength. None when no hooks are applied (plain weights)."""
    patcher = getattr(base_model, "current_patcher", None)
    hooks = getattr(patcher, "current_hooks", None)
    if hooks is None:
        return None
    return tuple((id(getattr(h, "hook_ref", h)), round(float(getattr(h, "strength", 1.0)), 6))
                 for h in getattr(hooks, "hooks", ()))
