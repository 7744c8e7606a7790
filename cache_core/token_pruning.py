"""Dynamics-aware token pruning with a token cache (DaTo, arXiv 2501.00375), for the
attention layers of U-Net models (SD1.5, SDXL).

At a pruned step an attention layer computes only the tokens whose input moved most since
they were last computed; every other token's attention output is served from the cache
(its output the last time it was computed). The keys and values still come from every
token, so a computed token attends to the whole picture. A token's reference input is
updated whenever it is computed, so a token left out accumulates movement until it is
picked again (no token goes stale for ever).

This module holds the tensor side (no ComfyUI): choosing the tokens, and putting the
computed ones back among the cached ones."""

from __future__ import annotations

import math

import torch


class TokenCache:
    """One attention layer's cache for one batch layout: each token's input when it was
    last computed (``reference``) and its output then (``output``)."""

    def __init__(self):
        self.reference: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None     # token indices of the call in flight

    def fits(self, x: torch.Tensor) -> bool:
        return (self.reference is not None and self.output is not None and self.reference.shape == x.shape
                and self.output.shape[:2] == x.shape[:2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.reference, self.output) if t is not None)


def kept_count(tokens: int, ratio: float) -> int:
    """Tokens computed at a pruned step: all but ``ratio`` of them (at least one)."""
    return max(1, tokens - int(math.floor(ratio * tokens)))


def select_dynamic(x: torch.Tensor, reference: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [B, keep] (ascending) of each row's tokens whose input moved most since
    their reference: the L2 norm over channels of x - reference."""
    movement = (x.float() - reference.float()).norm(dim=-1)
    idx = movement.topk(keep, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A copy of ``full`` [B, N, C] with ``part`` [B, K, C] written at ``idx`` [B, K]."""
    return full.scatter(1, idx[..., None].expand(-1, -1, full.shape[-1]), part.to(full.dtype))
