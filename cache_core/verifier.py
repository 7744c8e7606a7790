"""SpeCa verification (arXiv 2509.11628): compare a forecast with a cheap real
computation of the same quantity and accept or reject it."""

from __future__ import annotations

import math

import torch


def relative_l1(pred: torch.Tensor, real: torch.Tensor, eps: float = 1e-10) -> float:
    """SpeCa's element-wise relative L1: mean(|pred - real| / (|real| + eps)).

    Dominated by near-zero elements and often >> 1; this is the metric the paper's
    thresholds (FLUX base 7.0) refer to. Invariant to a per-channel gate, so the
    un-gated and the gated block output give the same value."""
    p, r = pred.detach().float(), real.detach().float()
    return float(((p - r).abs() / (r.abs() + eps)).mean())


def relative_norm(pred: torch.Tensor, real: torch.Tensor, eps: float = 1e-12) -> float:
    """Scale-free norm ratio ||pred - real||_2 / ||real||_2 (0.05 = 5 % error)."""
    p, r = pred.detach().float(), real.detach().float()
    return float(torch.linalg.vector_norm(p - r) / (torch.linalg.vector_norm(r) + eps))


def relative_change(pred: torch.Tensor, real: torch.Tensor, anchor: torch.Tensor, floor: float = 1e-3) -> float:
    """How much of the feature's movement since the last computed step the forecast missed:
    ||pred - real|| / ||real - anchor||, the anchor being the value at that step. Reusing
    the anchor scores exactly 1 at any scale, so the threshold means the same on models
    whose features have other scales and speeds (0.3 = the forecast is 3x closer than
    reuse). A feature that barely moved (under ``floor`` of its norm) counts as having
    moved ``floor``, so a near-still feature does not turn every tiny error into a
    rejection."""
    p, r, a = pred.detach().float(), real.detach().float(), anchor.detach().float()
    moved = torch.linalg.vector_norm(r - a)
    floor_norm = floor * torch.linalg.vector_norm(r)
    return float(torch.linalg.vector_norm(p - r) / (torch.maximum(moved, floor_norm) + 1e-12))


_METRICS = {"relative_l1": relative_l1, "relative_norm": relative_norm, "relative_change": relative_change}
NEEDS_ANCHOR = {"relative_change"}


# The metrics as sums over elements, for a tensor split between ranks (sequence parallelism):
# the ranks add up their shards' sums (agreement.RankAgreement.sum_shards) and every rank gets
# the metric of the whole tensor. On one process the metrics above are used as they are.
def metric_sums(metric: str, pred: torch.Tensor, real: torch.Tensor, anchor: torch.Tensor | None = None,
                eps: float = 1e-10) -> torch.Tensor:
    p, r = pred.detach().double(), real.detach().double()
    if metric == "relative_l1":
        return torch.stack([((p - r).abs() / (r.abs() + eps)).sum(), torch.tensor(float(p.numel()), dtype=torch.float64)])
    if metric == "relative_norm":
        return torch.stack([(p - r).square().sum(), r.square().sum()])
    if anchor is None or anchor.shape != real.shape:
        return torch.full((3,), float("inf"), dtype=torch.float64)
    a = anchor.detach().double()
    return torch.stack([(p - r).square().sum(), (r - a).square().sum(), r.square().sum()])


def metric_from_sums(metric: str, sums: torch.Tensor, floor: float = 1e-3) -> float:
    s = [float(v) for v in sums]
    if metric == "relative_l1":
        return s[0] / max(s[1], 1.0)
    if metric == "relative_norm":
        return math.sqrt(s[0]) / (math.sqrt(s[1]) + 1e-12)
    if not all(math.isfinite(v) for v in s):
        return float("inf")
    return math.sqrt(s[0]) / (max(math.sqrt(s[1]), floor * math.sqrt(s[2])) + 1e-12)


class Verifier:
    """Error metric plus the threshold schedule tau(p) = max(base * decay**p, floor)."""

    def __init__(self, metric: str, threshold: float, decay: float = 1.0, floor: float = 0.0):
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {sorted(_METRICS)}")
        self.metric_name = metric
        self.metric = _METRICS[metric]
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.floor = float(floor)

    def threshold_at(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        return max(self.threshold * self.decay ** p, self.floor)

    @property
    def needs_anchor(self) -> bool:
        return self.metric_name in NEEDS_ANCHOR

    def error(self, pred: torch.Tensor, real: torch.Tensor, anchor: torch.Tensor | None = None) -> float:
        if self.needs_anchor:
            if anchor is None or anchor.shape != real.shape:
                return float("inf")     # cannot be judged: a rejection
            return self.metric(pred, real, anchor)
        return self.metric(pred, real)

    def sharded_error(self, pred: torch.Tensor, real: torch.Tensor, anchor: torch.Tensor | None, agreement) -> float:
        """``error`` of a tensor whose tokens are split between the ranks of ``agreement``'s
        sequence group: every rank gets the error of the whole tensor."""
        return metric_from_sums(self.metric_name, agreement.sum_shards(metric_sums(self.metric_name, pred, real, anchor)))

    def accepts(self, error: float, progress: float) -> bool:
        """A non-finite error, or any error at a zero threshold, is a rejection."""
        return self.accepts_below(error, self.threshold_at(progress))

    @staticmethod
    def accepts_below(error: float, tau: float) -> bool:
        if not math.isfinite(error) or tau <= 0.0:
            return False
        return error <= tau
