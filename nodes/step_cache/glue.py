"""The step cache's glue between ComfyUI's sampler and the engine, through ComfyUI's chainable
mechanisms only:

* OUTER_SAMPLE wrapper (the shared runtime's, ``runtime/feature.py``): ``_start_run`` makes the
  run's RunContext, which lives in a per-run clone of the model options and is finished in
  ``finally``;
* SAMPLER_SAMPLE wrapper: counts the sampler's real steps through its callback;
* CALC_COND_BATCH wrapper: marks the start of each model evaluation (all chunks);
* DIFFUSION_MODEL wrapper: forecast or compute one model call (one chunk);
* APPLY_MODEL wrapper: output-level fallback for models without a DIFFUSION_MODEL hook;
* ``patches_replace["dit"]`` block patches (block_call.py, blockwise.py) that chain to any patch
  already there.

Nothing tensor-valued lives on the node, the model or ``model_options``."""

from __future__ import annotations

import torch

from ...cache_core import SpeculativeRun
from ...cache_core.output_space import MODEL_SPACE, OutputSpace, look_back
from ...cache_core.stats import COMPUTED, FORECAST, REJECTED
from ..runtime import guard
from ..runtime.block_patch import install_block_patches
from ..runtime.log import log, warn_once
from ..runtime.model_call import find_transformer_options, forward_argument, sampler_sigmas, sampling_sigma
from ..runtime.published import EDITS_REGION
from . import blockwise, cond_only, context_windows, memory, served_forecast, trajectory
from .adapters import StackAdapter, select_adapter
from .block_call import BlockCall, BlockPatch
from .run_context import STEP_CACHE, CacheSettings, RunContext, run_context
from .serving import Serving

# ---------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------
def _start_run(guider, settings: CacheSettings, args, kwargs) -> RunContext:
    sigmas = sampler_sigmas(args, kwargs)
    adapter = select_adapter(guider.model_patcher.get_model_object("diffusion_model"))
    config = settings.config
    if settings.config_with_edit_region is not None and \
            guider.model_options.get("transformer_options", {}).get(EDITS_REGION):
        log.info("Speculative Cache: an Edit Region node shares this model; forecasts are probed on its "
                 "region's tokens instead of looked back on.")
        config = settings.config_with_edit_region
    config, estimate = memory.plan_run_memory(guider, adapter, config, args[0], settings.memory_budget_mb)
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    start_time = float(model_sampling.percent_to_sigma(config.start_percent))
    end_time = float("-inf") if config.end_percent >= 1.0 else float(model_sampling.percent_to_sigma(config.end_percent))
    run = SpeculativeRun(config, len(sigmas) - 1, start_time=start_time, end_time=end_time, mode=adapter.mode,
                         sigmas=[float(s) for s in sigmas], cond_only=cond_only.available(guider))
    run.stats.estimated_cache_bytes = estimate or 0
    for note in (run.few_steps_note(), run.few_calls_note()):
        if note:
            log.info(note)
    ctx = RunContext(settings, run, adapter, sigmas)
    ctx.base_model = guider.model_patcher.model
    ctx.serving = Serving(run, model_sampling)
    ctx.serving.report(run.stats)
    if run.policy.cond_only_plan:
        ctx.guidance = cond_only.GuidanceDifference(run.policy.cond_only_plan)
    correction = trajectory.for_run(config, model_sampling)
    if correction is not None:
        run.attach_correction(correction)
    if ctx.stack_ok:
        ctx.block_patches = _dit_patches(guider.model_options.get("transformer_options", {}), adapter.plan.keys)
    return ctx


outer_sample_wrapper = STEP_CACHE.sampling_wrapper(_start_run)


