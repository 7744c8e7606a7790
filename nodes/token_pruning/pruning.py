"""The Speculative Cache Token Pruning node for SD1.5 / SDXL-class U-Nets (DaTo, arXiv
2501.00375; the tensor side is cache_core/token_pruning.py).

Between refresh steps each attention layer of the U-Net's transformer blocks computes
only the tokens whose input moved most since they were last computed; the others'
outputs come from the token cache, moved by the computed tokens' mean change. It hooks in
like ComfyUI's own ToMe node, through the chainable attention patches (``attn1_patch`` /
``attn1_output_patch``, and the ``attn2`` pair for cross-attention when asked), plus an
OUTER_SAMPLE wrapper that owns the run's cache (a per-run clone of ``model_options``;
dropped at the end of the run).

``ratio`` 0, or a refresh every step, leaves the model exactly as it was."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...cache_core.schedule import step_index
from ...cache_core.token_pruning import TokenCache, kept_count, select_dynamic, served_output
from ...cache_core.tokens import gather_tokens, scatter_tokens
from ..runtime import guard
from ..runtime.feature import Feature, FeatureRun
from ..runtime.log import log, warn_once
from ..runtime.model_call import find_transformer_options, sampler_sigmas

PRUNING = Feature("speculative_cache_pruning", "Speculative Cache Token Pruning")
LAYERS = {"self-attention": ("attn1",), "self- and cross-attention": ("attn1", "attn2")}


@dataclass(frozen=True)
class PruningSettings:
    ratio: float = 0.5
    refresh_interval: int = 3
    layers: tuple = ("attn1",)
    node_id: str | None = None


@dataclass
class PruningStats:
    attention_calls: int = 0
    pruned_calls: int = 0
    query_tokens: int = 0
    computed_tokens: int = 0
    cache_bytes: int = 0
    disabled: str = ""

    def to_dict(self):
        d = dict(self.__dict__)
        d["computed_token_fraction"] = self.computed_tokens / self.query_tokens if self.query_tokens else 1.0
        return d

    def summary(self):
        if self.disabled:
            return f"Speculative Cache Token Pruning: off for this run ({self.disabled})"
        share = self.computed_tokens / self.query_tokens if self.query_tokens else 1.0
        return (f"Speculative Cache Token Pruning: {self.pruned_calls} of {self.attention_calls} attention calls "
                f"pruned; {share:.3f} of the query tokens computed")


class PruningRun(FeatureRun):
    def __init__(self, settings: PruningSettings, sigmas):
        self.settings = settings
        self.sample_sigmas = [float(s) for s in sigmas]
        self.total_steps = len(self.sample_sigmas) - 1
        self.caches: dict = {}
        self.stats = PruningStats()

    def disable(self, reason: str):
        if not self.stats.disabled:
            self.stats.disabled = reason
            log.warning("Speculative Cache Token Pruning: %s; this run continues without it.", reason)
        self.caches.clear()

    def finish(self) -> None:
        self.stats.cache_bytes = sum(c.nbytes() for c in self.caches.values())
        self.caches.clear()
        log.info(self.stats.summary())
        PRUNING.tell(self.settings.node_id, self.stats.to_dict(), True)

    def prunes_step(self, extra) -> bool:
        """Refresh (every token) on the first step, every ``refresh_interval``-th step and
        the last one; prune the others."""
        sigma = extra.get("sigmas")
        if sigma is None:
            return False
        step = step_index(self.sample_sigmas, float(torch.as_tensor(sigma).max()))
        interval = self.settings.refresh_interval
        return 0 < step < self.total_steps - 1 and step % interval != 0


def _cache_key(which, n, extra):
    return (which, extra.get("block"), extra.get("block_index"), tuple(str(u) for u in extra.get("uuids") or ()),
            n.shape[0])


def _attention_patch(which):
    """The ``<which>_patch``: prune the queries of a pruned step."""
    def patch(n, context, value, extra):
        run = PRUNING.run_in(extra)
        if run is None or run.stats.disabled or n.ndim != 3:
            return n, context, value
        with guard.ours():
            return _prune_queries(which, run, n, context, value, extra)
    patch.speculative_cache_pruning = which
    return patch


def _prune_queries(which, run, n, context, value, extra):
    cache = run.caches.setdefault(_cache_key(which, n, extra), TokenCache())
    run.stats.attention_calls += 1
    run.stats.query_tokens += n.shape[0] * n.shape[1]
    keep = kept_count(n.shape[1], run.settings.ratio)
    if not (run.prunes_step(extra) and cache.fits(n)) or keep >= n.shape[1]:
        cache.pending = None
        cache.reference = n.detach()
        run.stats.computed_tokens += n.shape[0] * n.shape[1]
        return n, context, value
    idx = select_dynamic(n, cache.reference, keep)
    queries = gather_tokens(n, idx)
    cache.reference = scatter_tokens(cache.reference, idx, queries)
    cache.pending = idx
    run.stats.pruned_calls += 1
    run.stats.computed_tokens += idx.numel()
    # Self-attention's keys and values still come from every token (context is n).
    return queries, context, value


def _output_patch(which):
    """The ``<which>_output_patch``: put the computed tokens back among the cached ones."""
    def patch(out, extra):
        run = PRUNING.run_in(extra)
        if run is None or run.stats.disabled or out.ndim != 3:
            return out
        with guard.ours():
            return _serve_output(which, run, out, extra)
    patch.speculative_cache_pruning = which
    return patch


def _serve_output(which, run, out, extra):
    cache = run.caches.get(_cache_key(which, out, extra))
    if cache is None:
        return out
    idx, cache.pending = cache.pending, None
    if idx is None:
        cache.output = out.detach()
        return out
    if out.shape[1] != idx.shape[1] or cache.output is None:
        # Another patch changed the token count between ours for this call only (ToMe's
        # changes are caught earlier: the cache's shapes stop fitting and that layer is not
        # pruned). The call cannot be completed from the cache: stop pruning for the run.
        run.disable(f"another attention patch changed the token count ({out.shape[1]} tokens, "
                    f"{idx.shape[1]} computed)")
        return out
    cache.output = served_output(cache.output, idx, out)
    return cache.output


outer_sample_wrapper = PRUNING.sampling_wrapper(
    lambda guider, settings, args, kwargs: PruningRun(settings, sampler_sigmas(args, kwargs)))


def diffusion_model_wrapper(executor, *args, **kwargs):
    """The containment rule for the pruning's attention patches, which run inside the U-Net's
    forward: an error of theirs (the model's, the user's graph's) passes unchanged; an error of
    ours ends the pruning for the run and the call is made again, unpruned, on its intact inputs
    (the first attempt had private copies of the ControlNet residual lists the U-Net pops)."""
    run = PRUNING.run_in(find_transformer_options(args, kwargs))
    if run is None or run.stats.disabled:
        return executor(*args, **kwargs)
    attempt_args, attempt_kwargs = guard.private_inputs(args, kwargs)
    try:
        return guard.theirs(executor, *attempt_args, **attempt_kwargs)
    except Exception as e:
        if guard.passes_through(e):
            raise
        run.disable(f"internal error: {type(e).__name__}: {e}")
        return executor(*args, **kwargs)


def supports(diffusion_model) -> bool:
    return isinstance(diffusion_model, UNetModel)


def install(model, settings: PruningSettings):
    m = PRUNING.install(model, settings, {"OUTER_SAMPLE": outer_sample_wrapper,
                                          "DIFFUSION_MODEL": diffusion_model_wrapper})
    patches = m.model_options["transformer_options"].get("patches", {})
    # A second node of ours replaces the first one's patches.
    for name in ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch"):
        if name in patches:
            kept = [p for p in patches[name] if not hasattr(p, "speculative_cache_pruning")]
            patches[name] = kept
    if any(patches.get(name) for name in ("attn1_patch", "attn2_patch")):
        warn_once("Speculative Cache Token Pruning: the model has other attention patches (ToMe?); put "
                  "this node after them, or the two may not combine.")
    if "attn1" in settings.layers:
        m.set_model_attn1_patch(_attention_patch("attn1"))
        m.set_model_attn1_output_patch(_output_patch("attn1"))
    if "attn2" in settings.layers:
        m.set_model_attn2_patch(_attention_patch("attn2"))
        m.set_model_attn2_output_patch(_output_patch("attn2"))
    return m
