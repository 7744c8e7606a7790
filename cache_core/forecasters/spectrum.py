"""Spectrum's spectral forecast (CVPR 2026, arXiv 2603.01623; research/algorithms.md §12)."""

from __future__ import annotations

import torch

from .base import DTYPES, Forecaster, register


def chebyshev(x: torch.Tensor, degree: int) -> torch.Tensor:
    """T_0..T_degree at the points ``x`` (in [-1, 1]): [len(x), degree + 1], by the recurrence
    T_0 = 1, T_1 = x, T_{k+1} = 2x T_k - T_{k-1}."""
    columns = [torch.ones_like(x), x]
    for _ in range(2, degree + 1):
        columns.append(2 * x * columns[-1] - columns[-2])
    return torch.stack(columns[:degree + 1], dim=1)


def spectral_weights(times: list[float], t: float, degree: int, ridge: float) -> list[float]:
    """The weights w with F(t) ~ sum_i w_i F(t_i) of Spectrum's fit: each feature is a
    Chebyshev series in time, sum_k c_k T_k(x), whose coefficients are fitted by ridge
    regression to the computed points, c = (P^T P + lambda D)^-1 P^T F with P_ik = T_k(x_i) and D
    the identity without its first entry; the forecast is T(x)^T c, linear in the points:
    w = P (P^T P + lambda D)^-1 T(x).
    Time is mapped to x in [-1, 1] over the span of the points and ``t``. A global fit over
    the whole history, not a local expansion through the last points: its error does not
    compound with the length of the skip (the paper's argument for long skips)."""
    span = times + [t]
    lo, hi = min(span), max(span)
    scale = 2.0 / (hi - lo) if hi > lo else 0.0
    x = torch.tensor([(s - lo) * scale - 1.0 for s in span], dtype=torch.float64)
    degree = min(int(degree), len(times) - 1)
    basis = chebyshev(x, degree)
    p, target = basis[:-1], basis[-1]
    # (the constant term is not shrunk: shrinking it would pull the feature towards zero, not
    # towards a smoother curve)
    penalty = torch.eye(degree + 1, dtype=torch.float64)
    penalty[0, 0] = 0.0
    gram = p.T @ p + ridge * penalty
    return (p @ torch.linalg.solve(gram, target)).tolist()


@register
class SpectrumForecaster(Forecaster):
    """Spectrum: a Chebyshev series per feature, fitted by ridge regression over every computed
    point kept (up to ``history``), forecast far ahead (``spectral_weights``). The paper's exact
    degree and ridge strength were not available; degree 2, lambda 0.1 over the last 4 points
    here, the best of the forecast lab's grid (benchmarks/lab/forecast_lab.py, scheme
    ``spectrum``; 19-block reference model, 8 pictures, 28 steps, the noise after CFG): at the
    planned 4x schedule 37.2 dB (degree 3 over 8 points: 32.3; the engine's corrected line: 35.8),
    at 6x and 7x below the line (27.5 and 27.2 against 29.0 and 28.6 dB)."""

    name = "spectrum"
    tooltip = "spectrum (Chebyshev series, ridge fit over the whole history)"
    DEGREE = 2
    RIDGE = 0.1
    HISTORY = 4

    @classmethod
    def for_config(cls, config, curvature_allowed=None) -> Forecaster:
        return cls(cls.DEGREE, cls.RIDGE, cls.HISTORY, config.storage_dtype)

    @classmethod
    def history_points(cls, config) -> int:
        return cls.HISTORY

    def __init__(self, degree: int = DEGREE, ridge: float = RIDGE, history: int = HISTORY,
                 storage_dtype: str | None = None):
        if degree < 0 or ridge < 0 or history < 1:
            raise ValueError("degree >= 0, ridge >= 0 and history >= 1 required")
        self.degree, self.ridge, self.history = int(degree), float(ridge), int(history)
        self.storage_dtype = DTYPES[storage_dtype] if storage_dtype else None
        self.times: list[float] = []          # newest first
        self.values: list[torch.Tensor] = []
        self.value_dtype = None

    def reset(self) -> None:
        self.times, self.values = [], []

    @property
    def points(self) -> int:
        return len(self.values)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)

    def get_anchor(self) -> torch.Tensor:
        return self.values[0].to(self.value_dtype)

    def set_anchor(self, value: torch.Tensor) -> None:
        self.values[0] = value.detach().to(self.values[0].dtype).clone()

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        self.value_dtype = value.dtype
        stored = value.detach().to(self.storage_dtype or value.dtype).clone()
        if self.times and self.times[0] == t:       # the same time again (Heun, a recomputed step)
            self.values[0] = stored
            return
        self.times = [t] + self.times[:self.history - 1]
        self.values = [stored] + self.values[:self.history - 1]

    def predict(self, t: float) -> torch.Tensor:
        if not self.values:
            raise RuntimeError("forecast requested before any computed point")
        if len(self.values) == 1:
            return self.values[0].to(self.value_dtype).clone()
        weights = spectral_weights(self.times, float(t), self.degree, self.ridge)
        work = torch.float32 if self.values[0].dtype in (torch.bfloat16, torch.float16) else self.values[0].dtype
        out = torch.zeros_like(self.values[0], dtype=work)
        for w, v in zip(weights, self.values):
            out.add_(v.to(work), alpha=w)
        return out.to(self.value_dtype)
