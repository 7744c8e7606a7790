"""Engine tests (cache_core, no ComfyUI): forecasters."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import poly, fitted_curvature_forecaster


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_taylor_exact_on_polynomials_at_nonuniform_times(core, order):
    coeffs = [0.7, -1.3, 0.4, 2.0, -0.6][: order + 1]
    times = [1.0, 0.93, 0.81, 0.62, 0.41, 0.30]   # shifted-schedule-like spacing, decreasing
    f = core.TaylorForecaster(order)
    for t in times:
        f.update(t, poly(coeffs, t))
    for target in (0.25, 0.12, 0.0):
        assert torch.allclose(f.predict(target), poly(coeffs, target), atol=1e-9, rtol=1e-9)


def test_taylor_order_too_low_is_not_exact(core):
    coeffs = [0.1, 0.2, 1.5]  # quadratic
    f = core.TaylorForecaster(1)
    for t in (1.0, 0.8, 0.55):
        f.update(t, poly(coeffs, t))
    assert not torch.allclose(f.predict(0.3), poly(coeffs, 0.3), atol=1e-3)


def test_taylor_order_ramps_up_with_points(core):
    f = core.TaylorForecaster(3)
    f.update(1.0, torch.ones(2))
    assert f.points == 1
    assert torch.equal(f.predict(0.5), torch.ones(2))  # order 0: reuse
    f.update(0.5, torch.zeros(2))
    assert f.points == 2
    assert torch.allclose(f.predict(0.0), -torch.ones(2))  # linear through both points
    for t in (0.4, 0.3, 0.2):
        f.update(t, torch.zeros(2))
    assert f.points == 4  # order + 1 nodes, never more


def test_taylor_repeated_time_replaces_newest_point(core):
    """Heun evaluates twice at one sigma: the second value replaces the first and the
    forecast stays exact for the trajectory through the replaced value."""
    coeffs = [0.3, 0.9, -0.7]
    f = core.TaylorForecaster(2)
    f.update(1.0, poly(coeffs, 1.0))
    f.update(0.7, poly(coeffs, 0.7))
    f.update(0.45, torch.full((3, 5), 123.0, dtype=torch.float64))  # a first, wrong value
    f.update(0.45, poly(coeffs, 0.45))                              # replaced
    assert f.points == 3
    assert torch.allclose(f.predict(0.2), poly(coeffs, 0.2), atol=1e-9)


def test_fitted_curvature_starts_linear_and_fits_the_share_of_the_quadratic(core):
    """w = 0 until two second differences are known; a function whose curvature holds steady
    moves w towards 1 (the quadratic), one whose curvature flips sign towards -1."""
    coeffs = [0.2, -0.8, 1.1]                        # a quadratic: constant curvature
    f = fitted_curvature_forecaster(core)
    linear = core.TaylorForecaster(1)
    for t in (1.0, 0.8, 0.6):
        f.update(t, poly(coeffs, t))
        linear.update(t, poly(coeffs, t))
    assert f.points == 3 and f.weight == 0.0
    assert torch.allclose(f.predict(0.3), linear.predict(0.3), atol=1e-12)   # linear so far
    weights = []
    for t in (0.45, 0.3, 0.2):
        f.update(t, poly(coeffs, t))
        weights.append(f.weight)
    assert weights == pytest.approx([0.5, 0.75, 0.875])   # halfway to the fit (1) each time
    exact, quadratic_share = poly(coeffs, 0.05), f.predict(0.05)
    linear = core.TaylorForecaster(1)
    for t in (0.3, 0.2):
        linear.update(t, poly(coeffs, t))
    # 7/8 of the quadratic term: closer to the exact value than the linear forecast
    assert (quadratic_share - exact).norm() < 0.2 * (linear.predict(0.05) - exact).norm()

    g = fitted_curvature_forecaster(core)
    base = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(3, 5)
    for i, t in enumerate((1.0, 0.9, 0.8, 0.7, 0.6, 0.5)):
        g.update(t, base * (t + 0.05 * (-1) ** i))   # a line with a zig-zag: the curvature flips
    assert g.weight < -0.4


def test_fitted_curvature_only_where_allowed_and_forgets_on_reset(core):
    on = {"value": False}
    f = fitted_curvature_forecaster(core, allowed=lambda: on["value"])
    for t, v in ((1.0, 0.0), (0.8, 1.0), (0.6, 1.0), (0.4, 0.0)):
        f.update(t, torch.full((2,), v, dtype=torch.float64))
    assert f.weight != 0.0
    linear = core.TaylorForecaster(1)
    for t, v in ((0.6, 1.0), (0.4, 0.0)):
        linear.update(t, torch.full((2,), v, dtype=torch.float64))
    assert torch.equal(f.predict(0.2), linear.predict(0.2))     # not allowed: the linear forecast
    on["value"] = True
    assert not torch.allclose(f.predict(0.2), linear.predict(0.2))
    f.update(0.4, torch.full((2,), 0.5, dtype=torch.float64))    # the same time again: no new fit
    weight = f.weight
    f.update(0.4, torch.full((2,), 0.0, dtype=torch.float64))
    assert f.weight == weight
    f.reset()
    assert f.points == 0 and f.weight == 0.0


def test_taylor_storage_dtype_halves_memory_and_keeps_feature_dtype(core):
    full, half = core.TaylorForecaster(2), core.TaylorForecaster(2, "bfloat16")
    for t in (1.0, 0.8, 0.6):
        v = torch.randn(4, 8) * t
        full.update(t, v)
        half.update(t, v)
    assert half.nbytes() * 2 == full.nbytes()
    assert half.predict(0.5).dtype == torch.float32
    assert torch.allclose(half.predict(0.5), full.predict(0.5), rtol=0.05, atol=0.05)


def test_taylor_does_not_keep_caller_tensor(core):
    f = core.TaylorForecaster(0)
    v = torch.ones(3)
    f.update(1.0, v)
    v += 5  # a block adding its residual in place must not change the history
    assert torch.equal(f.predict(0.5), torch.ones(3))
