"""Block granularity (TaylorSeer, arXiv 2503.06923): every block's attention and MLP
outputs before the gate are stored at computed steps and forecast at the others; the
residual stream still flows block by block with the live adaLN gates of this step:

    double block:  img += gate1 * A_img^ ;  img += gate2 * M_img^   (same for txt)
    single block:  x   += gate  * T^        (T = linear2 output)

At computed steps the original block runs unchanged; its pre-gate outputs are captured
with forward hooks that exist only for that call. ClusCa (arXiv 2509.10312) refreshes
the image MLP of the double blocks at forecast steps with one real token per cluster;
SpecDiff's token tiers (arXiv 2509.13848, cache_core/token_tiers.py) compute its most
important tokens for real and let its least important ones reuse their last value.

Supported blocks: ComfyUI's FLUX / HunyuanVideo DoubleStreamBlock and SingleStreamBlock
(comfy.ldm.flux.layers)."""

from __future__ import annotations

import contextlib

import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock, apply_mod

from ...cache_core import token_tiers
from ...cache_core.families import BLOCK_GRANULARITY, family_of
from ...cache_core.clustering import kmeans, pick_representatives, propagate
from ...cache_core.tokens import gather_tokens
from ..runtime import guard

CAPTURE = {
    "double_block": {"img_attn": "img_attn.proj", "img_mlp": "img_mlp", "txt_attn": "txt_attn.proj",
                     "txt_mlp": "txt_mlp"},
    "single_block": {"total": "linear2"},
}
ATTR = {"double_block": "double_blocks", "single_block": "single_blocks"}


def supports(diffusion_model) -> bool:
    """Whether the registry gives the model's family block granularity and its blocks are
    ComfyUI's FLUX-layer blocks, whose submodules this module reads."""
    if BLOCK_GRANULARITY not in family_of(diffusion_model).capabilities:
        return False
    blocks = list(getattr(diffusion_model, "double_blocks", []) or []) + \
        list(getattr(diffusion_model, "single_blocks", []) or [])
    return bool(blocks) and all(type(b) in (DoubleStreamBlock, SingleStreamBlock) for b in blocks)


@contextlib.contextmanager
def capture(block, names: dict):
    """Forward hooks on ``block``'s submodules for one call; yields {name: output}."""
    got, handles = {}, []
    try:
        for name, path in names.items():
            module = block.get_submodule(path)
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: got.__setitem__(name, out.detach().clone())))
        yield got
    finally:
        for h in handles:
            h.remove()


def checked_prediction(call, feature: str, like: torch.Tensor):
    """The forecast of ``feature`` for this call's chunk, in ``like``'s dtype; None (and
    ``call.failed`` set, so the step is computed) when its shape no longer fits or it is
    not finite. Among ranks that run one picture together (``run.agreement``) a failure must
    not change which blocks run on this rank alone: zeros stand in, the call goes on as on
    the other ranks, and the ranks agree afterwards to compute the step."""
    pred = call.chunk.predict(feature)
    if pred.shape != like.shape:
        call.failed = f"layout changed: {tuple(pred.shape)} vs {tuple(like.shape)}"
    elif not bool(torch.isfinite(pred).all()):
        call.failed = "non-finite forecast"
        call.ctx.run.count(nonfinite=1)
    else:
        return pred.to(like.dtype)
    return torch.zeros_like(like) if call.ctx.run.agreement.active else None


def stops_at_failure(call) -> bool:
    """Whether a failed forecast call stops running blocks (on one process it does; ranks keep
    the other ranks' control flow, see ``checked_prediction``)."""
    return bool(call.failed) and not call.ctx.run.agreement.active


def double_block_modulation(blk, vec):
    """((img_mod1, img_mod2), (txt_mod1, txt_mod2)) of a double block: from its own
    modulation layers, or precomputed in ``vec`` (ComfyUI 0.8.0's Chroma and Flux.2 build
    the blocks with ``modulation=False`` and pass the modulation tuples as ``vec``)."""
    if getattr(blk, "img_mod", None) is not None:
        return blk.img_mod(vec), blk.txt_mod(vec)
    return vec


def single_block_modulation(blk, vec):
    """The single block's modulation (shift, scale, gate), from its layer or from ``vec``."""
    layer = getattr(blk, "modulation", None)
    if isinstance(layer, torch.nn.Module):
        return layer(vec)[0]
    return vec


def _gate(tensor, gate, dims):
    return apply_mod(tensor, gate, None, dims)


