"""The Speculative Cache Edit Region node (EEdit, arXiv 2503.10270): in inpainting and
edit workflows, only the tokens of the masked region (plus a margin) go through the
transformer's blocks at most steps; the others' attention keys and values come from the
last refresh step (see cache_core/edit_region.py for the idea).

How it hooks in, through ComfyUI's chainable mechanisms only:

* OUTER_SAMPLE wrapper: reads the sampler's noise mask (``SetLatentNoiseMask``,
  ``InpaintModelConditioning``, a painted mask); without one it does nothing. The run's
  state lives in a per-run clone of ``model_options`` and is dropped at the end.
* DIFFUSION_MODEL wrapper: decides per model call whether this step refreshes (every
  token) or is partial (the region only).
* ``patches_replace["dit"]`` block patches (chained to any patch already there): a partial
  block gets the region's image tokens, the text tokens and their rotary embeddings, and
  runs the model's own block on them; an attention override (ComfyUI's
  ``optimized_attention_override``, chained too) appends the kept keys and values of the
  other tokens. A refresh block runs on every token and the override keeps those keys
  and values. The tokens outside the region leave a partial block unchanged: their output
  is replaced by the source latent in the sampler's blend after every step anyway.

Checked at run time, never assumed: the first refresh step runs the first double and the
first single block a second time the partial way, with the keys and values it just kept;
the region's tokens must come out as in the full block, else the node steps aside for the
run with a warning. Any error redoes the call without the node.

Supported: ComfyUI's Flux model class (FLUX.1, Fill, Kontext, Chroma and their LoRAs and
ControlNets). Other models run unchanged, with one warning."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

from ...cache_core.edit_region import RefreshSchedule, partial_cost, token_mask
from ...cache_core.families import EDIT_REGION, family_of
from ...cache_core.per_thread import PerThread
from ...cache_core.schedule import step_index
from ..runtime import guard
from ..runtime.block_patch import ChainedBlockPatch, install_block_patches
from ..runtime.device_memory import budget_bytes
from ..runtime.feature import Feature, FeatureRun
from ..runtime.log import log, warn_once
from ..runtime.model_call import find_transformer_options, sampler_sigmas, sampling_sigma
from ..runtime.published import EDITS_REGION, VERIFICATION_ROWS, step_cache_active

EDIT = Feature("speculative_cache_edit", "Speculative Cache Edit Region")
CONTEXT_MODES = {"linear": 1, "reuse": 0}
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}


@dataclass(frozen=True)
class EditRegionSettings:
    margin: int = 2
    refresh_interval: int = 3
    final_refresh_steps: int = 1
    context_order: int = 1             # 0: the last refresh's keys and values; 1: linear in sigma
    node_id: str | None = None
    memory_budget_mb: int = 0          # 0: 40 % of the free memory of the model's device


@dataclass
class EditStats:
    model_calls: int = 0
    refresh_calls: int = 0
    partial_calls: int = 0
    region_tokens: int = 0
    image_tokens: int = 0
    compute_fraction: float = 1.0      # estimated: linear-layer work over an uncached run's
    self_check_error: float | None = None
    disabled: str = ""
    _cost: float = 0.0
    _evaluations: set = field(default_factory=set)
    # (MultiGPU CFG Split: the devices' calls add their counts from their own threads)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, cost: float, refresh: bool, partial: bool, evaluation):
        """One model call: its cost in full calls, whether every block ran on every token,
        whether some block ran on the region only, and which evaluation of the sampler it
        belongs to (the step cache may call the model twice for one: a verified forecast,
        then the real step)."""
        with self._lock:
            self.model_calls += 1
            self.refresh_calls += int(refresh)
            self.partial_calls += int(partial)
            self._cost += cost
            self._evaluations.add(evaluation)
            self.compute_fraction = self._cost / len(self._evaluations)

    def to_dict(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def summary(self):
        if self.disabled:
            return f"Speculative Cache Edit Region: off for this run ({self.disabled})"
        return (f"Speculative Cache Edit Region: {self.partial_calls} of {self.model_calls} model calls on "
                f"{self.region_tokens} of {self.image_tokens} image tokens; compute about "
                f"{self.compute_fraction:.3f} of uncached")


def supports(diffusion_model) -> bool:
    """Whether the registry gives the model's family the Edit Region and its blocks are
    ComfyUI's FLUX-layer blocks in their usual order."""
    if EDIT_REGION not in family_of(diffusion_model).capabilities:
        return False
    blocks = list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)
    return bool(blocks) and all(type(b) in (DoubleStreamBlock, SingleStreamBlock) for b in blocks) and \
        not any(getattr(b, "flipped_img_txt", False) for b in diffusion_model.double_blocks)


