"""Ranks that run one picture together take the same decisions.

Under sequence parallelism (raylight's USP mode, xDiT) each process (rank) holds a shard of the
image's tokens and the attention gathers the rest; under FSDP every rank runs the same step on
the same input. Either way the ranks meet in collectives inside every model call: a rank that
forecast a step while another computed it would wait forever for its peer. Whatever the cache
decides from a tensor the block patches see (a probe's verification error, a forecast that is
not finite) is therefore agreed on before it is used:

* over the **sequence group** (the ranks that share one image's tokens), a metric's sums are
  added up (``sum_shards``), so the error is that of the whole image, as on one device;
* over **every rank**, the result is made identical (``worst``: the maximum; ``any``), so that
  even ranks that hold different data (a different shard, cond on one rank and uncond on
  another) take one decision (cache-dit reduces its residual difference, raylight takes the
  maximum of its change metrics; research/peers.md §15).

Agreement is on when a sequence group is known: xDiT's (``xfuser.core.distributed.get_sp_group()``,
as raylight uses it) when xfuser is loaded and splits the sequence, or the one an integration
registered with ``use_sequence_group``. A collective that only some processes reach would hang the
others, so without a known group nothing is reduced, even where ``torch.distributed`` is
initialised for something else: ``SPECULATIVE_CACHE_RANKS=agree`` turns agreement on over every
rank (each rank's error is then its own data's and the ranks take the worst; for ranks that run in
lockstep without a known sequence group), ``SPECULATIVE_CACHE_RANKS=independent`` turns it off.
Without ``torch.distributed`` initialised, or with one rank, nothing is reduced and nothing is
called."""

from __future__ import annotations

import os
import sys

import torch

_registered_group = None


def use_sequence_group(group) -> None:
    """Register the process group whose ranks hold shards of one image's tokens (None: forget
    it). For sequence-parallel integrations other than xDiT/raylight."""
    global _registered_group
    _registered_group = group


def _distributed():
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _xfuser_sequence_group():
    """xDiT's sequence-parallel group, when xfuser is loaded and splits the sequence."""
    module = sys.modules.get("xfuser.core.distributed")
    if module is None:
        return None
    try:
        if module.get_sequence_parallel_world_size() <= 1:
            return None
        return module.get_sp_group().device_group
    except Exception:       # xfuser loaded but its parallel state not initialised
        return None


class RankAgreement:
    """The collectives that make the ranks' decisions one (inactive: identity, no call)."""

    def __init__(self, dist=None, sequence_group=None):
        self.dist = dist
        self.sequence_group = sequence_group

    @classmethod
    def from_environment(cls) -> "RankAgreement":
        dist = _distributed()
        wish = os.environ.get("SPECULATIVE_CACHE_RANKS", "").lower()
        if dist is None or wish == "independent" or dist.get_world_size() <= 1:
            return cls()
        group = _xfuser_sequence_group() or _registered_group
        if group is None and wish != "agree":
            return cls()
        return cls(dist, group)

    @property
    def active(self) -> bool:
        return self.dist is not None

    @property
    def shards(self) -> bool:
        """Whether a metric's sums are added up over a sequence group."""
        return self.active and self.sequence_group is not None

    def _device(self, group):
        if self.dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum_shards(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` (float64, one per quantity) added up over the sequence group."""
        if not self.shards:
            return sums
        t = sums.detach().to(self._device(self.sequence_group), torch.float64).clone()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.sequence_group)
        return t.cpu()

    def worst(self, values: list[float]) -> list[float]:
        """Each value's maximum over every rank (NaN counts as infinite)."""
        if not self.active or not values:
            return list(values)
        t = torch.tensor([v if v == v else float("inf") for v in values], dtype=torch.float64,
                         device=self._device(None))
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """Whether any rank says so."""
        if not self.active:
            return bool(flag)
        return self.worst([1.0 if flag else 0.0])[0] > 0.0


__all__ = ["RankAgreement", "use_sequence_group"]
