"""FoCa's forecast-then-calibrate view (arXiv 2508.16211) as a predictor-corrector."""

from __future__ import annotations

import torch

from .base import Forecaster, register
from .taylor import TaylorForecaster


@register
class FoCaForecaster(TaylorForecaster):
    """Forecast-then-calibrate (FoCa, arXiv 2508.16211) seen as an ODE solver on the
    feature trajectory dF/dt = v(t). The paper's equations were not available; this is a
    derivation from its abstract's view (research notes 7):

    * velocity samples: the secant slopes of the last K computed points, each at the
      midpoint of its interval (exact derivatives there for a quadratic trajectory);
    * v(t): a straight line fitted to those samples by least squares (K - 1 >= 2
      samples: the history is integrated, not interpolated, which damps noise at large
      forecast gaps);
    * predictor: explicit Euler, F_p = F_0 + (t - t_0) v(t_0);
    * corrector (Heun / trapezoid): F_c = F_0 + (t - t_0) (v(t_0) + v(t)) / 2.

    Exact for quadratic trajectories; the predictor alone is first order."""

    name = "foca"
    tooltip = "foca (velocity fit + Heun corrector)"
    HISTORY = 4

    @classmethod
    def for_config(cls, config, curvature_allowed=None) -> Forecaster:
        return cls(cls.HISTORY, config.storage_dtype)

    @classmethod
    def history_points(cls, config) -> int:
        return cls.HISTORY

    def __init__(self, history: int = 4, storage_dtype: str | None = None, correct: bool = True):
        super().__init__(max(int(history) - 1, 1), storage_dtype)
        self.correct = correct
        self._points: list[torch.Tensor] = []  # raw values, newest first

    def reset(self) -> None:
        super().reset()
        self._points = []

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._points)

    def get_anchor(self) -> torch.Tensor:
        return self._points[0]

    def set_anchor(self, value: torch.Tensor) -> None:
        self._points[0] = value.to(self._points[0].dtype)

    @property
    def points(self) -> int:
        return len(self._points)

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        self.value_dtype = value.dtype
        v = self._store(self._work(value.detach()).clone())
        if self.times and abs(t - self.times[0]) <= 1e-9 * max(1.0, abs(t)):
            self._points[0] = v
            return
        keep = self.order + 1
        self._points = [v] + self._points[:keep - 1]
        self.times = [t] + self.times[:keep - 1]

    def _velocity_line(self):
        """(slope samples -> least-squares line): returns v(tau) as a callable."""
        pts = [self._work(p) for p in self._points]
        taus, vels = [], []
        for i in range(len(pts) - 1):
            dt = self.times[i] - self.times[i + 1]
            taus.append(0.5 * (self.times[i] + self.times[i + 1]))
            vels.append((pts[i] - pts[i + 1]) / dt)
        if len(vels) == 1:
            return lambda tau: vels[0]
        n = len(taus)
        mean_tau = sum(taus) / n
        var = sum((x - mean_tau) ** 2 for x in taus)
        mean_v = sum(vels) / n
        slope = sum((x - mean_tau) * v for x, v in zip(taus, vels)) / var
        return lambda tau: mean_v + (tau - mean_tau) * slope

    def predict(self, t: float) -> torch.Tensor:
        if not self._points:
            raise RuntimeError("forecast requested before any computed point")
        f0 = self._work(self._points[0])
        if len(self._points) < 2:
            return f0.clone().to(self.value_dtype)
        v = self._velocity_line()
        dt = float(t) - self.times[0]
        v0 = v(self.times[0])
        if not self.correct:
            return (f0 + dt * v0).to(self.value_dtype)
        return (f0 + dt * 0.5 * (v0 + v(float(t)))).to(self.value_dtype)
