"""HiCache's Hermite-basis forecast (arXiv 2508.16984)."""

from __future__ import annotations

import torch

from .base import Forecaster, register
from .taylor import TaylorForecaster


@register
class HermiteForecaster(TaylorForecaster):
    """HiCache (arXiv 2508.16984): the Taylor power basis x^k/k! is replaced by the scaled
    Hermite basis sigma^k H_k(sigma x) / k! ("dual scaling"), physicists' Hermite
    polynomials H_0 = 1, H_1 = 2z, H_{k+1} = 2z H_k - 2k H_{k-1}.

        F(x) = F_0 + sum_{k>=1} sigma^k / k! * H_k(sigma x) * d_k

    x is the distance to the newest computed point in units of the last gap between
    computed points, and d_k = k! f[t_0..t_k] g^k the k-th derivative in those units,
    estimated from the same divided differences as the Taylor forecaster (g = t_0 - t_1).
    With sigma = 1/sqrt(2) the basis is the probabilists' Hermite He_k(x)."""

    name = "hicache"
    tooltip = "hicache (Hermite basis, damped)"

    @classmethod
    def for_config(cls, config, curvature_allowed=None) -> Forecaster:
        return cls(max(config.order, 1), config.hicache_scale, config.storage_dtype)

    @classmethod
    def history_points(cls, config) -> int:
        return max(config.order, 1) + 1

    def __init__(self, order: int, scale: float = 0.7, storage_dtype: str | None = None):
        super().__init__(order, storage_dtype)
        self.scale = float(scale)

    @staticmethod
    def hermite(k: int, z: float) -> float:
        h_prev, h = 1.0, 2.0 * z
        if k == 0:
            return h_prev
        for n in range(1, k):
            h_prev, h = h, 2.0 * z * h - 2.0 * n * h_prev
        return h

    def predict(self, t: float) -> torch.Tensor:
        if not self.diffs:
            raise RuntimeError("forecast requested before any computed point")
        out = self._work(self.diffs[0]).clone()
        if len(self.diffs) < 2:
            return out.to(self.value_dtype)
        g = self.times[0] - self.times[1]
        x = (float(t) - self.times[0]) / g
        s = self.scale
        for k in range(1, len(self.diffs)):
            # sigma^k / k! * H_k(sigma x) * (k! f[t_0..t_k] g^k)
            coeff = (s ** k) * self.hermite(k, s * x) * (g ** k)
            out.add_(self._work(self.diffs[k]), alpha=coeff)
        return out.to(self.value_dtype)
