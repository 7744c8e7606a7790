"""The glue between ComfyUI's sampler and the engine, through ComfyUI's chainable
mechanisms only:

* OUTER_SAMPLE wrapper: creates the run's state, frees it in ``finally``;
* SAMPLER_SAMPLE wrapper: counts the sampler's real steps through its callback;
* CALC_COND_BATCH wrapper: marks the start of each model evaluation (all chunks);
* DIFFUSION_MODEL wrapper: forecast or compute one model call (one chunk);
* APPLY_MODEL wrapper: output-level fallback for models without a DIFFUSION_MODEL hook;
* ``patches_replace["dit"]`` block patches that chain to any patch already there.

Nothing tensor-valued lives on the node, the model or ``model_options``: the run
state is put into a per-run clone of ``model_options`` and dropped at the end."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import comfy.patcher_extension as pe

from ..cache_core import CacheConfig, SpeculativeRun, StackPlan
from ..cache_core.stats import COMPUTED, FORECAST, REJECTED
from . import blockwise, cond_only, context_windows, edit_region, guard, memory, model_weights, trajectory
from .output_space import MODEL_SPACE, OutputSpace, Serving, look_back
from .adapters import (ChainedBlockPatch, OutputAdapter, StackAdapter, find_transformer_options, forward_argument,
                       select_adapter, warn_once)

log = logging.getLogger("speculative_cache")

HOLDER_KEY = "speculative_cache"        # settings (tensor-free), set by the node
RUN_KEY = "speculative_cache_run"       # the live run, only inside a per-run clone
WRAPPER_KEY = "speculative_cache"

# Callbacks receiving (node_id, stats_dict, final: bool); used by the UI and tests.
STATS_LISTENERS: list = []


@dataclass(frozen=True)
class CacheSettings:
    """What the node puts into ``transformer_options``: settings and no tensors."""
    config: CacheConfig
    node_id: str | None = None
    memory_budget_mb: int = 0           # 0: a share of the free memory of the model's device
    probe_config: CacheConfig | None = None   # a lookback config's probe twin (see edit_region.shares_model)


EVENT = "speculative_cache.stats"


def _prompt_server():
    """ComfyUI's server, when one runs (scripts and tests have none)."""
    try:
        from server import PromptServer
    except Exception:
        return None
    return getattr(PromptServer, "instance", None)


def _notify(node_id, stats, final):
    """Stats to the listeners and, when a server runs, to the UI (with the verification
    errors so far, for the node's chart)."""
    payload = dict(stats.to_dict(), node=node_id, final=bool(final))
    guard.tell_listeners(STATS_LISTENERS, "Speculative Cache", node_id, payload, final)
    server = _prompt_server()
    if server is not None and node_id is not None:
        try:
            server.send_sync(EVENT, payload)
        except Exception:
            log.debug("Speculative Cache: could not send stats to the UI", exc_info=True)


class RunContext:
    """Glue-level state of one sampling run (lives only while the run lasts)."""

    def __init__(self, settings: CacheSettings, run: SpeculativeRun, adapter, sample_sigmas):
        self.settings = settings
        self.run = run
        self.adapter = adapter
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self.steps_done = 0
        self.callback_seen = False
        self.active: BlockCall | None = None
        self.stack_ok = isinstance(adapter, StackAdapter)
        self.diffusion_model_seen = False
        self.apply_model_calls = 0
        self.diffusion_model = None
        self.blockwise = False
        # seeded, so that ClusCa's random representatives repeat from run to run
        self.generator = torch.Generator().manual_seed(0)
        self.started = time.perf_counter()
        self.block_patches = None       # the block patches on the model when the run started
        self.base_model = None          # ComfyUI's BaseModel: its patcher knows the hooks applied now
        self.serving: Serving | None = None  # what accepted forecast steps serve (output_space.py)
        self.guidance = None            # cond_only.GuidanceDifference when cond-only steps are planned
        self.evaluations = context_windows.Evaluations()   # one evaluation for all context windows

    def weights_key(self):
        return model_weights.weights_key(self.base_model)

    def stamp(self):
        """The run's stats with its wall clock so far (the UI estimates the time saved)."""
        self.run.stats.elapsed_seconds = time.perf_counter() - self.started
        return self.run.stats

    @property
    def features(self):
        """The features a forecast step needs (stage residuals, or every block's outputs)."""
        plan = self.adapter.plan
        if self.blockwise:
            return tuple(blockwise.BlockwiseCall.feature(k, n) for k in plan.keys for n in blockwise.CAPTURE[k[0]])
        return plan.features

    def step_index_for(self, sigma: float) -> int:
        if self.callback_seen:
            return self.steps_done
        # No callback yet (the first evaluation, or a custom sampler): position of sigma in the
        # schedule. Relative tolerance: SDE samplers evaluate a flow model's first step at
        # 0.99997 instead of 1.0.
        return sum(1 for s in self.sample_sigmas[:-1] if s > sigma * (1 + 1e-3) + 1e-9)


