"""Forecasters: given features computed at a few points of the time axis, predict them
at a new time.

Interface: ``update(t, value)`` at a computed point, ``predict(t)`` at a new one.
"""

from __future__ import annotations

import math

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

    # The value at the newest computed point ("factor 0"). ClusCa refreshes part of it
    # between computed steps; the forecast then extrapolates from the refreshed anchor.
    def get_anchor(self) -> torch.Tensor:
        raise NotImplementedError

    def set_anchor(self, value: torch.Tensor) -> None:
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

    def get_anchor(self) -> torch.Tensor:
        return self.diffs[0]

    def set_anchor(self, value: torch.Tensor) -> None:
        self.diffs[0] = value.to(self.diffs[0].dtype)

    def _work(self, d: torch.Tensor) -> torch.Tensor:
        # Arithmetic in at least float32: differences of nearby features cancel.
        return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d

    def _store(self, d: torch.Tensor) -> torch.Tensor:
        return d.to(self.storage_dtype or self.value_dtype)

    def _is_newest(self, t: float) -> bool:
        return bool(self.times) and abs(t - self.times[0]) <= 1e-9 * max(1.0, abs(t))

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        value = value.detach()
        self.value_dtype = value.dtype
        new = self._work(value)
        if new is value:
            new = value.clone()  # never keep a reference the caller may change in place
        if self._is_newest(t):
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


class FittedCurvatureForecaster(TaylorForecaster):
    """The linear forecast plus a share of the quadratic term, the share fitted during the run.
    Newton form through the last three computed points (newest first):

        F(t) = D_0 + D_1 (t - t_0) + w D_2 (t - t_0)(t - t_1)

    w = 0 is the order-1 forecast and w = 1 the order-2 one. At each new computed point, w moves
    halfway to the least-squares regression of the new second divided difference
    (f[t_new, t_0, t_1]) on the one before it (f[t_0, t_1, t_2]), within [-1, 1]; it starts at 0.

    Why: lookback forecasts the model output over runs of up to 6-8 forecasts, and the
    quadratic through points that far apart misses badly (19-block reference model, the schedule
    of the 4x speed target: 20.7 dB against the linear forecast's 34.0 dB). In the runs looked at,
    the fitted share sits between -0.3 and 0 in the middle of the sampling run and turns positive
    (0.4-0.9) near its end. The likely reason it helps: a computed point is taken on the path the
    forecasts before it left, and the trajectory correction after it interpolates each run of
    forecasts again through the computed points; a forecast that leans against the last curvature
    by the measured share lands closer to what the correction will interpolate. Measured at the schedules of the speed targets 2x / 3x / 4x / 5x
    (benchmarks.forecast_lab, 8 samples): 19-block model 52.1 / 39.3 / 35.7 / 29.3 dB against the
    linear forecast's 51.7 / 39.3 / 34.0 / 29.6, 6-block model 60.7 / 43.8 / 32.6 / 25.9 against
    57.8 / 42.6 / 32.6 / 25.8. Without the correction it lost 1.3-2.4 dB at 4x on both, so it is
    used only where the correction will correct the forecast (``allowed``); the speed targets use
    it (README, "Fitted curvature")."""

    def __init__(self, storage_dtype: str | None = None, allowed=None):
        super().__init__(2, storage_dtype)
        self.weight = 0.0
        # () -> bool: whether this forecast uses the share (the run's trajectory correction will
        # correct it); the linear forecast otherwise.
        self.allowed = allowed or (lambda: True)

    def reset(self) -> None:
        super().reset()
        self.weight = 0.0

    def update(self, t: float, value: torch.Tensor) -> None:
        older = self._work(self.diffs[2]) if len(self.diffs) == 3 and not self._is_newest(float(t)) else None
        super().update(t, value)
        if older is None:
            return
        newer = self._work(self.diffs[2])
        fit = float((newer * older).sum() / (older * older).sum().clamp_min(1e-30))
        if math.isfinite(fit):
            self.weight = 0.5 * self.weight + 0.5 * min(max(fit, -1.0), 1.0)

    def predict(self, t: float) -> torch.Tensor:
        if not self.diffs:
            raise RuntimeError("forecast requested before any computed point")
        t = float(t)
        out = self._work(self.diffs[0]).clone()
        if len(self.diffs) > 1:
            out.add_(self._work(self.diffs[1]), alpha=t - self.times[0])
        if len(self.diffs) > 2 and self.weight != 0.0 and self.allowed():
            out.add_(self._work(self.diffs[2]), alpha=self.weight * (t - self.times[0]) * (t - self.times[1]))
        return out.to(self.value_dtype)