def sampler_sample_wrapper(executor, *args, **kwargs):
    extra_args = args[2] if len(args) > 2 else kwargs.get("extra_args")
    ctx = run_context((extra_args or {}).get("model_options", {}).get("transformer_options"))
    if ctx is None:
        return executor(*args, **kwargs)
    ctx.serving.adapt_to(executor.class_obj)
    ctx.serving.report(ctx.run.stats)
    original_callback = args[3] if len(args) > 3 else kwargs.get("callback")

    def counting_callback(step, denoised, x, total_steps):
        ctx.callback_seen = True
        ctx.steps_done = int(step) + 1
        if not ctx.run.closed:          # (a run that gave up has said so once already)
            try:
                ctx.run.end_evaluation()
                STEP_CACHE.tell(ctx.settings.node_id, ctx.stamp().to_dict(), False)
            except Exception as e:
                guard.give_up(ctx, "step callback", e)
        if original_callback is not None:
            return original_callback(step, denoised, x, total_steps)

    if len(args) > 3:
        args = args[:3] + (counting_callback,) + args[4:]
    else:
        kwargs["callback"] = counting_callback
    return executor(*args, **kwargs)


def _dit_patches(transformer_options, keys) -> dict:
    dit = transformer_options.get("patches_replace", {}).get("dit", {})
    return {key: dit.get(key) for key in keys}


def _foreign_call(ctx, transformer_options) -> bool:
    """Another node's extra model call within a step, with block patches replaced for that
    call only (SkipLayerGuidance runs the model again with blocks skipped): it is a
    different model, so it runs uncached and is not a step of ours. Patches installed on
    the model before the run (ours, or another pack's chained after ours) are the run's
    own: only a call whose patches differ from those is foreign."""
    if not ctx.stack_ok or ctx.block_patches is None:
        return False
    now = _dit_patches(transformer_options, ctx.adapter.plan.keys)
    return any(now[key] is not ctx.block_patches[key] for key in now)


def _without_run(args, kwargs, model_options):
    """The call's arguments with the run hidden from every wrapper below (a shallow copy)."""
    options = dict(model_options)
    options["transformer_options"] = {k: v for k, v in model_options["transformer_options"].items() if k != STEP_CACHE.run_key}
    if args and args[-1] is model_options:
        return (*args[:-1], options), kwargs
    return args, dict(kwargs, model_options=options)


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    model_options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("model_options", {})
    ctx = run_context(model_options.get("transformer_options"))
    if ctx is not None and _foreign_call(ctx, model_options["transformer_options"]):
        if ctx.run.stats.evaluations == 0:
            warn_once("Speculative Cache: the model was called with other block patches than it had when "
                      "sampling started; model calls made that way run uncached.")
        args, kwargs = _without_run(args, kwargs, model_options)
        return executor(*args, **kwargs)
    if ctx is not None:
        try:
            timestep = args[3] if len(args) > 3 else kwargs.get("timestep")
            sigma = sampling_sigma(timestep)
            step = ctx.step_index_for(sigma)
            if ctx.evaluations.begins(model_options.get("transformer_options"), step, sigma):
                ctx.run.begin_evaluation(sigma, step)
        except Exception as e:
            guard.give_up(ctx, "evaluation start", e)
        if not ctx.run.closed:
            if ctx.guidance is not None:
                return guard.cached_call(ctx, executor, args, kwargs, lambda ex, a, kw: cond_only.calc_cond_batch(
                    ctx, _one_outcome(ctx, _answer_forecast(ctx, ex)), a, kw))
            return _one_outcome(ctx, _answer_forecast(ctx, executor))(*args, **kwargs)
    return executor(*args, **kwargs)


def _answer_forecast(ctx, executor):
    """``executor`` (the sampler's batch function), with a lookback forecast step answered before
    ComfyUI prepares the call where served_forecast can (the same outputs; its preparation and a
    ControlNet's network are skipped). An error of ours ends the cache for the run and the call
    runs."""
    def call(*args, **kwargs):
        if not ctx.run.closed and ctx.run.decision is not None and ctx.run.decision.forecast:
            try:
                served = served_forecast.serve(ctx, args, kwargs, _OWN_MODEL_WRAPPERS)
            except Exception as e:
                if guard.passes_through(e):
                    raise
                guard.give_up(ctx, "forecast step", e)
                served = None
            if served is not None:
                return served
        return executor(*args, **kwargs)
    return call


