"""Speculative Cache: a ComfyUI node pack that makes diffusion transformers faster by
forecasting their features and verifying each forecast (SpeCa).

ComfyUI loads this folder as a package under a name of its own choosing; every import
inside the pack is relative, and ComfyUI is imported only when ComfyUI asks for the
nodes, so the engine (``cache_core``) can be used and tested without ComfyUI."""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODE_LIST

    class SpeculativeCacheExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODE_LIST)

    return SpeculativeCacheExtension()
