"""Per-model knowledge for the step cache, read from the family registry
(``cache_core/families.py``): at which level a model is forecast, and where its blocks are.

Adapters hold no tensors; they describe. A model of no block-level family gets the output-level
adapter, so an unknown model never crashes the sampler."""

from __future__ import annotations

from ...cache_core import StackPlan
from ...cache_core.families import GENERIC, Family, block_plan, family_of
from ..runtime.log import warn_once


class StackAdapter:
    """Models whose forward calls ``patches_replace["dit"]`` for each block (the block-level
    families of the registry). Block patches only ever receive and return the tensors the
    family's contract names, so the same code serves all of them."""

    mode = "stack"

    def __init__(self, contract: Family, plan: StackPlan):
        self.contract = contract
        self.family = contract.name
        self.plan = plan

    @property
    def apply_model_level(self) -> bool:
        return self.contract.apply_model_level


class OutputAdapter:
    """Any other model: forecast the diffusion model's output as a whole."""

    mode = "output"
    plan = None
    contract = None
    apply_model_level = False

    def __init__(self, entry: Family = GENERIC):
        self.entry = entry              # the registry's output-level entry (GENERIC for unknown models)
        self.family = entry.name


def adapter_for(diffusion_model, warn: bool = True):
    """The step cache's adapter for ``diffusion_model``."""
    fam = family_of(diffusion_model)
    blocks = block_plan(diffusion_model, fam) if fam.block_level else []
    if blocks:
        return StackAdapter(fam, StackPlan(blocks))
    if warn:
        warn_once(f"Speculative Cache: no block-level support for {type(diffusion_model).__name__}; "
                  "forecasting the model output as a whole instead (no per-step verification: "
                  "forecasts are bounded by max_forecast_steps).")
    return OutputAdapter(GENERIC if fam.block_level else fam)


def select_adapter(diffusion_model):
    return adapter_for(diffusion_model)


def tuned_family(adapter) -> Family:
    """The registry entry whose tuned preset a run of this adapter starts from: its block-level
    family, or its output-level entry (a block-level family that shows no blocks runs at output
    level, and gets the output-level preset)."""
    return adapter.contract if isinstance(adapter, StackAdapter) else adapter.entry


def stack_plan_for(diffusion_model) -> tuple[str, StackPlan] | None:
    adapter = adapter_for(diffusion_model, warn=False)
    return (adapter.family, adapter.plan) if isinstance(adapter, StackAdapter) else None


def model_width(diffusion_model) -> int | None:
    """The hidden size of a diffusion model's blocks (None when it does not say)."""
    hidden = getattr(getattr(diffusion_model, "params", None), "hidden_size", None)
    for name in ("hidden_size", "dim", "inner_dim", "model_dim"):   # FLUX-likes, Wan, Qwen/LTXV, ...
        if not hidden:
            hidden = getattr(diffusion_model, name, None)
    return hidden if isinstance(hidden, int) else None


def patch_size(diffusion_model) -> list:
    patch = getattr(diffusion_model, "patch_size", 2)
    return list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