def _one_outcome(ctx, executor):
    """``executor`` (the sampler's batch function), made again with every chunk computed when a
    forecast of the call was rejected in "redo" mode or its chunks came back mixed
    (SpeculativeRun.needs_recompute): the call's streams take one outcome, whether they ran in
    one batch or, under MultiGPU CFG Split, as one chunk per device in concurrent threads."""
    def call(*args, **kwargs):
        ctx.run.begin_call()
        out = executor(*args, **kwargs)
        if not ctx.run.closed and ctx.run.needs_recompute():
            ctx.run.recompute_evaluation()
            try:
                out = executor(*args, **kwargs)
            finally:
                ctx.run.end_recompute()
        return out
    return call


def diffusion_model_wrapper(executor, *args, **kwargs):
    to = find_transformer_options(args, kwargs)
    ctx = run_context(to)
    if ctx is None or ctx.run.decision is None or ctx.adapter.apply_model_level:
        return executor(*args, **kwargs)
    if not isinstance(args[0] if args else kwargs.get("x"), torch.Tensor):
        # A model of several latents (LTX-2 audio-video) gets them here unpacked, as a list;
        # APPLY_MODEL sees them packed into one tensor: its level forecasts the output instead
        # (apply_model_wrapper, which this call leaves unaware of a DIFFUSION_MODEL hook).
        ctx.nested_latent = True
        return executor(*args, **kwargs)
    return guard.cached_call(ctx, executor, args, kwargs,
                             lambda ex, a, kw: _cached_model_call(ctx, ex, a, kw, to))


def _cached_model_call(ctx, executor, args, kwargs, to):
    ctx.diffusion_model_seen = True
    module = executor.class_obj
    if ctx.diffusion_model is None:
        with ctx.first_call:    # (another device's thread reads ctx.blockwise once the model is set)
            if ctx.diffusion_model is None:
                if ctx.run.config.block_level and ctx.stack_ok:
                    ctx.blockwise = blockwise.supports(module)
                    if ctx.blockwise:
                        ctx.run.stats.mode = "block"
                    else:
                        warn_once(f"Speculative Cache: block granularity is not available for "
                                  f"{type(module).__name__}; using stack granularity.")
                ctx.diffusion_model = module
    if _stack_usable(ctx, to):
        return _stack_forward(ctx, executor, args, kwargs, to, ctx.serving.space)
    return _output_forward(ctx, executor, args, kwargs, to, "out", ctx.serving.space)


def _stack_usable(ctx, to) -> bool:
    """Block level, unless the run looks back (it forecasts the whole output), or a family's
    between-block model patches are attached: they may read the hidden state, which a
    forecast step does not compute block by block. Output level for that call then.
    (ControlNet and VACE residuals do not read it: see ``BlockCall.own_residuals``.)"""
    if ctx.run.config.looks_back:
        ctx.run.stats.mode = "output"
        return False
    if not ctx.stack_ok:
        return False
    contract = ctx.adapter.contract
    patches = (to or {}).get("patches") or {}
    if contract is None or not any(patches.get(k) for k in contract.between_block_patches):
        return True
    warn_once(f"Speculative Cache: a model patch adds features between {contract.name} blocks; this run "
              "forecasts the model output instead of blocks.")
    ctx.run.stats.mode = "output"
    return False