def _run_context(transformer_options) -> RunContext | None:
    if not isinstance(transformer_options, dict):
        return None
    ctx = transformer_options.get(RUN_KEY)
    if ctx is None or ctx.run.closed:
        return None
    return ctx


# ---------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------
def _start_run(guider, settings: CacheSettings, args) -> RunContext:
    sigmas = args[3]
    adapter = select_adapter(guider.model_patcher.get_model_object("diffusion_model"))
    config = settings.config
    if settings.probe_config is not None and edit_region.shares_model(guider.model_patcher):
        log.info("Speculative Cache: an Edit Region node shares this model; forecasts are probed on its "
                 "region's tokens instead of looked back on.")
        config = settings.probe_config
    config, estimate = memory.plan_run_memory(guider, adapter, config, args[0], settings.memory_budget_mb)
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    start_time = float(model_sampling.percent_to_sigma(config.start_percent))
    end_time = float("-inf") if config.end_percent >= 1.0 else float(model_sampling.percent_to_sigma(config.end_percent))
    run = SpeculativeRun(config, len(sigmas) - 1, start_time=start_time, end_time=end_time, mode=adapter.mode,
                         sigmas=[float(s) for s in sigmas], cond_only=cond_only.available(guider))
    run.stats.estimated_cache_bytes = estimate or 0
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


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    settings = guider.model_options.get("transformer_options", {}).get(HOLDER_KEY)
    if not isinstance(settings, CacheSettings):
        return executor(*args, **kwargs)
    try:
        ctx = _start_run(guider, settings, args)
    except Exception:
        # Never break the user's sampling: run it uncached and say why.
        log.exception("Speculative Cache: could not set up this run; sampling without the cache")
        return executor(*args, **kwargs)
    try:
        with guard.run_state(guider, RUN_KEY, ctx):
            return executor(*args, **kwargs)
    finally:
        ctx.active = None
        if ctx.guidance is not None:
            ctx.guidance.release()
        ctx.run.close()
        stats = ctx.stamp()
        log.info(stats.summary_line())
        _notify(settings.node_id, stats, True)


def sampler_sample_wrapper(executor, *args, **kwargs):
    extra_args = args[2] if len(args) > 2 else kwargs.get("extra_args")
    ctx = _run_context((extra_args or {}).get("model_options", {}).get("transformer_options"))
    if ctx is None:
        return executor(*args, **kwargs)
    ctx.serving.adapt_to(executor.class_obj)
    ctx.serving.report(ctx.run.stats)
    original_callback = args[3] if len(args) > 3 else kwargs.get("callback")

    def counting_callback(step, denoised, x, total_steps):
        ctx.callback_seen = True
        ctx.steps_done = int(step) + 1
        try:
            ctx.run.end_evaluation()
            _notify(ctx.settings.node_id, ctx.stamp(), False)
        except Exception as e:
            guard.fail(ctx, "step callback", e)
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
    options["transformer_options"] = {k: v for k, v in model_options["transformer_options"].items() if k != RUN_KEY}
    if args and args[-1] is model_options:
        return (*args[:-1], options), kwargs
    return args, dict(kwargs, model_options=options)


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    model_options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("model_options", {})
    ctx = _run_context(model_options.get("transformer_options"))
    if ctx is not None and _foreign_call(ctx, model_options["transformer_options"]):
        if ctx.run.stats.evaluations == 0:
            warn_once("Speculative Cache: the model was called with other block patches than it had when "
                      "sampling started; model calls made that way run uncached.")
        args, kwargs = _without_run(args, kwargs, model_options)
        return executor(*args, **kwargs)
    if ctx is not None:
        try:
            timestep = args[3] if len(args) > 3 else kwargs.get("timestep")
            sigma = float(torch.as_tensor(timestep).max())
            step = ctx.step_index_for(sigma)
            if ctx.evaluations.begins(model_options.get("transformer_options"), step, sigma):
                ctx.run.begin_evaluation(sigma, step)
        except Exception as e:
            guard.fail(ctx, "evaluation start", e)
        if ctx.guidance is not None and not ctx.run.closed:
            return guard.cached_call(ctx, executor, args, kwargs,
                                     lambda: cond_only.calc_cond_batch(ctx, executor, args, kwargs))
    return executor(*args, **kwargs)


