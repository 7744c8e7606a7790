"""The Speculative Cache Token Pruning node: its schema and settings (the run is pruning.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ...cache_core.recipe import require_finite
from ..runtime.feature import node_id_of
from ..runtime.log import warn_once
from .pruning import LAYERS, PruningSettings, install, supports


class SpeculativeCacheTokenPruning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCacheTokenPruning",
            display_name="Speculative Cache Token Pruning (SD1.5/SDXL)",
            category="model_patches/speculative_cache",
            description=(
                "U-Net models (SD1.5, SDXL and their finetunes): between refresh steps each attention "
                "layer computes only the tokens that changed most since they were last computed and "
                "serves the others from a token cache (DaTo). Chains with ToMe-style patches; ratio 0 = off."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("ratio", default=0.5, min=0.0, max=0.95, step=0.05,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Share of the tokens served from the cache at a pruned step. 0: off "
                                       "(identical picture)."),
                io.Int.Input("refresh_interval", default=3, min=1, max=100,
                             tooltip="Every this many steps every token is computed (and the first and last "
                                     "steps). 1: every step (identical picture)."),
                io.Combo.Input("layers", options=list(LAYERS), default="self-attention",
                               tooltip="Which attention layers prune their tokens."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, ratio=0.5, refresh_interval=3, layers="self-attention") -> io.NodeOutput:
        require_finite("Speculative Cache Token Pruning", ratio=ratio, refresh_interval=refresh_interval)
        if layers not in LAYERS:
            raise ValueError(f"Speculative Cache Token Pruning: layers must be one of {list(LAYERS)}, got {layers!r}")
        if not (0.0 <= float(ratio) < 1.0) or int(refresh_interval) < 1:
            raise ValueError("Speculative Cache Token Pruning: ratio in [0, 1), refresh_interval >= 1")
        if float(ratio) == 0.0:
            return io.NodeOutput(model)                  # off: the model as it came
        dm = model.get_model_object("diffusion_model")
        if not supports(dm):
            warn_once(f"Speculative Cache Token Pruning: {type(dm).__name__} is not a U-Net (SD1.5/SDXL); "
                      "the node leaves it unchanged. For transformers use Speculative Cache.")
            return io.NodeOutput(model)
        settings = PruningSettings(ratio=float(ratio), refresh_interval=int(refresh_interval),
                                   layers=LAYERS[layers], node_id=node_id_of(cls))
        return io.NodeOutput(install(model, settings))