def apply_model_wrapper(executor, *args, **kwargs):
    """Fallback for models whose forward has no DIFFUSION_MODEL hook (SD3 in 0.3.64):
    learn on the first call whether the DIFFUSION_MODEL wrapper fires."""
    to = find_transformer_options(args, kwargs)
    ctx = run_context(to)
    if ctx is None or ctx.run.decision is None or ctx.diffusion_model_seen:
        return executor(*args, **kwargs)
    if ctx.adapter.apply_model_level:
        # A family whose forward has no DIFFUSION_MODEL hook but calls block patches (SD3).
        if ctx.run.config.block_level:
            warn_once(f"Speculative Cache: block granularity is not available for {ctx.adapter.family}; "
                      "using stack granularity.")

        def call(ex, a, kw):
            # (This level returns the denoised sample: its output is forecast as it is.)
            if _stack_usable(ctx, to):
                return _stack_forward(ctx, ex, a, kw, to, MODEL_SPACE)
            return _output_forward(ctx, ex, a, kw, to, "apply_out", MODEL_SPACE)
        return guard.cached_call(ctx, executor, args, kwargs, call)
    if not ctx.apply_model_learned:
        # The first call learns whether the DIFFUSION_MODEL wrapper fires; a call of another
        # device's thread (MultiGPU CFG Split) waits for the answer here (RunContext.first_call).
        with ctx.first_call:
            if not ctx.apply_model_learned:
                try:
                    return _learn_hook_points(ctx, executor, args, kwargs, to)
                finally:
                    ctx.apply_model_learned = True
        if ctx.diffusion_model_seen:
            return executor(*args, **kwargs)
    return guard.cached_call(ctx, executor, args, kwargs,
                             lambda ex, a, kw: _output_forward(ctx, ex, a, kw, to, "apply_out", MODEL_SPACE))


def _learn_hook_points(ctx, executor, args, kwargs, to):
    """The run's first APPLY_MODEL call: run it; if the DIFFUSION_MODEL wrapper did not fire
    inside, forecast the model output at this level from now on (this call's output recorded)."""
    out = executor(*args, **kwargs)
    if not ctx.diffusion_model_seen:
        why = ("its latent is several tensors (a nested latent)" if ctx.nested_latent
               else "this model has no DIFFUSION_MODEL hook")
        warn_once(f"Speculative Cache: {why}; forecasting the model output at the APPLY_MODEL level.")
        ctx.stack_ok = False
        ctx.run.stats.mode = "output"
        try:
            _record_output(ctx, to, out, "apply_out")
        except Exception as e:
            guard.give_up(ctx, "model output", e)
    return out


def _stream_keys(to, batch):
    uuids = list(to.get("uuids") or [])
    if not uuids or batch % len(uuids) != 0:
        uuids = ["batch"]
    return context_windows.stream_keys(uuids, to)


def _record_output(ctx, to, out, name):
    chunk = ctx.run.chunk(_stream_keys(to, out.shape[0]), out.shape[0], 1.0, ctx.weights_key())
    chunk.add_units(1.0)
    chunk.record({name: out})
    chunk.finish(COMPUTED)


# ---------------------------------------------------------------------------------
# output level
# ---------------------------------------------------------------------------------
def _output_forward(ctx, executor, args, kwargs, to, name, space: OutputSpace):
    x, sigma = args[0], ctx.run.sigma
    chunk = ctx.run.chunk(_stream_keys(to, x.shape[0]), x.shape[0], 1.0, ctx.weights_key())
    decision = ctx.run.decision
    if decision.forecast and chunk.can_forecast((name,)):
        pred = space.decode(chunk.predict(name), x, sigma)
        finite = pred is not None and bool(torch.isfinite(pred).all())
        if not ctx.run.agreement.any(not (finite and pred.shape[0] == x.shape[0])):
            chunk.finish(FORECAST)
            return pred
        ctx.run.count(nonfinite=int(pred is not None and not finite))
    out = executor(*args, **kwargs)
    chunk.add_units(1.0)
    if ctx.run.config.looks_back:
        look_back(chunk, name, space, out, x, sigma)
    chunk.record({name: space.encode(out, x, sigma)})
    chunk.finish(COMPUTED)
    return out