def diffusion_model_wrapper(executor, *args, **kwargs):
    to = find_transformer_options(args, kwargs)
    ctx = _run_context(to)
    if ctx is None or ctx.run.decision is None or ctx.adapter.apply_model_level:
        return executor(*args, **kwargs)
    return guard.cached_call(ctx, executor, args, kwargs,
                             lambda: _cached_model_call(ctx, executor, args, kwargs, to))


def _cached_model_call(ctx, executor, args, kwargs, to):
    ctx.diffusion_model_seen = True
    module = executor.class_obj
    if ctx.diffusion_model is None:
        ctx.diffusion_model = module
        if ctx.run.config.block_level and ctx.stack_ok:
            ctx.blockwise = blockwise.supports(module)
            if ctx.blockwise:
                ctx.run.stats.mode = "block"
            else:
                warn_once(f"Speculative Cache: block granularity is not available for "
                          f"{type(module).__name__}; using stack granularity.")
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
    ctx = _run_context(to)
    if ctx is None or ctx.run.decision is None or ctx.diffusion_model_seen:
        return executor(*args, **kwargs)
    if ctx.adapter.apply_model_level:
        # A family whose forward has no DIFFUSION_MODEL hook but calls block patches (SD3).
        if ctx.run.config.block_level:
            warn_once(f"Speculative Cache: block granularity is not available for {ctx.adapter.family}; "
                      "using stack granularity.")

        def call():
            # (This level returns the denoised sample: its output is forecast as it is.)
            if _stack_usable(ctx, to):
                return _stack_forward(ctx, executor, args, kwargs, to, MODEL_SPACE)
            return _output_forward(ctx, executor, args, kwargs, to, "apply_out", MODEL_SPACE)
        return guard.cached_call(ctx, executor, args, kwargs, call)
    ctx.apply_model_calls += 1
    if ctx.apply_model_calls == 1:
        out = executor(*args, **kwargs)
        if not ctx.diffusion_model_seen:
            warn_once("Speculative Cache: this model has no DIFFUSION_MODEL hook; forecasting "
                      "the model output at the APPLY_MODEL level.")
            ctx.stack_ok = False
            ctx.run.stats.mode = "output"
            try:
                _record_output(ctx, to, out, "apply_out")
            except Exception as e:
                guard.fail(ctx, "model output", e)
        return out
    return guard.cached_call(ctx, executor, args, kwargs,
                             lambda: _output_forward(ctx, executor, args, kwargs, to, "apply_out", MODEL_SPACE))


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
        if finite and pred.shape[0] == x.shape[0]:
            chunk.finish(FORECAST)
            return pred
        ctx.run.stats.nonfinite += int(pred is not None and not finite)
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
    make_call = blockwise.BlockwiseCall if ctx.blockwise else BlockCall
    if decision.forecast and chunk.can_forecast(ctx.features):
        call = ctx.active = make_call(ctx, chunk, forecast=True, verify=decision.verify)
        try:
            out = executor(*args, **kwargs)
        finally:
            ctx.active = None
        if call.failed:
            warn_once(f"Speculative Cache: a forecast could not be used ({call.failed}); computing the step.")
        elif call.rejected and run.config.on_reject == "redo":
            pass  # recompute below
        elif not bool(torch.isfinite(out).all()):
            run.stats.nonfinite += 1
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


