"""SpecDiff (arXiv 2509.13848): per-token importance from the past and a look ahead, and
three tiers of tokens at a forecast step.

* history: the attention each image token *received* at the last computed step, summed
  over the blocks that measured it (the paper's his(x_i): attention scores received in
  the previous iteration). Measured on a random sample of query rows, so its cost is
  ``queries / tokens`` of one attention matmul per block.
* look ahead: how far the step's own draft forecast says the token moves since its last
  computed value, ||F^(t) - F(t_last)|| (the paper's fut(x_i) comes from a cheap
  speculative run ahead; here the draft forecast is that run: it costs nothing extra).
* tiers: the highest scores are computed for real ("compute"), the lowest reuse their
  last computed value ("reuse": the draft's extrapolation is not worth its noise where
  the token barely moves), the others take the draft forecast ("forecast").

The paper's exact weights and tier thresholds are not published: the score is the sum of
the two terms, each divided by its mean over the tokens, and the tiers are fractions of
the tokens (a known cost per step) rather than score thresholds."""

from __future__ import annotations

import torch

from .tokens import scatter_tokens


def attention_received(q: torch.Tensor, k: torch.Tensor, columns: slice, queries: int = 64,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean attention probability each key token in ``columns`` receives from the query
    tokens, over heads and a random sample of ``queries`` query rows.
    q, k [B, H, L, d] (after the rotary embedding) -> [B, len(columns)] float32."""
    b, h, length, d = q.shape
    if queries < length:
        rows = torch.randperm(length, generator=generator)[:queries].to(q.device)
        q = q.index_select(2, rows)
    scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5          # [B, H, S, L]
    probs = scores.softmax(dim=-1)
    return probs.mean(dim=(1, 2))[:, columns]


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def importance(history: torch.Tensor | None, change: torch.Tensor) -> torch.Tensor:
    """Score per token [R, N]: history (attention received, [R, N] or None when not
    measured yet) plus the look-ahead change, each relative to its mean over the tokens."""
    score = _normalised(change.float())
    if history is not None and history.shape == change.shape:
        score = score + _normalised(history.float())
    return score


def split(score: torch.Tensor, compute: float, reuse: float):
    """The tiers of the tokens of each row: indices of the ``compute`` fraction with the
    highest scores [R, Kc], and a mask [R, N] of the ``reuse`` fraction with the lowest."""
    r, n = score.shape
    kc = min(n, int(round(compute * n)))
    kr = min(n - kc, int(round(reuse * n)))
    order = score.argsort(dim=-1, descending=True)
    compute_idx = order[:, :kc]
    reuse_mask = torch.zeros(r, n, dtype=torch.bool, device=score.device)
    if kr > 0:
        reuse_mask.scatter_(1, order[:, n - kr:], True)
    return compute_idx, reuse_mask


def combine(forecast: torch.Tensor, anchor: torch.Tensor, compute_idx: torch.Tensor, fresh: torch.Tensor | None,
            reuse_mask: torch.Tensor) -> torch.Tensor:
    """The tiered feature [R, N, D]: the draft forecast, the last computed value where
    ``reuse_mask``, the freshly computed value ``fresh`` [R, Kc, D] at ``compute_idx``."""
    out = torch.where(reuse_mask[..., None], anchor.to(forecast.dtype), forecast)
    if fresh is not None and compute_idx.shape[1] > 0:
        out = scatter_tokens(out, compute_idx, fresh)
    return out
