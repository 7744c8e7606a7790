"""Spectrum's forecaster (cache_core/forecasters/spectrum.py): a Chebyshev series fitted by
ridge regression over the whole kept history."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture
def spectrum(core):
    from importlib import import_module
    return import_module(core.__name__ + ".forecasters.spectrum")


def test_chebyshev_basis_is_cos_k_theta(spectrum):
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    basis = spectrum.chebyshev(x, 4)
    theta = torch.arccos(x)
    for k in range(5):
        assert torch.allclose(basis[:, k], torch.cos(k * theta), atol=1e-12)


def test_without_ridge_a_cubic_is_forecast_exactly(spectrum):
    f = lambda t: 2.0 - 3.0 * t + 0.5 * t ** 2 + 4.0 * t ** 3        # noqa: E731
    fc = spectrum.SpectrumForecaster(degree=3, ridge=0.0, history=6)
    times = [1.0, 0.9, 0.75, 0.6, 0.5]
    for t in times:
        fc.update(t, torch.full((3,), f(t), dtype=torch.float64))
    assert fc.points == 5
    assert torch.allclose(fc.predict(0.2), torch.full((3,), f(0.2), dtype=torch.float64), rtol=1e-9)


def test_the_ridge_never_shrinks_a_constant_feature(spectrum):
    """The constant term is not penalised: a feature that does not move is forecast as itself
    at any ridge strength (shrinking it would pull the forecast towards zero)."""
    fc = spectrum.SpectrumForecaster(degree=3, ridge=10.0, history=8)
    for t in (1.0, 0.8, 0.5):
        fc.update(t, torch.full((4,), 7.0))
    assert torch.allclose(fc.predict(0.1), torch.full((4,), 7.0), atol=1e-6)


def test_the_ridge_damps_a_noisy_history(spectrum):
    """Points on a line with alternating noise: the ridge fit's forecast far ahead stays nearer
    the line than the exact cubic through the points."""
    line = lambda t: 1.0 + t                                          # noqa: E731
    times = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    noisy = [line(t) + (0.05 if i % 2 else -0.05) for i, t in enumerate(times)]
    exact = spectrum.SpectrumForecaster(degree=3, ridge=0.0, history=8)
    ridge = spectrum.SpectrumForecaster(degree=3, ridge=1.0, history=8)
    for t, v in zip(times, noisy):
        exact.update(t, torch.tensor([v]))
        ridge.update(t, torch.tensor([v]))
    target = line(0.1)
    assert abs(float(ridge.predict(0.1)) - target) < abs(float(exact.predict(0.1)) - target)


def test_history_is_bounded_and_the_same_time_replaces(spectrum):
    fc = spectrum.SpectrumForecaster(degree=2, ridge=0.1, history=3)
    for t in (1.0, 0.9, 0.8, 0.7):
        fc.update(t, torch.ones(2) * t)
    assert fc.points == 3 and fc.times == [0.7, 0.8, 0.9]
    fc.update(0.7, torch.zeros(2))
    assert fc.points == 3 and torch.equal(fc.get_anchor(), torch.zeros(2))
    assert fc.nbytes() == 3 * 2 * 4
    fc.reset()
    assert fc.points == 0


def test_spectrum_is_selectable_by_name(core):
    """Registered: the Options node's forecaster list, the fixed-interval method of the same
    name, and the memory estimate know it."""
    from importlib import import_module
    forecasters = import_module(core.__name__ + ".forecasters")
    assert "spectrum" in forecasters.FORECASTERS
    config = core.CacheConfig(forecaster="spectrum")
    assert config.draft == "spectrum"
    assert forecasters.history_points(config) == forecasters.REGISTRY["spectrum"].HISTORY
    assert isinstance(forecasters.make_forecaster(config), forecasters.REGISTRY["spectrum"])
    assert math.isfinite(float(forecasters.make_forecaster(config).__class__.RIDGE))
