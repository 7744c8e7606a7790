"""The Speculative Cache node (mode, one speed slider, start/end) and its optional
Speculative Cache Options node (ComfyUI V3 schema): MODEL in, MODEL out. What their inputs
mean is ``cache_core/recipe.py``; how the cache runs is glue.py."""

from __future__ import annotations

from comfy_api.latest import io

from ...cache_core.recipe import MODES, check_options, resolve
from ..runtime import compat
from ..runtime.feature import node_id_of
from ..runtime.log import log
from .adapters import select_adapter, tuned_family
from .glue import install
from .inputs import SpeculativeCacheOptionsType, chosen_options, options_inputs
from .legacy_inputs import chosen_from_first_options, first_options_inputs
from .run_context import CacheSettings

MAIN_INPUTS = ("mode", "speed", "start_percent", "end_percent", "options")


class SpeculativeCacheSimple(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCacheSimple",
            display_name="Speculative Cache",
            category="model_patches/speculative_cache",
            description=(
                "Makes diffusion transformers (FLUX, Wan, Qwen-Image, HunyuanVideo, ...) faster: most "
                "steps are forecast from the last computed ones, and the forecasts are checked (forecast, "
                "then verify): by default each computed step measures how far the forecasts had drifted "
                "and sets how many may follow (lookback); mode probe checks each forecast against one real "
                "block before it is used (SpeCa); speed_target aims for a speed-up. speed 0 = off "
                "(identical picture), higher = faster; start/end limit forecasting to part of the "
                "schedule. Advanced settings: plug a Speculative Cache Options node into 'options'."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to accelerate."),
                io.Combo.Input(
                    "mode", options=list(MODES), default="auto",
                    tooltip="auto: the model output is forecast and nothing runs on a forecast step; each "
                            "computed step measures how far its own forecast was, and forecasts continue "
                            "while the error predicted from that stays under the tolerance (speed 0.5: "
                            "6.3 %); with an Euler sampler each computed step also corrects the path the "
                            "forecasts took. probe: SpeCa's check, one real block on every forecast step (speed 0.5: "
                            "10 % error of that block). speed_target: 'speed' sets the speed-up to reach "
                            "(1x at 0 to 5x at 1; 0.5 = 3x) and the cache steers its tolerance during the "
                            "run to meet it. paper_flux / paper_hunyuan_video: the SpeCa paper's settings "
                            "(speed 0.5 = the paper's threshold)."),
                io.Float.Input(
                    "speed", default=0.5, min=0.0, max=1.0, step=0.01, display_mode=io.NumberDisplay.slider,
                    tooltip="0 = off: the picture is identical to running without the node. Higher = "
                            "faster and further from the uncached picture. auto: 0.5 is the tuned "
                            "default (6.3 % predicted error of the model output), 0.25 about 2.8 %, 0.75 "
                            "about 20 %. probe: 10 % error of the probed block at 0.5. speed_target: the "
                            "target speed-up is 1 + 4 x speed."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Forecasting may start at this fraction of the schedule."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Forecasting stops at this fraction of the schedule; later steps "
                                       "are computed."),
                SpeculativeCacheOptionsType.Input(
                    "options", optional=True,
                    tooltip="Advanced settings from a Speculative Cache Options node (method, "
                            "forecaster, warm-up, metric, memory, ClusCa...)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Speculative Cache.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, mode="auto", speed=0.5, start_percent=0.0, end_percent=1.0,
                options=None) -> io.NodeOutput:
        compat.warn_if_incompatible()
        if options is not None and not isinstance(options, dict):
            raise ValueError("Speculative Cache: 'options' must come from a Speculative Cache Options node")
        check_options(options or {})
        adapter = select_adapter(model.get_model_object("diffusion_model"))
        recipe = resolve(mode, float(speed), float(start_percent), float(end_percent), tuned_family(adapter), options)
        log.info("Speculative Cache: %s mode, speed %.2f -> %s", mode, speed, recipe.description)
        settings = CacheSettings(config=recipe.config, node_id=node_id_of(cls),
                                 memory_budget_mb=recipe.memory_budget_mb,
                                 config_with_edit_region=recipe.config_with_edit_region)
        patched, _ = install(model, settings, adapter)
        return io.NodeOutput(patched)


class SpeculativeCacheOptions(io.ComfyNode):
    """The Options node. Its output is the Options the user set (inputs left at auto are not
    in it), by name."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCacheAdvancedOptions",
            display_name="Speculative Cache Options",
            category="model_patches/speculative_cache",
            description=(
                "Advanced settings for the Speculative Cache node: plug its output into the node's "
                "'options' input. An input left at auto (-1 for numbers) keeps what the mode and the "
                "detected model family choose; any other value is used exactly."),
            inputs=options_inputs(),
            outputs=[SpeculativeCacheOptionsType.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(chosen_options(inputs))


class SpeculativeCacheFirstOptions(io.ComfyNode):
    """The Options node of graphs saved before version 0.5 (node id SpeculativeCacheOptions),
    its inputs as they were: a value that differs from its default is a value the user set
    (which is what it meant), so those graphs run as before."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCacheOptions",
            display_name="Speculative Cache Options (before 0.5)",
            category="model_patches/speculative_cache",
            description=(
                "The Options node of graphs saved before version 0.5; it runs as before. New graphs: "
                "Speculative Cache Options, whose inputs have an explicit auto."),
            inputs=first_options_inputs(),
            outputs=[SpeculativeCacheOptionsType.Output(display_name="options")],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(chosen_from_first_options(inputs))
