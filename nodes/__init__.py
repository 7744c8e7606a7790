"""ComfyUI side of the pack: the nodes and the glue that hooks the engine into models."""

from .edit_region import SpeculativeCacheEditRegion
from .legacy_node import SpeculativeCache
from .speculative_cache import SpeculativeCacheOptions, SpeculativeCacheSimple
from .token_pruning import SpeculativeCacheTokenPruning

NODE_LIST = [SpeculativeCacheSimple, SpeculativeCacheOptions, SpeculativeCache, SpeculativeCacheEditRegion,
             SpeculativeCacheTokenPruning]

__all__ = ["SpeculativeCache", "SpeculativeCacheEditRegion", "SpeculativeCacheTokenPruning", "SpeculativeCacheSimple", "SpeculativeCacheOptions", "NODE_LIST"]
