"""The 19-input Speculative Cache node of graphs saved before the main node was split into
**Speculative Cache** (mode, speed, start/end) and **Speculative Cache Options**.

It keeps its node id, inputs and widget order, so a saved graph loads with the same
settings and runs exactly as before; it is marked deprecated (hidden from the node search,
shown with a badge) and its panel tells the user which two nodes replace it."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import compat
from .adapters import select_adapter, warn_once
from .hooks import CacheSettings, install
from .inputs import LEGACY_DEFAULTS, check_known, describe_migration, legacy_config, legacy_inputs, migrate_legacy

# kept for callers of the engine's full settings (benchmarks, tests)
INPUTS = legacy_inputs()
DEFAULTS = LEGACY_DEFAULTS


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
        check_known(inputs, LEGACY_DEFAULTS, "Speculative Cache")
        compat.warn_if_incompatible()
        adapter = select_adapter(model.get_model_object("diffusion_model"))
        config = legacy_config(adapter.family, inputs)
        warn_once("Speculative Cache: this graph uses the legacy 19-input node (it runs as before). The same "
                  "settings on the new nodes: " + describe_migration(migrate_legacy(inputs)) + ".", logging.INFO)
        hidden = getattr(cls, "hidden", None)
        node_id = hidden.unique_id if hidden is not None else None
        patched, _ = install(model, CacheSettings(config=config, node_id=node_id), adapter)
        return io.NodeOutput(patched)
