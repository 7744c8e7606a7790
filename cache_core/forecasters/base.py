"""The forecaster interface and the registry of forecasters selectable by name.

Interface: ``update(t, value)`` at a computed point, ``predict(t)`` at a new one. Adding a
forecaster is one module in this package with one ``@register``-ed class, and its test: the
config check, the memory estimate and the Options node read the registry."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> registered Forecaster class, in registration order
REGISTRY: dict = {}


def register(cls):
    """Class decorator: make ``cls`` selectable by its ``name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"forecaster name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


class Forecaster:
    """One feature tensor's history and its forecast.

    A forecaster selectable by name (the SpeCa draft ``CacheConfig.forecaster``, and the
    fixed-interval method of the same name) is registered with ``@register``: its class then
    says what the config check, the memory estimate and the Options node need (``name``,
    ``tooltip``, ``for_config``, ``history_points``)."""

    name: str = ""        # the registered name
    tooltip: str = ""     # one line for the Options node's forecaster tooltip

    @classmethod
    def for_config(cls, config, curvature_allowed=None) -> "Forecaster":
        """The forecaster a CacheConfig asks for when it names this one."""
        raise NotImplementedError

    @classmethod
    def history_points(cls, config) -> int:
        """Tensors kept per feature under ``config`` (for the memory estimate)."""
        raise NotImplementedError

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