class HermiteForecaster(TaylorForecaster):
    """HiCache (arXiv 2508.16984): the Taylor power basis x^k/k! is replaced by the scaled
    Hermite basis sigma^k H_k(sigma x) / k! ("dual scaling"), physicists' Hermite
    polynomials H_0 = 1, H_1 = 2z, H_{k+1} = 2z H_k - 2k H_{k-1}.

        F(x) = F_0 + sum_{k>=1} sigma^k / k! * H_k(sigma x) * d_k

    x is the distance to the newest computed point in units of the last gap between
    computed points, and d_k = k! f[t_0..t_k] g^k the k-th derivative in those units,
    estimated from the same divided differences as the Taylor forecaster (g = t_0 - t_1).
    With sigma = 1/sqrt(2) the basis is the probabilists' Hermite He_k(x)."""

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


class TaylorSeerForecaster(Forecaster):
    """TaylorSeer exactly as its reference code (arXiv 2503.06923; research notes 0.1), for
    reproducing the paper on the step axis: at each computed point, factor i+1 becomes
    (factor i now - factor i at the previous computed point) / (gap between the last two
    computed points); the forecast is sum_i factor_i x^i / i!, x = distance to the newest
    computed point. Exact only for uniform spacing."""

    def __init__(self, order: int, storage_dtype: str | None = None):
        self.order = int(order)
        self.storage_dtype = _DTYPES[storage_dtype] if storage_dtype else None
        self.factors: list[torch.Tensor] = []
        self.time: float | None = None
        self.value_dtype = None

    @property
    def points(self) -> int:
        return 0 if self.time is None else 1

    def reset(self) -> None:
        self.factors, self.time, self.value_dtype = [], None, None

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)

    def get_anchor(self) -> torch.Tensor:
        return self.factors[0]

    def set_anchor(self, value: torch.Tensor) -> None:
        self.factors[0] = value.to(self.factors[0].dtype)

    def update(self, t: float, value: torch.Tensor) -> None:
        t = float(t)
        self.value_dtype = value.dtype
        new = [value.detach().float().clone()]
        if self.time is not None and t != self.time:
            gap = t - self.time
            for i in range(min(len(self.factors), self.order)):
                new.append((new[i] - self.factors[i].float()) / gap)
        elif self.time is not None:
            new += [f.float() for f in self.factors[1:]]
        self.factors = [f.to(self.storage_dtype or self.value_dtype) for f in new]
        self.time = t

    def predict(self, t: float) -> torch.Tensor:
        if self.time is None:
            raise RuntimeError("forecast requested before any computed point")
        x = float(t) - self.time
        out = self.factors[0].float().clone()
        fact = 1.0
        for i in range(1, len(self.factors)):
            fact *= i
            out.add_(self.factors[i].float(), alpha=x ** i / fact)
        return out.to(self.value_dtype)


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


FORECASTERS = ("taylor", "hicache", "foca")


def make_forecaster(config, curvature_allowed=None) -> Forecaster:
    """The forecaster a CacheConfig asks for. ``curvature_allowed``: see
    ``FittedCurvatureForecaster.allowed``."""
    name = config.draft
    if name == "hicache":
        return HermiteForecaster(max(config.order, 1), config.hicache_scale, config.storage_dtype)
    if name == "foca":
        return FoCaForecaster(4, config.storage_dtype)
    order = 0 if config.method == "reuse" else config.order
    if config.time_axis == "step":
        return TaylorSeerForecaster(order, config.storage_dtype)
    if order == 1 and config.fitted_curvature:
        return FittedCurvatureForecaster(config.storage_dtype, curvature_allowed)
    return TaylorForecaster(order, config.storage_dtype)
