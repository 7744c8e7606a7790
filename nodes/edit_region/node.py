"""The Speculative Cache Edit Region node: its schema and settings (the run is region.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ...cache_core.recipe import require_finite
from ..runtime.feature import node_id_of
from .region import CONTEXT_MODES, EditRegionSettings, install


class SpeculativeCacheEditRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCacheEditRegion",
            display_name="Speculative Cache Edit Region",
            category="model_patches/speculative_cache",
            description=(
                "Inpainting and editing: only the masked region (plus a margin) goes through the "
                "transformer at most steps; the rest is read from the last refresh step (EEdit). Uses "
                "the latent's noise mask (Set Latent Noise Mask, Inpaint Model Conditioning); without "
                "one it does nothing. FLUX-class models."),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("margin", default=2, min=0, max=64,
                             tooltip="Tokens (16 pixels each on FLUX) around the mask that are computed "
                                     "too, so the seam blends. 0: the mask only."),
                io.Int.Input("refresh_interval", default=3, min=1, max=100,
                             display_mode=io.NumberDisplay.slider,
                             tooltip="Every this many steps all tokens are computed and the context is "
                                     "refreshed. 1: every step (identical to running without the node)."),
                io.Int.Input("final_refresh_steps", default=1, min=0, max=100,
                             tooltip="Steps at the end that compute every token."),
                io.Combo.Input("context", options=list(CONTEXT_MODES), default="linear",
                               tooltip="What the region attends to outside itself between refreshes. "
                                       "linear: keys and values extrapolated in sigma from the last two "
                                       "refreshes (closer, twice the memory). reuse: those of the last "
                                       "refresh."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, margin=2, refresh_interval=3, final_refresh_steps=1, context="linear") -> io.NodeOutput:
        require_finite("Speculative Cache Edit Region", margin=margin, refresh_interval=refresh_interval,
                       final_refresh_steps=final_refresh_steps)
        if context not in CONTEXT_MODES:
            raise ValueError(f"Speculative Cache Edit Region: context must be one of {list(CONTEXT_MODES)}, "
                             f"got {context!r}")
        settings = EditRegionSettings(margin=int(margin), refresh_interval=int(refresh_interval),
                                      final_refresh_steps=int(final_refresh_steps),
                                      context_order=CONTEXT_MODES[context],
                                      node_id=node_id_of(cls))
        if settings.margin < 0 or settings.refresh_interval < 1 or settings.final_refresh_steps < 0:
            raise ValueError("Speculative Cache Edit Region: margin >= 0, refresh_interval >= 1, "
                             "final_refresh_steps >= 0")
        return io.NodeOutput(install(model, settings))
