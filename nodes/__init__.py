"""ComfyUI side of the pack: one folder per node feature over the shared runtime.

    runtime/         what every feature shares: its life on a model and through a run, block patch
                     chains, what features publish to each other, guards, ComfyUI compatibility
    step_cache/      Speculative Cache (+ Options, + the nodes of older graphs)
    edit_region/     Speculative Cache Edit Region (EEdit)
    token_pruning/   Speculative Cache Token Pruning (DaTo, U-Nets)

Features never import each other: they cooperate through keys in ``transformer_options``
(runtime/published.py)."""

from .edit_region.node import SpeculativeCacheEditRegion
from .step_cache.legacy_node import SpeculativeCache
from .step_cache.node import SpeculativeCacheFirstOptions, SpeculativeCacheOptions, SpeculativeCacheSimple
from .token_pruning.node import SpeculativeCacheTokenPruning

NODE_LIST = [SpeculativeCacheSimple, SpeculativeCacheOptions, SpeculativeCacheEditRegion, SpeculativeCacheTokenPruning,
             SpeculativeCache, SpeculativeCacheFirstOptions]

__all__ = ["SpeculativeCache", "SpeculativeCacheEditRegion", "SpeculativeCacheTokenPruning", "SpeculativeCacheSimple",
           "SpeculativeCacheOptions", "SpeculativeCacheFirstOptions", "NODE_LIST"]
