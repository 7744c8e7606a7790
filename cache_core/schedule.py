"""Where a model call falls in the sampler's schedule."""

from __future__ import annotations


def step_index(sample_sigmas, sigma: float) -> int:
    """The step a model call at ``sigma`` belongs to: how many of the schedule's steps start
    above it. Relative tolerance: SDE samplers evaluate a flow model's first step at 0.99997
    instead of 1.0."""
    return sum(1 for s in list(sample_sigmas)[:-1] if s > sigma * (1 + 1e-3) + 1e-9)
