"""A lookback forecast step answered at the sampler's batch function (CALC_COND_BATCH).

On a forecast step of mode ``auto`` nothing of the model runs: the step's output is the forecast of
the whole model output. Served from inside the diffusion model's call, ComfyUI still prepares the
call: per cond the area and mask, the memory estimate (a query of the device's free memory), the
concatenation of the conditionings, a ControlNet's own network (run in full on every step), the
timestep embedding's inputs. On the 19-block reference model that preparation was about half of
what a forecast step cost (4.7 % of a model step in all). Here the step is answered before any of it:
for each cond, the forecast of its stream turned into the denoised output exactly as ComfyUI's
``BaseModel._apply_model`` and ``_calc_cond_batch`` would have (the same operations on the same
rows, so the picture is bit-identical to serving it inside the call). With cond-only steps planned
(cond_only.py) the served outputs take the same treatment as the call's (uncond from the difference
measured last).

Only the plain case is served here; anything that could make ComfyUI's result differ from the
forecast alone falls back to the call (``None``): a cond with an area, a mask, a strength, a time
range, hooks or gligen; an inpainting model's concatenated latent; a model whose ``apply_model`` is
its own; a ``model_function_wrapper`` or another node's model wrappers; context windows, MultiGPU
CFG Split and ranks that agree on decisions (their calls are split in ways the streams follow);
a stream with no history or of other weights; a forecast that is not finite."""

from __future__ import annotations

import torch

from ...cache_core.stats import FORECAST
from . import context_windows

# cond keys under which ComfyUI's get_area_and_mult or its batching changes a cond's output
_SHAPING_KEYS = ("default", "area", "mask", "timestep_start", "timestep_end", "gligen")
NAME = "out"          # the output-level feature (glue._output_forward)


def plain_model_class(model) -> bool:
    """Whether the model computes its output with ComfyUI's own BaseModel.apply_model (so the
    denoised output is calculate_denoised of the diffusion model's output)."""
    import comfy.model_base
    base = comfy.model_base.BaseModel
    cls = type(model)
    return cls.apply_model is base.apply_model and cls._apply_model is base._apply_model


def _only_ours(model_options, ours) -> bool:
    import comfy.patcher_extension as pe
    for kind in (pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.DIFFUSION_MODEL):
        if any(w not in ours for w in pe.get_all_wrappers(kind, model_options, is_model_options=True)):
            return False
    return True


def _cond_uuids(conds) -> list | None:
    uuids = []
    for cond in conds:
        if cond is None or len(cond) != 1:
            return None
        c = cond[0]
        if any(k in c for k in _SHAPING_KEYS) or c.get("hooks") is not None or c.get("strength", 1.0) != 1.0:
            return None
        if "c_concat" in (c.get("model_conds") or {}) or "uuid" not in c:
            return None
        uuids.append(c["uuid"])
    return uuids


def _inference_dtype(model):
    if hasattr(model, "get_dtype_inference"):
        return model.get_dtype_inference()
    return model.manual_cast_dtype if getattr(model, "manual_cast_dtype", None) is not None else model.get_dtype()


def serve(ctx, args, kwargs, ours) -> list | None:
    """The outputs of ``_calc_cond_batch(model, conds, x_in, timestep, model_options)`` for this
    forecast step, one per cond, or None when the call must run. ``ours``: the pack's own
    APPLY_MODEL / DIFFUSION_MODEL wrappers."""
    run = ctx.run
    decision = run.decision
    if (decision is None or not decision.forecast or not run.config.looks_back
            or ctx.adapter.apply_model_level or ctx.nested_latent or not ctx.diffusion_model_seen
            or run.agreement.active or kwargs or len(args) != 5):
        return None
    model, conds, x_in, timestep, model_options = args
    to = model_options.get("transformer_options") or {}
    if ("model_function_wrapper" in model_options or "multigpu_clones" in model_options
            or context_windows.window_key(to) is not None or not isinstance(x_in, torch.Tensor)
            or not plain_model_class(model) or not _only_ours(model_options, ours)):
        return None
    uuids = _cond_uuids(conds)
    if not uuids:
        return None
    weights = ctx.weights_key()
    streams = [run.streams.get(u) for u in uuids]
    if any(s is None or s.weights_key != weights or not s.can_predict((NAME,)) for s in streams):
        return None
    # as BaseModel._apply_model: the diffusion model's input and the step's sigma per row
    sigma = timestep
    xc = model.model_sampling.calculate_input(sigma, x_in).to(_inference_dtype(model))
    outputs = []
    for s in streams:
        pred = ctx.serving.space.decode(s.predict(run.time, (NAME,))[NAME], xc, run.sigma)
        if pred is None or pred.shape != x_in.shape or not bool(torch.isfinite(pred).all()):
            return None
        outputs.append(model.model_sampling.calculate_denoised(sigma, pred.float(), x_in))
    # booked as the call would have been: one chunk of every stream, forecast
    chunk = run.chunk(uuids, len(uuids) * x_in.shape[0], 1.0, weights)
    chunk.finish(FORECAST)
    # _calc_cond_batch's accumulation for a cond of mult 1: (0 + d * 1) / (1e-37 + 1) == d
    return outputs
