"""The Speculative Cache node (ComfyUI V3 schema): MODEL in, MODEL out."""

from __future__ import annotations

from comfy_api.latest import io

from ..cache_core import CacheConfig
from .hooks import CacheSettings, install

_DEFAULTS = CacheConfig()


def _float(name, default, lo, hi, step, tooltip):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip,
                          display_mode=io.NumberDisplay.slider)


def _int(name, default, lo, hi, tooltip):
    return io.Int.Input(name, default=default, min=lo, max=hi, tooltip=tooltip,
                        display_mode=io.NumberDisplay.slider)


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
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to accelerate."),
                io.Combo.Input(
                    "method", options=["speca", "taylorseer"], default=_DEFAULTS.method,
                    tooltip="speca: forecast, then verify each forecast with the real last block and "
                            "recompute when it is off. taylorseer: forecast at a fixed interval "
                            "(max_forecast_steps) without verification."),
                _float("threshold", _DEFAULTS.threshold, 0.0, 10.0, 0.005,
                       "Verification tolerance: the largest relative error of the last block's "
                       "output that a forecast may have (0.15 = 15 %). Lower = closer to the "
                       "uncached picture and slower; 0 disables forecasting (identical output)."),
                _int("order", _DEFAULTS.order, 0, 4,
                     "Order of the forecast polynomial through the last computed steps "
                     "(0 = reuse, 1 = linear, 2 = quadratic)."),
                _int("warmup_steps", _DEFAULTS.warmup_steps, 0, 100,
                     "Steps computed fully at the start, before any forecast."),
                _int("max_forecast_steps", _DEFAULTS.max_forecast_steps, 1, 50,
                     "At most this many forecast steps in a row, then a full step."),
                _float("start_percent", _DEFAULTS.start_percent, 0.0, 1.0, 0.01,
                       "Forecasting may start at this fraction of the schedule."),
                _float("end_percent", _DEFAULTS.end_percent, 0.0, 1.0, 0.01,
                       "Forecasting stops at this fraction of the schedule; later steps are computed."),
                _int("final_full_steps", _DEFAULTS.final_full_steps, 0, 100,
                     "Steps computed fully at the end of the schedule (fine detail forms there)."),
                io.Combo.Input(
                    "on_reject", options=["redo", "next"], default=_DEFAULTS.on_reject,
                    tooltip="When a forecast fails verification: redo = compute this step fully "
                            "(a rejected forecast is never used); next = keep it and compute the "
                            "next step fully (the SpeCa paper's behaviour, faster, less faithful)."),
                io.Combo.Input(
                    "metric", options=["relative_norm", "relative_l1"], default=_DEFAULTS.metric,
                    tooltip="relative_norm: ||forecast - real|| / ||real||. relative_l1: the SpeCa "
                            "paper's element-wise relative L1 (its FLUX threshold is 7.0)."),
                _float("threshold_decay", _DEFAULTS.threshold_decay, 0.01, 1.0, 0.01,
                       "The threshold is multiplied by decay^progress along the schedule "
                       "(stricter late in sampling); 1 keeps it constant."),
                _float("threshold_floor", _DEFAULTS.threshold_floor, 0.0, 10.0, 0.005,
                       "The decayed threshold never falls below this."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Speculative Cache.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, method="speca", threshold=_DEFAULTS.threshold, order=_DEFAULTS.order,
                warmup_steps=_DEFAULTS.warmup_steps, max_forecast_steps=_DEFAULTS.max_forecast_steps,
                start_percent=_DEFAULTS.start_percent, end_percent=_DEFAULTS.end_percent,
                final_full_steps=_DEFAULTS.final_full_steps, on_reject=_DEFAULTS.on_reject,
                metric=_DEFAULTS.metric, threshold_decay=_DEFAULTS.threshold_decay,
                threshold_floor=_DEFAULTS.threshold_floor) -> io.NodeOutput:
        config = CacheConfig(
            method=method, threshold=float(threshold), order=int(order),
            warmup_steps=int(warmup_steps), max_forecast_steps=int(max_forecast_steps),
            start_percent=float(start_percent), end_percent=float(end_percent),
            final_full_steps=int(final_full_steps), on_reject=on_reject, metric=metric,
            threshold_decay=float(threshold_decay), threshold_floor=float(threshold_floor))
        node_id = None
        hidden = getattr(cls, "hidden", None)
        if hidden is not None:
            node_id = hidden.unique_id
        patched, _ = install(model, CacheSettings(config=config, node_id=node_id))
        return io.NodeOutput(patched)