class EditRun(FeatureRun):
    """One sampling run's state: the mask, the schedule and each stream's kept context."""

    # The EditCall of the model call under way, the calling thread's own (MultiGPU CFG Split:
    # one thread per device, cache_core/per_thread.py)
    active = PerThread()

    def __init__(self, settings: EditRegionSettings, mask: torch.Tensor, sigmas, diffusion_model,
                 compute_dtype: torch.dtype = torch.float32):
        self.settings = settings
        self.mask = mask
        self.sample_sigmas = [float(s) for s in sigmas]
        self.schedule = RefreshSchedule(len(self.sample_sigmas) - 1, settings.refresh_interval,
                                        final=settings.final_refresh_steps)
        self.patch = int(getattr(diffusion_model, "patch_size", 2))
        self.n_double = len(diffusion_model.double_blocks)
        self.n_single = len(diffusion_model.single_blocks)
        self.hidden_size = int(getattr(diffusion_model, "hidden_size", 0))
        self.element_size = torch.empty((), dtype=compute_dtype).element_size()
        self.regions: dict = {}            # latent (h, w) -> (region index, outside index, grid tokens)
        self.context: dict = {}            # stream -> {block key: [(sigma, k, v), ...] oldest first}
        self.residuals: dict = {}          # stream -> {block key: residual of the outside tokens}
        self.last_refresh: dict = {}       # stream -> step
        self.text_tokens: dict = {}        # stream -> text tokens (seen by the double blocks)
        self.stats = EditStats()
        self.context_order = settings.context_order
        self.checked = set()           # the streams whose partial path was checked (once each)

    def disable(self, reason: str):
        if not self.stats.disabled:
            self.stats.disabled = reason
            log.warning("Speculative Cache Edit Region: %s; this run continues without it.", reason)
        self.context.clear()
        self.residuals.clear()

    def step_index(self, sigma: float) -> int:
        return step_index(self.sample_sigmas, sigma)

    # ---- FeatureRun ----------------------------------------------------------------------
    def published(self) -> dict:
        return {VERIFICATION_ROWS: self.verification_rows}

    def finish(self) -> None:
        self.active = None
        self.context.clear()
        self.residuals.clear()
        log.info(self.stats.summary())
        EDIT.tell(self.settings.node_id, self.stats.to_dict(), True)

    def verification_rows(self, args) -> torch.Tensor | None:
        """The token rows the step cache verifies a block on while this run edits a region of
        the same model (the region's tokens; with the text tokens in a single block): the
        others' residuals are served from the last refresh and say nothing about the forecast.
        None when no edit region acts on this call. Published to the step cache (published.py)."""
        call = self.active
        if call is None or not call.serve_outside or call.txt_len is None or call.failed:
            return None
        if "txt" in args:
            return call.inside
        return torch.cat((torch.arange(call.txt_len, device=call.inside.device), call.txt_len + call.inside))

    def region(self, hw, device):
        if hw not in self.regions:
            tokens = token_mask(self.mask, hw, self.patch, self.settings.margin)
            inside = torch.nonzero(tokens).flatten()
            outside = torch.nonzero(~tokens).flatten()
            self.regions[hw] = (inside, outside, tokens.numel())
        inside, outside, n = self.regions[hw]
        return inside.to(device), outside.to(device), n


