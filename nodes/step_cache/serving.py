"""What a run serves on accepted forecast steps: the output the block stages' forecasts
give, or the forecast of the model output itself (``serve_output``), made in the model's
own output space or, for flow models at the diffusion-model level, in the noise space
(``cache_core.output_space``); and which samplers turn serving off."""

from __future__ import annotations

import comfy.model_sampling

from ...cache_core.output_space import MODEL_SPACE, OutputSpace, adds_noise
from ..runtime.log import log, warn_once


def is_flow_model(model_sampling) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


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
