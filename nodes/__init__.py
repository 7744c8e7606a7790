"""ComfyUI side of the pack: the nodes and the glue that hooks the engine into models."""

from .legacy_node import SpeculativeCache
from .speculative_cache import SpeculativeCacheOptions, SpeculativeCacheSimple

NODE_LIST = [SpeculativeCacheSimple, SpeculativeCacheOptions, SpeculativeCache]

__all__ = ["SpeculativeCache", "SpeculativeCacheSimple", "SpeculativeCacheOptions", "NODE_LIST"]