class EditCall:
    """What the block patches do during one model call."""

    def __init__(self, run: EditRun, stream, refresh: bool, inside, outside, grid_tokens: int, sigma: float,
                 serve_outside: bool = False):
        self.run = run
        self.sigma = sigma
        self.refresh = refresh
        self.context = run.context.setdefault(stream, {})
        # With the step cache on the same model, the tokens outside the region get their
        # block's residual from the last refresh at a partial block (instead of none), so
        # the features the step cache records and verifies stay continuous there.
        self.serve_outside = serve_outside
        self.residuals = run.residuals.setdefault(stream, {}) if serve_outside else None
        self.full_blocks = 0
        self.partial_blocks = 0
        self.check_blocks = 0           # the self-check's extra partial blocks (real work too)
        self.inside, self.outside = inside, outside
        self.grid_tokens = grid_tokens
        self.stream = stream
        self.txt_len: int | None = run.text_tokens.get(stream)
        self.failed = ""

    def block(self, key, args, run_block):
        if self.failed or args.get("attn_mask") is not None:
            if args.get("attn_mask") is not None:
                self.failed = "the model uses an attention mask"
            return run_block(args)
        double = key[0] == "double_block"
        if double:
            self.txt_len = self.run.text_tokens[self.stream] = args["txt"].shape[1]
            n_img = args["img"].shape[1]
        elif self.txt_len is not None:
            n_img = args["img"].shape[1] - self.txt_len
        else:
            self.failed = "no double block before the single blocks"
            return run_block(args)
        pe_ = args.get("pe")
        if n_img < self.grid_tokens or pe_ is None or pe_.shape[2] != self.txt_len + n_img:
            self.failed = f"token layout {n_img} image tokens for a {self.grid_tokens}-token grid"
            return run_block(args)
        # Tokens past the grid (Flux Kontext's reference images) are context, like the unmasked ones.
        outside = self.outside
        if n_img > self.grid_tokens:
            extra = torch.arange(self.grid_tokens, n_img, device=outside.device)
            outside = torch.cat((outside, extra))
        if self.refresh or key not in self.context:
            check = self.stream not in self.run.checked and key in (("double_block", 0), ("single_block", 0))
            saved = {t: args[t].clone() for t in ("img", "txt") if t in args} if check else None
            image_rows = outside if double else self.txt_len + outside
            before = args["img"].index_select(1, image_rows) if self.serve_outside else None
            out = self._full(key, args, run_block, outside, n_img)
            self.full_blocks += 1
            if self.serve_outside:
                self.residuals[key] = out["img"].index_select(1, image_rows) - before
            if check:
                self._self_check(key, {**args, **saved}, run_block, out, double)
            return out
        out = self._partial(key, args, run_block, double)
        self.partial_blocks += 1
        if self.serve_outside and key in self.residuals:
            image_rows = outside if double else self.txt_len + outside
            out["img"].index_add_(1, image_rows, self.residuals[key].to(out["img"].dtype))
        return out

    # ---- refresh: every token, keep the context's keys and values ---------------------
    def _full(self, key, args, run_block, outside, n_img):
        rows = self.txt_len + outside

        def keep(q, k, v):
            kept = [e for e in self.context.get(key, []) if e[0] != self.sigma]
            kept.append((self.sigma, k.index_select(2, rows), v.index_select(2, rows)))
            self.context[key] = kept[-(self.run.context_order + 1):]
            return q, k, v
        return run_block(self._with_attention(args, keep, self.txt_len + n_img))

    # ---- partial: the region's tokens, attending to the kept context ------------------
    def _context(self, key):
        """The context's keys and values for this step: those of the last refresh, or
        (context_order 1) extrapolated linearly in sigma through the last two refreshes.
        The unmasked tokens' input is the source latent noised to this step's sigma, so
        their features move smoothly with sigma."""
        kept = self.context[key]
        s1, k1, v1 = kept[-1]
        if len(kept) < 2 or self.sigma == s1:
            return k1, v1
        s0, k0, v0 = kept[-2]
        # At most one refresh gap ahead: with the step cache on the model, refreshes land
        # only on the steps it computes, and extrapolating further cost 14 dB in a test.
        r = min((self.sigma - s1) / (s1 - s0), 1.0)
        return torch.lerp(k1, k0, -r), torch.lerp(v1, v0, -r)       # k1 + r (k1 - k0)

    def _partial(self, key, args, run_block, double):
        k_ctx, v_ctx = self._context(key)
        txt_len, idx = self.txt_len, self.inside
        rows = torch.cat((torch.arange(txt_len, device=idx.device), txt_len + idx))
        pe_ = args["pe"].index_select(2, rows)

        def extend(q, k, v):
            return q, torch.cat((k, k_ctx.to(k.dtype)), 2), torch.cat((v, v_ctx.to(v.dtype)), 2)
        sub = dict(args, pe=pe_)
        if double:
            sub["img"] = args["img"].index_select(1, idx)
        else:
            sub["img"] = args["img"].index_select(1, rows)
        out = run_block(self._with_attention(sub, extend, txt_len + idx.numel()))
        if double:
            return dict(out, img=args["img"].index_copy(1, idx, out["img"]))
        return dict(out, img=args["img"].index_copy(1, rows, out["img"]))

    def _with_attention(self, args, edit, expected_rows: int):
        """``args`` with an attention override that passes (q, k, v) through ``edit`` first
        (once per block; chained to any override already there)."""
        options = dict(args.get("transformer_options") or {})
        previous = options.get("optimized_attention_override")
        calls = []

        def override(func, *a, **kw):
            with guard.ours():
                q, k, v = a[0], a[1], a[2]
                if calls or k.ndim != 4 or not kw.get("skip_reshape") or k.shape[2] != expected_rows:
                    self.failed = f"unexpected attention layout {tuple(k.shape)} (expected {expected_rows} rows)"
                else:
                    q, k, v = edit(q, k, v)
                calls.append(1)
                a = (q, k, v, *a[3:])
            if previous is not None:
                return guard.theirs(previous, func, *a, **kw)
            return guard.theirs(func, *a, **kw)
        options["optimized_attention_override"] = override
        return dict(args, transformer_options=options)

    def _self_check(self, key, args, run_block, full_out, double):
        """The partial path, run on this refresh step's own inputs with the context it just
        kept, must give the region's tokens what the full block gave them."""
        part = self._partial(key, args, run_block, double)
        self.check_blocks += 1
        rows = self.inside if double else torch.cat(
            (torch.arange(self.txt_len, device=self.inside.device), self.txt_len + self.inside))
        a = part["img"].index_select(1, rows).float()
        b = full_out["img"].index_select(1, rows).float()
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        stats = self.run.stats
        stats.self_check_error = max(err, stats.self_check_error or 0.0)
        tolerance = SELF_CHECK_TOLERANCE.get(full_out["img"].dtype, 2e-2)
        if not err <= tolerance:
            self.failed = f"the region's tokens differ from the full block ({err:.2e} relative) in {key}"
        if key[0] == "single_block":
            self.run.checked.add(self.stream)


