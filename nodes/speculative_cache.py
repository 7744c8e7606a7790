"""The Speculative Cache node (ComfyUI V3 schema): MODEL in, MODEL out."""

from __future__ import annotations

from comfy_api.latest import io

from ..cache_core import CacheConfig
from ..cache_core.config import FORECASTERS, METHODS, METRICS, ON_REJECT
from ..cache_core.presets import PRESETS, resolve_settings
from . import compat
from .adapters import select_adapter
from .hooks import CacheSettings, install

_D = CacheConfig()


def _slider_float(name, default, lo, hi, step, tooltip):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip,
                          display_mode=io.NumberDisplay.slider)


def _slider_int(name, default, lo, hi, tooltip):
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tooltip,
                        display_mode=io.NumberDisplay.slider)


# Inputs in widget order. New inputs go at the END: saved workflows store widget values by
# position.
INPUTS = [
    io.Combo.Input(
        "preset", options=list(PRESETS), default="auto",
        tooltip="auto: tuned settings for the detected model family; inputs you changed from their "
                "default still win. custom: exactly the inputs below. paper_flux / paper_hunyuan_video: "
                "the SpeCa paper's settings (every input except threshold, which is the paper's base "
                "threshold: 7.0 for FLUX, 1.0 for HunyuanVideo)."),
    io.Combo.Input(
        "method", options=list(METHODS), default=_D.method,
        tooltip="speca: forecast, then verify each forecast with the real last block; recompute when "
                "it is off. The others forecast on a fixed interval (max_forecast_steps) without "
                "verification: taylorseer (Taylor), reuse (FORA), hicache (Hermite), foca (FoCa)."),
    _slider_float(
        "threshold", _D.threshold, 0.0, 10.0, 0.005,
        "Verification tolerance: the largest relative error of the last block's output that a "
        "forecast may have (0.15 = 15 %). Lower = closer to the uncached picture and slower; "
        "0 disables forecasting (identical output). Only speca verifies."),
    io.Combo.Input(
        "forecaster", options=list(FORECASTERS), default=_D.forecaster,
        tooltip="SpeCa's draft: taylor (polynomial through the last computed steps), hicache "
                "(Hermite basis, damped), foca (velocity fit + Heun corrector)."),
    _slider_int("order", _D.order, 0, 4,
                "Order of the forecast polynomial through the last computed steps "
                "(0 = reuse, 1 = linear, 2 = quadratic)."),
    _slider_int("warmup_steps", _D.warmup_steps, 0, 100,
                "Steps computed fully at the start, before any forecast."),
    _slider_int("max_forecast_steps", _D.max_forecast_steps, 1, 50,
                "At most this many forecast steps in a row, then a full step."),
    _slider_float("start_percent", _D.start_percent, 0.0, 1.0, 0.01,
                  "Forecasting may start at this fraction of the schedule."),
    _slider_float("end_percent", _D.end_percent, 0.0, 1.0, 0.01,
                  "Forecasting stops at this fraction of the schedule; later steps are computed."),
    _slider_int("final_full_steps", _D.final_full_steps, 0, 100,
                "Steps computed fully at the end of the schedule (fine detail forms there)."),
    io.Combo.Input(
        "on_reject", options=list(ON_REJECT), default=_D.on_reject,
        tooltip="When a forecast fails verification: redo = compute this step fully (a rejected "
                "forecast is never used); next = keep it and compute the next step fully (the SpeCa "
                "paper's behaviour: faster, less faithful)."),
    io.Combo.Input(
        "metric", options=list(METRICS), default=_D.metric,
        tooltip="relative_norm: ||forecast - real|| / ||real||. relative_l1: the SpeCa paper's "
                "element-wise relative L1 (its FLUX base threshold is 7.0). relative_change: the part of "
                "the feature's movement since the last computed step that the forecast missed (reuse "
                "scores 1; the same threshold means the same on any model's scale)."),
    _slider_float("threshold_decay", _D.threshold_decay, 0.01, 1.0, 0.01,
                  "The threshold is multiplied by decay^progress along the schedule (stricter late "
                  "in sampling); 1 keeps it constant."),
    _slider_float("threshold_floor", _D.threshold_floor, 0.0, 10.0, 0.005,
                  "The decayed threshold never falls below this."),
    io.Combo.Input(
        "storage_dtype", options=["auto", "float32", "bfloat16", "float16"], default="auto",
        tooltip="Precision of the stored forecast history. auto keeps the model's precision; "
                "bfloat16 halves the cache memory of a float32 model."),
    io.Combo.Input(
        "granularity", options=["stack", "block"], default=_D.granularity,
        tooltip="stack: forecast the residual of each block stage (small memory, the default). "
                "block: forecast every block's attention and MLP outputs (TaylorSeer; closer to the "
                "papers, needs gigabytes on FLUX at 1024x1024). clusca always uses block."),
    _slider_int("clusters", _D.clusters, 1, 256,
                "ClusCa: number of token clusters; one token per cluster is computed for real at "
                "each forecast step."),
    _slider_float("gamma", _D.gamma, 0.0, 1.0, 0.001,
                  "ClusCa: how far every token's cached MLP output moves towards its cluster's "
                  "fresh value (0 = only the computed tokens are refreshed)."),
]
DEFAULTS = {i.id: i.default for i in INPUTS}


class SpeculativeCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeculativeCache",
            display_name="Speculative Cache",
            category="model_patches/speculative_cache",
            description=(
                "Makes diffusion transformers (FLUX, Chroma, HunyuanVideo, ...) faster: most steps "
                "are forecast from the last computed ones, and each forecast is checked against one "
                "real block before it is used (SpeCa, forecast-then-verify). Threshold 0 = off."),
            inputs=[io.Model.Input("model", tooltip="The diffusion model to accelerate."), *INPUTS],
            outputs=[io.Model.Output(tooltip="The model with Speculative Cache.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, **inputs) -> io.NodeOutput:
        unknown = set(inputs) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"Speculative Cache: unknown inputs {sorted(unknown)}")
        compat.warn_if_incompatible()
        values = {**DEFAULTS, **inputs}
        preset = values.pop("preset")
        if values["storage_dtype"] == "auto":
            values["storage_dtype"] = None
        adapter = select_adapter(model.get_model_object("diffusion_model"))
        defaults = dict(DEFAULTS, storage_dtype=None)
        config = resolve_settings(preset, adapter.family, values, defaults)
        node_id = None
        hidden = getattr(cls, "hidden", None)
        if hidden is not None:
            node_id = hidden.unique_id
        patched, _ = install(model, CacheSettings(config=config, node_id=node_id), adapter)
        return io.NodeOutput(patched)
