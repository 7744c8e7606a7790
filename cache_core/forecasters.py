"""Forecasters: given features computed at a few points of the time axis, predict them
at a new time.

Interface: ``update(t, value)`` at a computed point, ``predict(t)`` at a new one.
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Forecaster:
    """One feature tensor's history and its forecast."""

    def update(self, t: float, value: torch.Tensor) -> None:
        raise NotImplementedError

    def predict(self, t: float) -> torch.Tensor:
        raise NotImplementedError

    @property
    def points(self) -> int:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class TaylorForecaster(Forecaster):
    """Polynomial forecast of order ``order`` through the last ``order + 1`` computed
    points, on their actual (possibly non-uniform) times.

    Stored as Newton divided differences with the newest node first:
    ``D_j = f[t_0, ..., t_j]``, and the forecast is

        F(t) = sum_j D_j * prod_{i<j} (t - t_i)                       (Newton form)

    which is exact for polynomials of degree <= order at any spacing. With uniform
    spacing D_j * j! * h^j is TaylorSeer's j-th finite difference (arXiv 2503.06923,
    eq. 5), so order 1 is TaylorSeer's first-order forecast; unlike TaylorSeer's power
    series it stays exact when the sampler's schedule is shifted or Karras-spaced.
    Order 0 is plain reuse (FORA). The order ramps up as points accumulate.
    """

    def __init__(self, order: int, storage_dtype: str | None = None):
        if order < 0:
            raise ValueError("order must be >= 0")
        self.order = int(order)
        self.storage_dtype = _DTYPES[storage_dtype] if storage_dtype else None
        self.times: list[float] = []          # newest first
        self.diffs: list[torch.Tensor] = []   # diffs[j] = f[t_0..t_j]
        self.value_dtype: torch.dtype | None = None

    @property
    def points(self) -> int:
        return len(self.diffs)

    def reset(self) -> None:
        self.times.clear()
        self.diffs.clear()
        self.value_dtype = None

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diffs)

    def _work(self, d: torch.Tensor) -> torch.Tensor:
        # Arithmetic in at least float32: differences of nearby features cancel.
        return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d

    def _store(self, d: torch.Tensor) -> torch.Tensor:
        return d.to(self.storage_dtype or self.value_dtype)

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        value = value.detach()
        self.value_dtype = value.dtype
        new = self._work(value)
        if new is value:
            new = value.clone()  # never keep a reference the caller may change in place
        if self.times and abs(t - self.times[0]) <= 1e-9 * max(1.0, abs(t)):
            # Same time as the newest node (e.g. Heun evaluates twice at one sigma):
            # replace its value. Changing f(t_0) by delta changes f[t_0..t_j] by
            # delta / prod_{i=1..j} (t_0 - t_i).
            delta = new - self._work(self.diffs[0])
            updated = [self._store(new)]
            scale = 1.0
            for j in range(1, len(self.diffs)):
                scale *= (self.times[0] - self.times[j])
                updated.append(self._store(self._work(self.diffs[j]) + delta / scale))
            self.diffs = updated
            return
        # New node t in front: D'_0 = F, D'_j = (D'_{j-1} - D_{j-1}) / (t - t_{j-1}) where
        # t_{j-1} is the (j-1)-th node of the old table (the old newest is j-1 = 0).
        keep = min(len(self.diffs), self.order)
        updated = [new]
        for j in range(1, keep + 1):
            updated.append((updated[j - 1] - self._work(self.diffs[j - 1])) / (t - self.times[j - 1]))
        self.diffs = [self._store(d) for d in updated]
        self.times = [t] + self.times[:keep]

    def predict(self, t: float) -> torch.Tensor:
        if not self.diffs:
            raise RuntimeError("forecast requested before any computed point")
        t = float(t)
        out = self._work(self.diffs[0]).clone()
        basis = 1.0
        for j in range(1, len(self.diffs)):
            basis *= (t - self.times[j - 1])
            out.add_(self._work(self.diffs[j]), alpha=basis)
        return out.to(self.value_dtype)


def make_forecaster(config) -> Forecaster:
    """The forecaster a CacheConfig asks for."""
    return TaylorForecaster(config.order, config.storage_dtype)