# ---------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------
def _noise_mask(args, kwargs):
    mask = args[4] if len(args) > 4 else kwargs.get("denoise_mask")
    return mask if isinstance(mask, torch.Tensor) else None


def _start_run(guider, settings: EditRegionSettings, args, kwargs) -> EditRun | None:
    mask = _noise_mask(args, kwargs)
    if mask is None:
        warn_once("Speculative Cache Edit Region: the latent has no noise mask (Set Latent Noise Mask, "
                  "or Inpaint Model Conditioning with noise_mask on); nothing to do, sampling unchanged.")
        return None
    diffusion_model = guider.model_patcher.get_model_object("diffusion_model")
    if not supports(diffusion_model):
        warn_once(f"Speculative Cache Edit Region: {type(diffusion_model).__name__} is not supported yet "
                  "(Flux-class models are); sampling unchanged.")
        return None
    base = guider.model_patcher.model
    # the dtype the kept keys and values are in: the compute dtype (fp8 weights compute in bf16/fp32)
    compute_dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return EditRun(settings, mask, sampler_sigmas(args, kwargs), diffusion_model, compute_dtype)


outer_sample_wrapper = EDIT.sampling_wrapper(_start_run)


def diffusion_model_wrapper(executor, *args, **kwargs):
    to = find_transformer_options(args, kwargs)
    run = EDIT.run_in(to)
    if run is None or run.stats.disabled:
        return executor(*args, **kwargs)
    x = args[0]
    try:
        if x.ndim != 4:
            run.disable(f"a {x.ndim}-D latent (image latents are 4-D)")
            return executor(*args, **kwargs)
        inside, outside, grid_tokens = run.region(tuple(x.shape[-2:]), x.device)
        sigma = sampling_sigma(to.get("sigmas", args[1]))
        step = run.step_index(sigma)
        stream = (tuple(str(u) for u in to.get("uuids") or ()), x.shape[0])
        refresh = (run.schedule.refresh(step, run.last_refresh.get(stream)) or inside.numel() == 0
                   or outside.numel() == 0)
        serve_outside = step_cache_active(to)
        if refresh and stream not in run.context:
            # A stream's first refresh allocates its kept context: check the budget before it does
            too_big = _over_budget(run, x.device, lambda points: _context_bytes(run, points) + _planned_context_bytes(
                run, x.shape[0], int(outside.numel()), points, serve_outside))
            if too_big:
                run.disable(too_big)
                return executor(*args, **kwargs)
        call = run.active = EditCall(run, stream, refresh, inside, outside, grid_tokens, sigma,
                                     serve_outside=serve_outside)
    except Exception as e:
        if guard.passes_through(e):
            raise
        run.disable(f"internal error: {type(e).__name__}: {e}")
        return executor(*args, **kwargs)
    attempt_args, attempt_kwargs = guard.private_inputs(args, kwargs)
    try:
        out = guard.theirs(executor, *attempt_args, **attempt_kwargs)
    except Exception as e:
        # The model's or ComfyUI's own error (out of memory, the graph's shapes) reaches the user
        # unchanged and is not run twice; an error of ours (a block patch, the attention edit)
        # ends the region for the run and the call is made again on its intact inputs.
        if guard.passes_through(e):
            raise
        run.active = None
        run.disable(f"internal error: {type(e).__name__}: {e}")
        return executor(*args, **kwargs)
    finally:
        run.active = None
    if not call.failed and refresh:
        # (what was really kept: reference-image tokens past the grid are context too)
        call.failed = _over_budget(run, x.device, lambda points: _context_bytes(run, points))
    if call.failed:
        run.disable(call.failed)
        if not refresh:
            return executor(*args, **kwargs)   # this call's partial output is not trusted
    run.stats.region_tokens, run.stats.image_tokens = int(inside.numel()), int(grid_tokens)
    blocks = run.n_double + run.n_single
    refreshed = call.full_blocks >= blocks      # (a verification block may have run before the rest)
    if refreshed:
        # Every block refreshed. (With the step cache on the model, a step it forecasts runs
        # at most its verification block: the refresh then waits for the next computed step.)
        run.last_refresh[stream] = step
    share = partial_cost(call.txt_len or 0, inside.numel(), grid_tokens)
    run.stats.add((call.full_blocks + (call.partial_blocks + call.check_blocks) * share) / blocks,
                  refreshed, call.partial_blocks > 0, (stream, sigma))
    return out


