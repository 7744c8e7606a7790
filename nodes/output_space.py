"""What a run serves on accepted forecast steps: the output the block stages' forecasts
give, or the forecast of the model output itself (``serve_output``), made in the model's
own output space or, for flow models at the diffusion-model level, in the noise space
(``cache_core.output_space``); and which samplers turn serving off."""

from __future__ import annotations

import inspect
import logging

import torch

from ..cache_core.output_space import can_forecast_noise, noise_from_velocity, velocity_from_noise
from .adapters import warn_once

log = logging.getLogger("speculative_cache")


def is_flow_model(model_sampling) -> bool:
    import comfy.model_sampling
    return isinstance(model_sampling, comfy.model_sampling.CONST)


# k-diffusion functions that take a noise_sampler but never use it (they run their
# ancestral twin at eta 0).
_NOISE_SAMPLER_UNUSED = ("sample_res_multistep", "sample_res_multistep_cfg_pp")


def adds_noise(sampler) -> bool:
    """Whether a sampler draws fresh noise at its steps (ancestral and SDE samplers: those
    whose function takes a ``noise_sampler``, unless its ``eta`` or ``s_noise`` is 0)."""
    function = getattr(sampler, "sampler_function", None)
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    if "noise_sampler" not in params or getattr(function, "__name__", "") in _NOISE_SAMPLER_UNUSED:
        return False
    options = getattr(sampler, "extra_options", None) or {}
    for name in ("eta", "s_noise"):
        value = options.get(name, params[name].default if name in params else None)
        if isinstance(value, (int, float)) and value == 0:
            return False
    return True


class OutputSpace:
    """Identity, or the noise space of a flow model's velocity. The diffusion model's input
    ``x`` is the sampler's x for flow models (CONST scales no input); a model whose input
    has more channels than its output (concatenated conditioning) keeps the model space,
    decided at the first recorded output."""

    def __init__(self, noise: bool):
        self.noise = noise
        self.recorded = False

    def encode(self, out: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """What to record of the output ``out`` computed from ``x`` at ``sigma``."""
        if not self.noise:
            return out
        if x.shape != out.shape:
            if self.recorded:
                raise ValueError(f"the model input changed shape mid-run ({tuple(x.shape)} vs output "
                                 f"{tuple(out.shape)})")
            self.noise = False
            return out
        self.recorded = True
        return noise_from_velocity(out, x, sigma)

    def decode(self, pred: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor | None:
        """The model output for a forecast ``pred`` of what was recorded; None when this step
        cannot be forecast in this space (compute it)."""
        if not self.noise:
            return pred
        if x.shape != pred.shape or not can_forecast_noise(sigma):
            return None
        return velocity_from_noise(pred, x, sigma)


MODEL_SPACE = OutputSpace(False)


def look_back(chunk, name: str, space: OutputSpace, out: torch.Tensor, x: torch.Tensor, sigma: float) -> None:
    """Lookback acceptance, at a computed step: how far the forecast of this step's output
    (from the computed steps before it) is from the real ``out``; the policy sizes the next
    run of forecasts from it. Nothing to measure until the history can forecast."""
    if not chunk.can_forecast((name,)):
        return
    pred = space.decode(chunk.predict(name), x, sigma)
    if pred is not None and pred.shape == out.shape:
        chunk.look_back(pred, out)


class Serving:
    """One run's choice. A sampler that adds fresh noise at each step moves x in a way no
    forecast of the model output follows: the stage forecasts, whose output the model's
    embedding and final layer compute from the real x, keep up (6-block reference model,
    speed target 3x, dpmpp_2m_sde: 18.3 dB with stage forecasts, 11.1 dB serving the output
    forecast, 5.9 dB serving it in noise space). Such a sampler turns both off."""

    def __init__(self, run, model_sampling):
        config = run.config
        self.serve_output = bool(config.serve_output)
        self.space = OutputSpace(config.output_space == "noise" and is_flow_model(model_sampling))
        self.sampler_seen = False
        self.speed_target = run.target is not None
        self.looks_back = config.looks_back

    def adapt_to(self, sampler) -> None:
        """Called when the sampler starts (before any model call); only the first sampler of a
        run counts, so that a history is never recorded in two spaces."""
        if self.sampler_seen:
            return
        self.sampler_seen = True
        if not adds_noise(sampler):
            return
        consequence = None
        if self.speed_target:
            consequence = ("a speed target meets its budget here with visibly changed pictures (3x on the "
                           "reference model: 10-30 dB PSNR to the uncached picture, 32-48 dB with deterministic "
                           "samplers). Mode auto measures that and computes (the same picture, no speed-up with "
                           "such a sampler); or use")
        elif self.looks_back:
            consequence = ("lookback measures that and computes nearly every step (no speed-up, the picture "
                           "unchanged). Use")
        if consequence:
            warn_once("Speculative Cache: this sampler adds fresh noise at every step, which no forecast follows: "
                      f"{consequence} a deterministic sampler such as euler, dpmpp_2m or uni_pc.")
        if self.serve_output or self.space.noise:
            log.info("Speculative Cache: the sampler adds noise at each step; "
                     + ("forecasting the model output as it is, not the noise it implies." if self.looks_back
                        else "serving the block stages' forecasts instead of the forecast of the model output."))
            self.serve_output = False
            self.space = MODEL_SPACE

    def report(self, stats) -> None:
        stats.serve_output = self.serve_output
        stats.output_space = "noise" if self.space.noise else "model"
