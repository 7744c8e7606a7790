"""Per-architecture knowledge: where the block stack is, which tensors a block
carries, and how to find an argument of the model's forward.

Adapters hold no tensors; they describe. The generic output-level adapter serves every
model without a specific one, so an unknown model never crashes the sampler."""

from __future__ import annotations

import inspect
import logging
import math

from ..cache_core import StackPlan
from .families import block_plan, family_of

log = logging.getLogger("speculative_cache")

_warned: set = set()


def warn_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per process (at ``level``)."""
    if message not in _warned:
        _warned.add(message)
        log.log(level, message)


class StackAdapter:
    """Models whose forward calls ``patches_replace["dit"]`` for each block (the families in
    ``families.FAMILIES``). Block patches only ever receive and return the tensors the
    family's contract names, so the same code serves all of them."""

    mode = "stack"

    def __init__(self, family: str, plan: StackPlan, contract=None):
        self.family = family
        self.plan = plan
        self.contract = contract

    @property
    def apply_model_level(self) -> bool:
        return bool(self.contract and self.contract.apply_model_level)


class OutputAdapter:
    """Any other model: forecast the diffusion model's output as a whole."""

    mode = "output"
    family = "generic"
    plan = None
    contract = None
    apply_model_level = False


def stack_plan_for(diffusion_model) -> tuple[str, StackPlan] | None:
    adapter = _stack_adapter(diffusion_model)
    return None if adapter is None else (adapter.family, adapter.plan)


def _stack_adapter(diffusion_model) -> StackAdapter | None:
    fam = family_of(diffusion_model)
    blocks = block_plan(diffusion_model, fam) if fam is not None else []
    return StackAdapter(fam.name, StackPlan(blocks), fam) if blocks else None


def select_adapter(diffusion_model):
    adapter = _stack_adapter(diffusion_model)
    if adapter is not None:
        return adapter
    warn_once(f"Speculative Cache: no block-level support for {type(diffusion_model).__name__}; "
              "forecasting the model output as a whole instead (no per-step verification: "
              "forecasts are bounded by max_forecast_steps).")
    return OutputAdapter()


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


WARN_CACHE_BYTES = 4 * 2**30   # warn above this estimate (or above 30 % of free GPU memory)


def estimate_cache_bytes(adapter, diffusion_model, config, latent_shape, txt_tokens: int, streams: int,
                         element_size: int) -> int | None:
    """Cache memory a run will need, from the model's size and the latent's resolution:
    tokens x hidden size x stored tensors x history points x streams x bytes."""
    if not isinstance(adapter, StackAdapter):
        return None
    hidden = getattr(getattr(diffusion_model, "params", None), "hidden_size", None)
    for name in ("hidden_size", "dim", "inner_dim", "model_dim"):   # FLUX-likes, Wan, Qwen/LTXV, ...
        if not hidden:
            hidden = getattr(diffusion_model, name, None)
    hidden = hidden if isinstance(hidden, int) else None
    patch = getattr(diffusion_model, "patch_size", 2)
    patch = list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
    spatial = list(latent_shape[2:])
    if hidden is None or not spatial:
        return None
    img_tokens = 1
    for size, p in zip(spatial[::-1], patch[::-1]):
        img_tokens *= -(-size // p)
    for size in spatial[:len(spatial) - len(patch)]:
        img_tokens *= size
    batch = latent_shape[0]
    tokens = img_tokens + txt_tokens
    if config.block_level:
        tensors = sum(2 if k[0] == "double_block" else 1 for k in adapter.plan.keys) * tokens
    else:
        tensors = sum(tokens for _ in adapter.plan.stages)
    points = 4 if config.draft == "foca" else config.order + 1 + int(config.fitted_curvature and config.order == 1)
    if config.method == "reuse":
        points = 1
    if config.storage_dtype:
        element_size = {"float32": 4, "bfloat16": 2, "float16": 2}[config.storage_dtype]
    elements = tensors * hidden
    if config.looks_back:
        elements = math.prod(latent_shape[1:])        # only the model output is forecast
    elif config.serve_output:
        elements += math.prod(latent_shape[1:])       # the served output forecast: one latent
    return int(elements * points * streams * batch * element_size)


def cache_memory_warning(estimate: int | None, config, device=None) -> str | None:
    if estimate is None:
        return None
    limit = WARN_CACHE_BYTES
    try:
        import comfy.model_management as mm
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            limit = min(limit, int(0.3 * mm.get_free_memory(device)))
    except Exception:
        pass
    if estimate <= limit:
        return None
    how = ("granularity=stack, " if config.block_level else "") + "a lower order, or storage_dtype=bfloat16"
    return (f"Speculative Cache: this run will keep about {estimate / 2**30:.1f} GiB of forecast history "
            f"({'block' if config.block_level else 'stack'} granularity, {config.draft} order {config.order}) "
            f"for this model and resolution. Use {how} to reduce it.")


class ChainedBlockPatch:
    """Base of a ``patches_replace["dit"]`` entry that chains to the patch that was there
    before it (SkipLayerGuidance, other packs, another node of this pack) or, with none, to
    the model's own block. Subclasses decide in ``__call__`` when to act."""

    def __init__(self, key, previous=None):
        self.key = tuple(key)
        self.previous = previous

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)
