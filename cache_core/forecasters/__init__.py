"""Forecasters: given features computed at a few points of the time axis, predict them at a
new time. Every module of this package is imported here, so a ``@register``-ed class in a new
module is selectable by name without touching anything else (base.py says what it must carry)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Forecaster, register
from . import taylor, hermite, foca  # noqa: E402,F401  (this order: the Options node lists them so)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .taylor import FittedCurvatureForecaster, TaylorForecaster, TaylorSeerForecaster  # noqa: E402
from .hermite import HermiteForecaster  # noqa: E402
from .foca import FoCaForecaster  # noqa: E402

# The registered names, in registration order (taylor first: the default draft).
FORECASTERS = tuple(REGISTRY)


def forecaster_class(name: str):
    return REGISTRY[name]


def make_forecaster(config, curvature_allowed=None) -> Forecaster:
    """The forecaster a CacheConfig asks for (its ``draft``). ``curvature_allowed``: see
    ``FittedCurvatureForecaster.allowed``."""
    return REGISTRY[config.draft].for_config(config, curvature_allowed)


def history_points(config) -> int:
    """Tensors kept per feature by the forecaster a CacheConfig asks for."""
    return REGISTRY[config.draft].history_points(config)


__all__ = ["Forecaster", "register", "REGISTRY", "FORECASTERS", "make_forecaster", "history_points",
           "forecaster_class", "TaylorForecaster", "FittedCurvatureForecaster", "TaylorSeerForecaster",
           "HermiteForecaster", "FoCaForecaster"]
