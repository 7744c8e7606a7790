"""The step cache on a model (its settings) and in one sampling run (its RunContext)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from ...cache_core import CacheConfig, SpeculativeRun
from ...cache_core.per_thread import PerThread
from ...cache_core.schedule import step_index
from ..runtime.feature import Feature, FeatureRun
from ..runtime.log import log, log_failure
from ..runtime.published import STEP_CACHE_ACTIVE
from . import blockwise, context_windows, model_weights
from .adapters import StackAdapter

STEP_CACHE = Feature("speculative_cache", "Speculative Cache", ui_event="speculative_cache.stats")


@dataclass(frozen=True)
class CacheSettings:
    """What the node puts into ``transformer_options``: settings and no tensors."""
    config: CacheConfig
    node_id: str | None = None
    memory_budget_mb: int = 0           # 0: a share of the free memory of the model's device
    # What the run uses instead when an Edit Region node shares the model (its blocks run the
    # region on computed steps; the probe checks forecasts on the region's tokens): the same
    # inputs with the per-step probe. None: the same as ``config``.
    config_with_edit_region: CacheConfig | None = None


class RunContext(FeatureRun):
    """Glue-level state of one sampling run (lives only while the run lasts)."""

    # The BlockCall of the model call under way, the calling thread's own: MultiGPU CFG Split
    # runs a step's calls concurrently, one thread per device (cache_core/per_thread.py)
    active = PerThread()

    def __init__(self, settings: CacheSettings, run: SpeculativeRun, adapter, sample_sigmas):
        self.settings = settings
        self.run = run
        self.adapter = adapter
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self.steps_done = 0
        self.callback_seen = False
        self.stack_ok = isinstance(adapter, StackAdapter)
        self.diffusion_model_seen = False
        # The run's first model call learns where the cache sits (whether the DIFFUSION_MODEL hook
        # fires; block or stack granularity). Under MultiGPU CFG Split another device's thread
        # calls the model at the same time: it waits for what the first call learns
        # (glue.apply_model_wrapper), or it would take the step at another level.
        self.first_call = threading.RLock()
        self.apply_model_learned = False
        self.nested_latent = False        # the diffusion model's input is several latents (a list)
        self.diffusion_model = None
        self.blockwise = False
        self._generators = {}
        self.started = time.perf_counter()
        self.block_patches = None       # the block patches on the model when the run started
        self.base_model = None          # ComfyUI's BaseModel: its patcher knows the hooks applied now
        self.serving = None             # serving.Serving: what accepted forecast steps serve
        self.guidance = None            # cond_only.GuidanceDifference when cond-only steps are planned
        self.evaluations = context_windows.Evaluations()   # one evaluation for all context windows

    def generator_for(self, stream_keys) -> torch.Generator:
        """The random draws of ClusCa and the token tiers for a call of these streams: one
        generator per set of streams, seeded, so that they repeat from run to run and two
        devices' concurrent calls (MultiGPU CFG Split) never draw from one generator in
        whatever order their threads happen to run."""
        key = tuple(stream_keys)
        generator = self._generators.get(key)
        if generator is None:       # (made once per set of streams, not on every call)
            generator = self._generators.setdefault(key, torch.Generator().manual_seed(0))
        return generator

    # ---- FeatureRun ----------------------------------------------------------------------
    def published(self) -> dict:
        return {STEP_CACHE_ACTIVE: lambda: not self.run.closed}

    def finish(self) -> None:
        self.active = None
        if self.guidance is not None:
            self.guidance.release()
        self.run.close()
        stats = self.stamp()
        log.info(stats.summary_line())
        STEP_CACHE.tell(self.settings.node_id, stats.to_dict(), True)

    def fail(self, where: str, exc: Exception) -> None:
        """Give up caching for the rest of the run (its cache is freed now); said once per run."""
        if self.run.stats.internal_error:
            self.active = None
            self.run.close()
            return
        reason = f"{where}: {type(exc).__name__}: {exc}"
        log_failure(logging.WARNING, "Speculative Cache: internal error in %s; this run continues without the cache. "
                    "Please report it with the workflow.", reason, exc=exc)
        stats = self.run.stats
        if not stats.internal_error:
            stats.internal_error = reason[:500]
        self.active = None
        self.run.close()

    # ---- during the run --------------------------------------------------------------------
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
        # No callback yet (the first evaluation, or a custom sampler): position of sigma in the schedule.
        return step_index(self.sample_sigmas, sigma)


def run_context(transformer_options) -> RunContext | None:
    """The step cache's live run in a call's ``transformer_options`` (None outside a run, or
    once the run gave up caching)."""
    ctx = STEP_CACHE.run_in(transformer_options)
    if ctx is None or ctx.run.closed:
        return None
    return ctx
