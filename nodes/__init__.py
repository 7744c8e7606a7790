"""ComfyUI side of the pack: the nodes and the glue that hooks the engine into models."""

from .speculative_cache import SpeculativeCache

NODE_LIST = [SpeculativeCache]

__all__ = ["SpeculativeCache", "NODE_LIST"]
