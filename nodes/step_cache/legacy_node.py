"""The 19-input Speculative Cache node of graphs saved before the main node was split into
**Speculative Cache** (mode, speed, start/end) and **Speculative Cache Options**.

It keeps its node id, inputs and widget order, so a saved graph loads with the same
settings and runs exactly as before; it is marked deprecated (hidden from the node search,
shown with a badge) and its panel tells the user which two nodes replace it."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ...cache_core.recipe import LEGACY_DEFAULTS, describe_migration, legacy_config, migrate_legacy
from ..runtime import compat
from ..runtime.feature import node_id_of
from ..runtime.log import warn_once
from .adapters import select_adapter, tuned_family
from .glue import install
from .legacy_inputs import legacy_inputs
from .run_context import CacheSettings


class SpeculativeCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCache",
            display_name="Speculative Cache (legacy, all inputs)",
            category="model_patches/speculative_cache",
            description=(
                "The Speculative Cache node of graphs saved before version 0.2: every setting on one "
                "node. It runs exactly as before. New graphs: use Speculative Cache (mode and one speed "
                "slider) with Speculative Cache Options for the advanced settings."),
            inputs=[io.Model.Input("model", tooltip="The diffusion model to accelerate."), *legacy_inputs()],
            outputs=[io.Model.Output(tooltip="The model with Speculative Cache.")],
            hidden=[io.Hidden.unique_id],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, model, **inputs) -> io.NodeOutput:
        unknown = set(inputs) - set(LEGACY_DEFAULTS)
        if unknown:
            raise ValueError(f"Speculative Cache: unknown inputs {sorted(unknown)}")
        compat.warn_if_incompatible()
        adapter = select_adapter(model.get_model_object("diffusion_model"))
        config = legacy_config(tuned_family(adapter), inputs)
        warn_once("Speculative Cache: this graph uses the legacy 19-input node (it runs as before). The same "
                  "settings on the new nodes: " + describe_migration(migrate_legacy(inputs)) + ".", logging.INFO)
        patched, _ = install(model, CacheSettings(config=config, node_id=node_id_of(cls)), adapter)
        return io.NodeOutput(patched)