# ---------------------------------------------------------------------------------
# stack level
# ---------------------------------------------------------------------------------
def _stack_forward(ctx, executor, args, kwargs, to, space: OutputSpace):
    run, plan = ctx.run, ctx.adapter.plan
    x = args[0]
    chunk = run.chunk(_stream_keys(to, x.shape[0]), x.shape[0], float(len(plan)), ctx.weights_key())
    decision = run.decision
    module = executor.class_obj

    def make_call(ctx, chunk, forecast, verify):
        if ctx.blockwise:
            return blockwise.BlockwiseCall(ctx, chunk, forecast, verify, model=module)
        return BlockCall(ctx, chunk, forecast=forecast, verify=verify)
    if decision.forecast and chunk.can_forecast(ctx.features):
        call = ctx.active = make_call(ctx, chunk, forecast=True, verify=decision.verify)
        try:
            out = executor(*args, **kwargs)
        finally:
            ctx.active = None
        redo = call.rejected and run.config.on_reject == "redo"
        finite = redo or bool(torch.isfinite(out).all())
        # (ranks that run one picture together compute the step if any of them must)
        if run.agreement.any(bool(call.failed) or not finite):
            if call.failed:
                warn_once(f"Speculative Cache: a forecast could not be used ({call.failed}); computing the step.")
            elif not finite:
                run.count(nonfinite=1)
        elif redo:
            # the sampler's call is made again, all of it (_one_outcome)
            chunk.finish(REJECTED)
            return out
        else:
            if ctx.serving.serve_output and chunk.can_forecast(("served",)):
                served = space.decode(chunk.predict("served"), x, run.sigma)
                if served is not None and served.shape == out.shape and bool(torch.isfinite(served).all()):
                    out = served.to(out.dtype)
            chunk.finish(REJECTED if call.rejected else FORECAST)
            return out
    call = ctx.active = make_call(ctx, chunk, forecast=False, verify=False)
    # A ControlNet adds its residuals between blocks, outside the block patches: a stage's
    # residual is then measured block by block, so that it holds only what the blocks did
    # (the forward adds this step's real ControlNet residuals on forecast steps too).
    contract = ctx.adapter.contract
    call.own_residuals = ((contract is not None and contract.adds_between_blocks)
                          or forward_argument(executor.class_obj, "control", args, kwargs) is not None)
    try:
        out = executor(*args, **kwargs)
    finally:
        ctx.active = None
    if call.fired != list(plan.keys):
        # The model skipped or added blocks we did not plan for: never forecast from a
        # partial picture. Fall back to output level for the rest of this run.
        warn_once(f"Speculative Cache: {ctx.adapter.family} ran blocks {call.fired[:4]}... that do not "
                  "match its expected layout; forecasting the model output instead.")
        ctx.stack_ok = False
        chunk.record({"out": space.encode(out, x, run.sigma)})
    elif ctx.serving.serve_output:
        chunk.record({"served": space.encode(out, x, run.sigma)})
    chunk.finish(REJECTED if chunk.rejected else COMPUTED)
    return out


# ---------------------------------------------------------------------------------
# installing onto a ModelPatcher clone
# ---------------------------------------------------------------------------------
# The APPLY_MODEL and DIFFUSION_MODEL wrappers of this pack (served_forecast: any other node's
# wrapper there sends a forecast step through the model call).
_OWN_MODEL_WRAPPERS = (apply_model_wrapper, diffusion_model_wrapper)


def install(model, settings: CacheSettings, adapter=None):
    """Return a clone of ``model`` (a ModelPatcher) with the cache installed, and the
    model's adapter (``adapter``: one already selected for this model)."""
    if STEP_CACHE.settings_on(model.model_options) is not None:
        warn_once("Speculative Cache: the model already had a Speculative Cache; the later node's "
                  "settings replace the earlier ones.")
    m = STEP_CACHE.install(model, settings, {
        "OUTER_SAMPLE": outer_sample_wrapper, "SAMPLER_SAMPLE": sampler_sample_wrapper,
        "CALC_COND_BATCH": calc_cond_batch_wrapper, "DIFFUSION_MODEL": diffusion_model_wrapper,
        "APPLY_MODEL": apply_model_wrapper})
    trajectory.install(m)
    if adapter is None:
        adapter = select_adapter(m.get_model_object("diffusion_model"))
    if isinstance(adapter, StackAdapter):
        install_block_patches(m, adapter.plan.keys, BlockPatch)
    return m, adapter
