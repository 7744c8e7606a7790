"""Stack granularity: what the step cache's block patches do during one model call. At a
computed step each block stage's residual (its output minus its input) is recorded; at a
forecast step the first block of each stage returns its input plus the forecast residual and
the stage's other blocks pass through; SpeCa's verification runs the stage's last block for
real on the forecast input and compares its residual with the forecast one (arXiv 2508.08134).
Block granularity, its twin per block, is blockwise.py."""

from __future__ import annotations

from ...cache_core import StackPlan
from ..runtime.block_patch import ChainedBlockPatch
from ..runtime.published import verification_rows
from . import blockwise
from .run_context import RunContext, run_context


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
        if blockwise.stops_at_failure(self):
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
            rows = verification_rows(args.get("transformer_options"), args)  # an Edit Region's tokens, if any
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
    """The step cache's block patch: does nothing unless a run is active. Outermost among the
    pack's patches: it decides whether the blocks run at all."""

    feature = "speculative_cache"
    rank = 2

    def act(self, args, extra):
        call = None
        ctx = run_context(args.get("transformer_options"))
        if ctx is not None and ctx.stack_ok:
            call = ctx.active
        if call is None:
            return self._run(args, extra)
        return call.block(self.key, args, lambda a=args: self._run(a, extra))