class BlockwiseCall:
    """What the block patches do during one model call at block granularity."""

    def __init__(self, ctx, chunk, forecast: bool, verify: bool, model):
        self.ctx = ctx
        # The diffusion model this call runs: under MultiGPU CFG Split each device has its own
        # deep clone, and a call's hooks must go on its own clone's blocks (on the first
        # clone they would capture another thread's outputs)
        self.model = model
        self.generator = ctx.generator_for(chunk.keys)
        self.chunk = chunk
        self.forecast = forecast
        self.verify = verify
        self.config = ctx.run.config
        self.keys = ctx.adapter.plan.keys
        self.last_key = self.keys[-1]
        doubles = [k for k in self.keys if k[0] == "double_block"]
        self.cluster_key = doubles[-1] if doubles else None
        self.fired: list = []
        self.failed = ""
        self.rejected = False
        self.received = None      # token tiers: attention received, summed over double blocks

    def module(self, key):
        return getattr(self.model, ATTR[key[0]])[key[1]]

    @staticmethod
    def feature(key, name):
        return f"{key[0]}{key[1]}.{name}"

    # ---- full ----------------------------------------------------------------------
    def block(self, key, args, run_block):
        """``run_block(args)`` runs the block (the next patch in the chain) on ``args``."""
        key = tuple(key)
        if key[0] not in CAPTURE:
            self.fired.append(key)
            return run_block(args)
        if self.forecast:
            return self._forecast_block(key, args, run_block)
        self.fired.append(key)
        names = CAPTURE[key[0]]
        measure = self.config.token_tiers and key[0] == "double_block"
        with capture(self.module(key), names) as got:
            out = run_block(self._measuring_attention(key, args) if measure else args)
        self.chunk.add_units(1.0)
        if len(got) == len(names):
            self.chunk.record({self.feature(key, n): got[n] for n in names})
        if self.config.method == "clusca" and key == self.cluster_key:
            self._cluster(out["img"])
        if measure and key == self.cluster_key:
            self._keep_received()
        return out

    def _measuring_attention(self, key, args):
        """``args`` with an attention override (chained to any already there) that adds the
        attention each image token receives in this block to ``self.received``."""
        options = dict(args.get("transformer_options") or {})
        previous = options.get("optimized_attention_override")
        n_img, n_txt = args["img"].shape[1], args["txt"].shape[1]
        img_first = bool(getattr(self.module(key), "flipped_img_txt", False))
        columns = slice(0, n_img) if img_first else slice(n_txt, n_txt + n_img)

        def override(func, *a, **kw):
            with guard.ours():
                q, k = a[0], a[1]
                if kw.get("skip_reshape") and k.ndim == 4 and k.shape[2] == n_img + n_txt and q.shape == k.shape:
                    got = token_tiers.attention_received(q.detach(), k.detach(), columns,
                                                         generator=self.generator)
                    self.received = got if self.received is None or self.received.shape != got.shape \
                        else self.received + got
            if previous is not None:
                return guard.theirs(previous, func, *a, **kw)
            return guard.theirs(func, *a, **kw)
        options["optimized_attention_override"] = override
        return dict(args, transformer_options=options)

    def _keep_received(self):
        if self.received is not None:
            for stream, rows in zip(self.chunk.streams(), self.chunk.split(self.received)):
                stream.aux["attention_received"] = rows
        self.received = None

    def _cluster(self, img):
        """K-means of the image tokens after the last double block, per stream and row,
        warm-started from the previous computed step's centroids."""
        gen = self.generator
        for stream, rows in zip(self.chunk.streams(), self.chunk.split(img)):
            labels, cent = kmeans(rows, self.config.clusters, init=stream.aux.get("centroids"), generator=gen)
            stream.aux["labels"], stream.aux["centroids"] = labels, cent

    # ---- forecast ------------------------------------------------------------------
    def _pred(self, key, name, like):
        return checked_prediction(self, self.feature(key, name), like)

    def _forecast_block(self, key, args, run_block):
        passthrough = {t: args[t] for t in ("img", "txt") if t in args}
        if stops_at_failure(self):
            return passthrough
        blk = self.module(key)
        if key == self.last_key and self.verify:
            with capture(blk, CAPTURE[key[0]]) as got:
                out = run_block(args)
            self.chunk.add_units(1.0)
            name = "total" if key[0] == "single_block" else "img_mlp"
            real = got.get(name)
            pred = None if real is None else self._pred(key, name, real)
            if pred is not None and not self.chunk.verify(pred, real, self.feature(key, name)):
                self.rejected = True
            return out
        if key[0] == "single_block":
            mod = single_block_modulation(blk, args["vec"])
            total = self._pred(key, "total", args["img"])
            if total is None:
                return passthrough
            return {"img": args["img"] + _gate(total, mod.gate, args.get("modulation_dims"))}
        (im1, im2), (tm1, tm2) = double_block_modulation(blk, args["vec"])
        dims_i, dims_t = args.get("modulation_dims_img"), args.get("modulation_dims_txt")
        preds = {n: self._pred(key, n, args["img" if n.startswith("img") else "txt"]) for n in CAPTURE[key[0]]}
        if any(p is None for p in preds.values()):
            return passthrough
        img = args["img"] + _gate(preds["img_attn"], im1.gate, dims_i)
        if self.config.method == "clusca" and dims_i is None:
            refreshed = self._clusca_mlp(key, blk, img, im2)
            if refreshed is not None:
                preds["img_mlp"] = refreshed
        if self.config.token_tiers and dims_i is None:
            preds["img_mlp"] = self._tiered_mlp(key, blk, img, im2, preds["img_mlp"])
        img = img + _gate(preds["img_mlp"], im2.gate, dims_i)
        txt = args["txt"] + _gate(preds["txt_attn"], tm1.gate, dims_t)
        txt = txt + _gate(preds["txt_mlp"], tm2.gate, dims_t)
        return {"img": img, "txt": txt}

    def _clusca_mlp(self, key, blk, img, mod2):
        """One real token per cluster through this block's image MLP; the cached MLP
        output (factor 0) of every token moves towards its cluster's fresh value."""
        name = self.feature(key, "img_mlp")
        streams = self.chunk.streams()
        if not all("labels" in s.aux for s in streams):
            return None
        parts = []
        for i, (stream, rows) in enumerate(zip(streams, self.chunk.split(img))):
            labels = stream.aux["labels"]
            if labels.shape != rows.shape[:2]:
                return None
            sl = slice(i * self.chunk.rows, (i + 1) * self.chunk.rows)
            scale = (1 + mod2.scale)[sl] if mod2.scale.shape[0] == img.shape[0] else 1 + mod2.scale
            shift = mod2.shift[sl] if mod2.shift.shape[0] == img.shape[0] else mod2.shift
            forecaster = stream.forecasters[name]
            k = stream.aux["centroids"].shape[1]
            forecaster.set_anchor(refresh_mlp_anchor(blk, rows, labels, k, scale, shift, forecaster.get_anchor(),
                                                     self.config.gamma, self.generator))
            parts.append(forecaster.predict(self.chunk.run.time))
            self.chunk.add_units(k / max(rows.shape[1], 1) * 0.5)   # about half a block's work per token
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return out.to(img.dtype)

    def _tiered_mlp(self, key, blk, img, mod2, forecast):
        """SpecDiff's tiers for this block's image MLP output: score every token by the
        attention it received at the last computed step plus the change the forecast
        predicts for it; compute the top ``token_compute`` fraction for real (this step's
        modulation, the forecast attention's residual stream), reuse the last computed value
        for the bottom ``token_reuse`` fraction, forecast the rest."""
        name = self.feature(key, "img_mlp")
        anchor = self.chunk.anchor(name)
        if anchor.shape != forecast.shape:
            return forecast
        history = [s.aux.get("attention_received") for s in self.chunk.streams()]
        history = None if any(h is None for h in history) else torch.cat(history, 0)
        change = (forecast.float() - anchor.float()).norm(dim=-1)
        compute_idx, reuse_mask = token_tiers.split(token_tiers.importance(history, change),
                                                    self.config.token_compute, self.config.token_reuse)
        fresh = None
        if compute_idx.shape[1] > 0:
            fresh = image_mlp_on_tokens(blk, img, compute_idx, mod2)
            self.chunk.add_units(compute_idx.shape[1] / max(img.shape[1], 1) * 0.5)
        computed, reused = int(compute_idx.numel()), int(reuse_mask.sum())
        self.chunk.run.count(tokens_computed=computed, tokens_reused=reused,
                             tokens_forecast=reuse_mask.numel() - reused - computed)
        return token_tiers.combine(forecast, anchor, compute_idx, fresh, reuse_mask)


def image_mlp_on_tokens(blk, img, idx, mod2):
    """A double block's image MLP (pre-gate) on the tokens ``idx`` [B, K] of the residual
    stream ``img`` [B, N, D], with this step's modulation ``mod2``: [B, K, D]."""
    tokens = gather_tokens(img, idx)
    return blk.img_mlp(torch.addcmul(mod2.shift, blk.img_norm2(tokens), 1 + mod2.scale))


def refresh_mlp_anchor(blk, rows, labels, k, scale, shift, anchor, gamma, generator):
    """ClusCa's partial recomputation for one stream: pick one token per cluster, run the
    block's image MLP on those tokens only (with this step's modulation), and propagate
    (clustering.propagate). rows [R, N, D] is the residual stream after the forecast
    attention; returns the refreshed anchor [R, N, D]."""
    idx = pick_representatives(labels, k, generator)
    tokens = gather_tokens(rows, idx)
    fresh = blk.img_mlp(torch.addcmul(shift, blk.img_norm2(tokens), scale))
    return propagate(anchor, labels, idx, fresh, gamma)
