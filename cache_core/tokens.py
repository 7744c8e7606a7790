"""Token rows of a [B, N, C] feature: take some out, put some back. Shared by the token
methods (DaTo's token pruning, SpecDiff's token tiers, ClusCa's representatives)."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` [B, K] of ``x`` [B, N, C]: [B, K, C]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A copy of ``full`` [B, N, C] with ``part`` [B, K, C] written at ``idx`` [B, K]."""
    return full.scatter(1, idx[..., None].expand(-1, -1, full.shape[-1]), part.to(full.dtype))