class BlockCall:
    """What the block patches do during one model call."""

    def __init__(self, ctx: RunContext, chunk, forecast: bool, verify: bool):
        self.ctx = ctx
        self.chunk = chunk
        self.plan: StackPlan = ctx.adapter.plan
        self.forecast = forecast
        self.verify = verify
        self.fired: list = []
        self.stage_inputs: dict = {}
        self.failed: str = ""
        self.rejected = False
        self.own_residuals = False      # sum each block's own residual (something adds between blocks)
        self.stage_sum: dict = {}

    def block(self, key, args, run_block):
        loc = self.plan.locate(key)
        if loc is None:
            self.fired.append(tuple(key))
            return run_block()
        if self.forecast:
            return self._forecast_block(loc, args, run_block)
        return self._full_block(key, loc, args, run_block)

    def _full_block(self, key, loc, args, run_block):
        stage, first, last = loc
        self.fired.append(tuple(key))
        if first or self.own_residuals:
            # Blocks add their residual in place (`x += ...`): keep the input.
            self.stage_inputs = {t: args[t].clone() for t in stage.tensors}
        if first:
            self.stage_sum = {}
        out = run_block()
        self.chunk.add_units(1.0)
        if len(self.stage_inputs) != len(stage.tensors):
            return out
        if self.own_residuals:
            # The stage residual is the sum of its blocks' own residuals: what the forward adds
            # after a block (ControlNet) is left out here and added by the forward itself.
            own = {t: out[t] - self.stage_inputs[t] for t in stage.tensors}
            self.stage_sum = {t: self.stage_sum[t] + own[t] for t in own} if self.stage_sum else own
            if last:
                self.chunk.record({stage.feature(t): self.stage_sum[t] for t in stage.tensors})
                self.stage_sum, self.stage_inputs = {}, {}
        elif last:
            self.chunk.record({stage.feature(t): out[t] - self.stage_inputs[t] for t in stage.tensors})
            self.stage_inputs = {}
        return out

    def _predicted(self, stage, args):
        preds = {}
        for t in stage.tensors:
            preds[t] = blockwise.checked_prediction(self, stage.feature(t), args[t])
            if preds[t] is None:
                return None
        return preds

    def _forecast_block(self, loc, args, run_block):
        stage, first, _ = loc
        # Every input the forward may read back (SD3's last block is read for "txt" too).
        passthrough = {k: v for k, v in args.items() if k != "transformer_options"}
        if self.failed:
            return passthrough
        if stage.verify and self.verify:
            # SpeCa: run the real last block on the forecast input and compare its
            # residual with the forecast one. The real output is used.
            t0 = stage.tensors[0]
            inputs = {t: args[t].clone() for t in stage.tensors}
            out = run_block()
            self.chunk.add_units(1.0)
            pred = self._predicted(stage, args=inputs)
            if pred is None:
                return out
            real = out[t0] - inputs[t0]
            rows = edit_region.verification_rows(args)      # an Edit Region node's tokens, if any
            if not self.chunk.verify(pred[t0], real, stage.feature(t0), rows):
                self.rejected = True
            return out
        if not first:
            return passthrough
        pred = self._predicted(stage, args)
        if pred is None:
            return passthrough
        return {**passthrough, **{t: args[t] + pred[t] for t in stage.tensors}}


class BlockPatch(ChainedBlockPatch):
    """The step cache's block patch: does nothing unless a run is active."""

    def __call__(self, args, extra):
        call = None
        ctx = _run_context(args.get("transformer_options"))
        if ctx is not None and ctx.stack_ok:
            call = ctx.active
        if call is None:
            return self._run(args, extra)
        return call.block(self.key, args, lambda a=args: self._run(a, extra))


# ---------------------------------------------------------------------------------
# installing onto a ModelPatcher clone
# ---------------------------------------------------------------------------------
def install(model, settings: CacheSettings, adapter=None):
    """Return a clone of ``model`` (a ModelPatcher) with the cache installed, and the
    model's adapter (``adapter``: one already selected for this model)."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    if HOLDER_KEY in to:
        warn_once("Speculative Cache: the model already had a Speculative Cache; the later node's "
                  "settings replace the earlier ones.")
        for wtype in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.SAMPLER_SAMPLE, pe.WrappersMP.CALC_COND_BATCH,
                      pe.WrappersMP.DIFFUSION_MODEL, pe.WrappersMP.APPLY_MODEL):
            m.remove_wrappers_with_key(wtype, WRAPPER_KEY)
    to[HOLDER_KEY] = settings
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    trajectory.install(m)

    if adapter is None:
        adapter = select_adapter(m.get_model_object("diffusion_model"))
    if isinstance(adapter, StackAdapter):
        existing = to.get("patches_replace", {}).get("dit", {})
        for key in adapter.plan.keys:
            previous = existing.get(key)
            while isinstance(previous, BlockPatch):  # replacing an earlier Speculative Cache
                previous = previous.previous
            m.set_model_patch_replace(BlockPatch(key, previous), "dit", key[0], key[1])
    return m, adapter


__all__ = ["CacheSettings", "install", "STATS_LISTENERS", "HOLDER_KEY", "RUN_KEY",
           "OutputAdapter", "StackAdapter"]
