"""Per-stream feature history. A stream is one identity whose features evolve
smoothly along the schedule: a cond/uncond entry (ComfyUI's uuid) of one run."""

from __future__ import annotations

from typing import Callable

import torch

from .forecasters import Forecaster


def tensor_signature(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device)


class StreamCache:
    """Forecasters for the named features of one stream.

    A feature whose shape, dtype or device differs from what is stored resets the
    whole stream: stale features from another resolution, batch or model are never
    extrapolated."""

    def __init__(self, make_forecaster: Callable[[], Forecaster]):
        self._make = make_forecaster
        self.forecasters: dict[str, Forecaster] = {}
        self.signatures: dict[str, tuple] = {}
        self.aux: dict[str, torch.Tensor] = {}   # e.g. ClusCa's cluster labels and centroids
        self.resets = 0
        # What the model's weights were when this history was computed (the ComfyUI glue
        # passes its LoRA hooks and their keyframe strengths); None: unknown / no hooks.
        self.weights_key = None

    def reset(self) -> None:
        for f in self.forecasters.values():
            f.reset()
        self.forecasters.clear()
        self.signatures.clear()
        self.aux.clear()

    def set_weights(self, key) -> bool:
        """Note the weights of the coming call; a change drops the history (features of
        other weights are not extrapolated into these). True when a history was dropped."""
        if key == self.weights_key:
            return False
        had_history = any(f.points for f in self.forecasters.values())
        self.weights_key = key
        if had_history:
            self.reset()
            self.resets += 1
        return had_history

    def can_predict(self, names, signatures: dict[str, tuple] | None = None) -> bool:
        for name in names:
            f = self.forecasters.get(name)
            if f is None or f.points == 0:
                return False
            if signatures is not None and self.signatures.get(name) != signatures.get(name):
                return False
        return True

    def update(self, t: float, features: dict[str, torch.Tensor]) -> bool:
        """Add the features computed at ``t``. True when a feature's shape, dtype or device
        changed and the history was dropped first (e.g. ComfyUI's FluxKVCache drops the
        reference-image tokens from the second step on)."""
        dropped = False
        for name, value in features.items():
            sig = tensor_signature(value)
            if name in self.signatures and self.signatures[name] != sig:
                self.reset()
                self.resets += 1
                dropped = True
                break
        for name, value in features.items():
            if name not in self.forecasters:
                self.forecasters[name] = self._make()
                self.signatures[name] = tensor_signature(value)
            self.forecasters[name].update(t, value)
        return dropped

    def predict(self, t: float, names) -> dict[str, torch.Tensor]:
        return {name: self.forecasters[name].predict(t) for name in names}

    def nbytes(self) -> int:
        return (sum(f.nbytes() for f in self.forecasters.values())
                + sum(t.numel() * t.element_size() for t in self.aux.values()))