def _context_bytes(run: EditRun, points: int) -> int:
    """Bytes of the kept context with ``points`` refreshes kept per block (projected from
    what is kept now), plus the served residuals."""
    per_point = sum(t.numel() * t.element_size() for blocks in run.context.values() for kept in blocks.values()
                    for _, *kv in kept[-1:] for t in kv)
    served = sum(t.numel() * t.element_size() for blocks in run.residuals.values() for t in blocks.values())
    return per_point * points + served


def _planned_context_bytes(run: EditRun, batch: int, outside_tokens: int, points: int, serve_outside: bool) -> int:
    """Bytes the context will take, before any of it is kept: per block and kept refresh, the
    keys and values of the outside tokens (the text's are computed with the region's); plus,
    when the step cache serves the outside, one residual of the outside tokens per block.
    (Tokens past the grid, Kontext's reference images, are counted after the refresh.)"""
    blocks = run.n_double + run.n_single
    width = batch * run.hidden_size * run.element_size
    kept = 2 * outside_tokens * width * blocks * points
    return kept + (outside_tokens * width * blocks if serve_outside else 0)


def _over_budget(run: EditRun, device, context_bytes) -> str:
    """Why the context (``context_bytes(refreshes kept)``) does not fit the memory budget ('' when
    it does). Linear context keeps two refreshes: when two do not fit, the run keeps one
    (reuse), with a warning; when one does not fit either, the node steps aside for the run."""
    budget = budget_bytes(run.settings.memory_budget_mb, device)
    if budget is None or context_bytes(run.context_order + 1) <= budget:
        return ""
    if run.context_order > 0:
        warn_once(f"Speculative Cache Edit Region: linear context needs about "
                  f"{context_bytes(run.context_order + 1) / 2**20:.0f} MiB, over the budget of "
                  f"{budget / 2**20:.0f} MiB; keeping one refresh (context 'reuse').")
        run.context_order = 0
        for blocks in run.context.values():
            for key, kept in blocks.items():
                blocks[key] = kept[-1:]
        if context_bytes(1) <= budget:
            return ""
    return (f"the kept keys and values need {context_bytes(1) / 2**20:.1f} MiB, over the budget of "
            f"{budget / 2**20:.1f} MiB")


class EditBlockPatch(ChainedBlockPatch):
    """The edit region's block patch: does nothing unless an edit run is active. Inside the step
    cache's patch (which decides whether the blocks run at all)."""

    feature = EDIT.name
    rank = 1

    def act(self, args, extra):
        run = EDIT.run_in(args.get("transformer_options"))
        call = run.active if run is not None else None
        if call is None:
            return self._run(args, extra)
        return call.block(self.key, args, lambda a: self._run(a, extra))


def install(model, settings: EditRegionSettings):
    """A clone of ``model`` with the edit region installed."""
    m = EDIT.install(model, settings, {"OUTER_SAMPLE": outer_sample_wrapper,
                                       "DIFFUSION_MODEL": diffusion_model_wrapper})
    m.model_options["transformer_options"][EDITS_REGION] = True
    dm = m.get_model_object("diffusion_model")
    if supports(dm):
        keys = [("double_block", i) for i in range(len(dm.double_blocks))] + \
               [("single_block", i) for i in range(len(dm.single_blocks))]
        install_block_patches(m, keys, EditBlockPatch)
    return m
