"""Forecast schemes at a fixed schedule of computed steps, through ComfyUI's real sampler.

    .venv/bin/python -m benchmarks.lab.forecast_lab --model reference_deep --samples 8 \
        --schedule 0,1,4,10,17,24,27 noise mix:0.25 adaptive select

The engine chooses its schedule as it runs, so two forecast schemes are hard to compare in it:
a change of forecast changes the schedule. Here the schedule is fixed (``--schedule``: the steps
that run the model) and only the forecast of the other steps changes. The sampler is an Euler loop
handed to ComfyUI as a ``KSAMPLER`` (its CFG, conditioning and model sampling are the real ones);
forecasts are made after CFG, which for the linear forecasts here equals the engine's forecast of
cond and uncond apart. The engine's trajectory correction (``cache_core/correction.py``) runs
after every forecast scheme unless ``--no-correction``. At the schedule a run of the engine took
(its stats' timeline), the ``noise`` scheme gives the picture of the engine's linear forecast (a
test checks this).

Schemes (each forecast is a polynomial in sigma through the last computed steps):

* ``noise``: linear in the noise the output implies (the engine's ``auto``, and ``speed_target``
  with ``order`` set on the Options node).
* ``denoised``: linear in the denoised output.
* ``mix:L``: (1 - L) x the noise forecast + L x the denoised forecast, as denoised outputs.
* ``adaptive``: ``mix`` with L fitted at each computed step, as the mix of the two forecasts of
  that step (from the steps before it) closest to what it computed; running mean of the fits.
* ``select``: for each latent element, the order (0, 1 or 2) whose forecast of the newest computed
  step was closest (HyCa's per-dimension choice of solver, at the output).
* ``curve:L``: the noise forecast plus L x the quadratic term through the last three computed
  steps (L = 0: ``noise``; L = 1: the quadratic), a shrunk estimate of the curvature.
* ``curvefit``: ``curve`` with L fitted during the run: at each computed step, the regression of
  the newest second divided difference (through it and the two computed steps before) on the one
  before it; each fit moves L halfway, within [-1, 1]. It is the engine's own
  ``FittedCurvatureForecaster``, here after CFG; ``speed_target`` runs it per stream, cond and
  uncond apart, and only on forecasts its correction will correct, so the two differ slightly.

* ``spectrum:D:L:H``: Spectrum (CVPR 2026): a Chebyshev series of degree D in sigma fitted by
  ridge regression (strength L) to the noise at the last H computed steps; the engine's
  ``SpectrumForecaster`` (defaults where a field is left out).

* ``learned``: each forecast step's output (as noise) a weighted sum of the noise at the three
  computed steps before it, the weights fitted by least squares to uncached runs of other seeds
  and classes (``--calibration`` runs; L2P's learned linear predictor, algorithms.md section 11),
  for this schedule and step count.

``--uncond-schedule``: uncond's output is used only at some of the computed steps and forecast
(linearly, before CFG) at the others; cond and uncond each count half of a computed step.
With ``--uncond-from-difference`` uncond's output there is cond's plus (uncond - cond) of the
last step that ran uncond: the engine's cond-only steps (``nodes/step_cache/cond_only.py``), e.g.

    --no-correction --uncond-from-difference --uncond-schedule 0,12,21,27 --schedule 0,6,12,21,27 noise

A step before the second computed one that is not in the schedule is given the first computed
step's output again (a reuse), so the schedule is exactly the steps that run the model.

Prints the per-picture mean PSNR against the uncached sampler (same seeds as the benchmark)."""

from __future__ import annotations

import argparse
import functools
import sys
from importlib import import_module

import torch

from devkit import comfy_env

from ..learned_predictor import fit_learned_weights   # (the benchmark's L2P-style row fits the same way)

STEPS = 28
CFG = 2.0


@functools.cache
def _correction():
    return import_module(f"{comfy_env.PACK_MODULE}.cache_core.correction")


@functools.cache
def _forecasters():
    return import_module(f"{comfy_env.PACK_MODULE}.cache_core.forecasters")


def _interpolate(nodes, t):
    """The Lagrange polynomial through ``nodes`` [(sigma, tensor), ...] at ``t``."""
    weights = _correction()._lagrange_weights([s for s, _ in nodes], t)
    return sum(w * v for w, (_, v) in zip(weights, nodes))


# x = (1 - sigma) denoised + sigma noise for flow models: the relation the engine writes in
# velocity form (cache_core/output_space.py), here in the denoised form the sampler sees.
def _noise(x, denoised, sigma):
    return (x - (1.0 - sigma) * denoised) / sigma


def _denoised(x, noise, sigma):
    return (x - sigma * noise) / (1.0 - sigma)


class Scheme:
    """One forecast scheme's state over one sampling run."""

    def __init__(self, name: str, learned_weights: dict | None = None):
        kind, _, arg = name.partition(":")
        if kind not in ("noise", "denoised", "mix", "adaptive", "select", "curve", "curvefit", "learned", "spectrum"):
            raise ValueError(f"unknown scheme {name!r}")
        if kind == "learned" and learned_weights is None:
            raise ValueError("the learned scheme needs weights fitted to calibration runs (fit_learned_weights)")
        self.learned_weights = learned_weights
        self.computed_noise = {}            # learned: step -> the noise computed there
        self.kind = kind
        self.mix = float(arg) if kind == "mix" else (1.0 if kind == "denoised" else 0.0)
        self.curve = float(arg) if kind == "curve" else 0.0
        self.noise_nodes, self.denoised_nodes = [], []
        self.choice = None                  # select: the order chosen for each element
        # curvefit: the engine's own forecaster, on the noise after CFG
        self.fitted = _forecasters().FittedCurvatureForecaster() if kind == "curvefit" else None
        if kind == "spectrum":      # spectrum:DEGREE:RIDGE:HISTORY, the engine's Spectrum forecaster
            cls = _forecasters().REGISTRY["spectrum"]
            degree, ridge, history = (arg.split(":") + ["", "", ""])[:3]
            self.fitted = cls(int(degree or cls.DEGREE), float(ridge or cls.RIDGE), int(history or cls.HISTORY))

    def _linear(self, x, sigma):
        from_noise = _denoised(x, _interpolate(self.noise_nodes[-2:], sigma), sigma)
        from_denoised = _interpolate(self.denoised_nodes[-2:], sigma)
        return from_noise, from_denoised

    def computed(self, x, denoised, sigma, step: int):
        if self.kind == "adaptive" and len(self.noise_nodes) >= 2:
            from_noise, from_denoised = self._linear(x, sigma)
            diff = from_denoised - from_noise
            fit = float(((denoised - from_noise) * diff).sum() / (diff * diff).sum().clamp_min(1e-20))
            self.mix = 0.5 * self.mix + 0.5 * min(max(fit, 0.0), 1.0)
        eps = _noise(x, denoised, sigma)
        if self.kind == "select" and len(self.noise_nodes) >= 2:
            errors = torch.stack([(_interpolate(self.noise_nodes[-(o + 1):], sigma) - eps).abs()
                                  for o in range(min(3, len(self.noise_nodes)))])
            self.choice = errors.argmin(0)
        if self.fitted is not None:
            self.fitted.update(sigma, eps)
        if self.learned_weights is not None:
            self.computed_noise[step] = eps
        self.noise_nodes = (self.noise_nodes + [(sigma, eps)])[-3:]
        self.denoised_nodes = (self.denoised_nodes + [(sigma, denoised)])[-3:]

    def forecast(self, x, sigma, step: int):
        if len(self.noise_nodes) < 2:
            return _denoised(x, self.noise_nodes[-1][1], sigma)        # one point: reuse it
        if self.learned_weights is not None and step in self.learned_weights:
            sources, weights = self.learned_weights[step]
            return _denoised(x, sum(w * self.computed_noise[c] for w, c in zip(weights, sources)), sigma)
        if self.kind == "select":
            linear = _interpolate(self.noise_nodes[-2:], sigma)
            if self.choice is None:
                return _denoised(x, linear, sigma)
            eps = linear
            for order in (0, 2):
                if order < len(self.noise_nodes):
                    eps = torch.where(self.choice == order, _interpolate(self.noise_nodes[-(order + 1):], sigma), eps)
            return _denoised(x, eps, sigma)
        if self.fitted is not None:
            return _denoised(x, self.fitted.predict(sigma), sigma)
        if self.kind == "curve" and len(self.noise_nodes) >= 3:
            linear = _interpolate(self.noise_nodes[-2:], sigma)
            quadratic = _interpolate(self.noise_nodes[-3:], sigma)
            return _denoised(x, linear + self.curve * (quadratic - linear), sigma)
        from_noise, from_denoised = self._linear(x, sigma)
        return (1.0 - self.mix) * from_noise + self.mix * from_denoised


class UncondForecast:
    """A ``sampler_cfg_function`` that keeps uncond's real output only at the steps in
    ``computed`` and replaces it elsewhere with the line through its last two (one: reuse),
    in the noise it implies, before CFG combines it with cond's."""

    def __init__(self, computed: set, from_difference: bool = False):
        self.computed = computed
        self.from_difference = from_difference     # uncond = cond + (uncond - cond) of the last step it ran
        self.step = 0
        self.nodes = []

    def __call__(self, args):
        x, sigma = args["input"], float(args["sigma"].flatten()[0])
        uncond = args["uncond_denoised"]
        if self.from_difference:
            cond = args["cond_denoised"]
            if self.step in self.computed or not self.nodes:
                self.nodes = [(sigma, uncond - cond)]
            else:
                uncond = cond + self.nodes[-1][1]
        elif self.step in self.computed or not self.nodes:
            self.nodes = (self.nodes + [(sigma, _noise(x, uncond, sigma))])[-2:]
        else:
            uncond = _denoised(x, _interpolate(self.nodes, sigma), sigma)
        return x - (uncond + args["cond_scale"] * (args["cond_denoised"] - uncond))


def lab_sampler(computed: set, scheme: str, correction_degree: int = 2, learned_weights: dict | None = None,
                uncond_computed: set | None = None, uncond_from_difference: bool = False):
    """An Euler sampler function (for ``comfy.samplers.KSAMPLER``) that runs the model at the
    steps in ``computed`` (and at the first step) and forecasts the others with ``scheme``.
    ``uncond_computed`` (a subset of ``computed``): uncond's output is used only at these
    steps, forecast at the other computed ones (``UncondForecast``; ``uncond_from_difference``:
    as cond's output plus the last difference, the engine's cond-only steps)."""
    correction = _correction()
    if uncond_computed is not None and correction_degree:
        raise ValueError("uncond forecast apart: the correction assumes whole computed steps; use --no-correction")

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = dict(extra_args or {})
        uncond_hook = None
        if uncond_computed is not None:
            uncond_hook = UncondForecast(uncond_computed, uncond_from_difference)
            extra_args["model_options"] = {**extra_args.get("model_options", {}), "sampler_cfg_function": uncond_hook}
        s_in = x.new_ones([x.shape[0]])
        state = Scheme(scheme, learned_weights)
        corrector = correction.TrajectoryCorrection(True, correction_degree) if correction_degree else None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            run_model = i in computed or not state.noise_nodes
            if run_model:
                if uncond_hook is not None:
                    uncond_hook.step = i
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                state.computed(x, denoised, sigma, i)
            else:
                denoised = state.forecast(x, sigma, i)
            if corrector is not None:
                denoised = corrector.observe(x, denoised, sigma, sigma_next, run_model)
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        return x
    return sample


def recording_sampler(trajectories: list):
    """An Euler sampler function that computes every step and appends the run's noise after
    CFG, one tensor per step, to ``trajectories`` (the calibration of ``learned``)."""
    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        noise = []
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            noise.append(_noise(x, denoised, sigma))
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        trajectories.append(noise)
        return x
    return sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference_deep", help="reference (6 blocks) or reference_deep (19 blocks)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--schedule", action="append", required=True,
                    help="the computed steps, comma-separated (0-based, of --steps); may be given more than once")
    ap.add_argument("--no-correction", action="store_true", help="without the trajectory correction")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--calibration", type=int, default=8, help="learned: uncached runs to fit its weights to")
    ap.add_argument("--uncond-schedule", help="the steps at which uncond's output is used (a subset of the "
                    "schedule; forecast at the others); 'all': every step computed, uncond at --schedule. "
                    "Needs --no-correction")
    ap.add_argument("--uncond-from-difference", action="store_true",
                    help="--uncond-schedule: at a step without it, uncond's output is cond's plus (uncond - cond) of "
                         "the last step that ran it (the engine's cond-only steps) instead of its line")
    ap.add_argument("schemes", nargs="+", help="noise, denoised, mix:L, adaptive, select, curve:L, curvefit, learned")
    args = ap.parse_args(argv)
    comfy_env.setup_comfyui()
    comfy_env.pack_nodes()
    from devkit import reference_model as rm
    model = rm.load_reference(args.model)
    labels = [i % len(rm.CLASSES) for i in range(args.samples)]
    seeds = [1000 + i for i in range(args.samples)]
    reference = rm.sample(model, labels, seeds, steps=args.steps, cfg=CFG)
    trajectories = []
    if "learned" in args.schemes:          # other seeds and classes than the ones measured
        rm.sample(model, [(i + 3) % len(rm.CLASSES) for i in range(args.calibration)],
                  [5000 + i for i in range(args.calibration)], steps=args.steps, cfg=CFG,
                  sampler=recording_sampler(trajectories))
    degree = 0 if args.no_correction else 2
    for schedule in args.schedule:
        computed = {int(s) for s in schedule.split(",")} | {0}
        uncond = None
        if args.uncond_schedule == "all":            # cond at every step, uncond at the schedule
            computed, uncond = set(range(args.steps)), computed
        elif args.uncond_schedule:
            uncond = {int(s) for s in args.uncond_schedule.split(",")} | {0}
            if not uncond <= computed:
                ap.error("--uncond-schedule must be a subset of --schedule")
        # cond and uncond each cost half of a computed step
        compute = len(computed) / args.steps if uncond is None else (len(computed) + len(uncond)) / (2 * args.steps)
        for scheme in args.schemes:
            weights = fit_learned_weights(trajectories, computed, args.steps) if scheme == "learned" else None
            images = rm.sample(model, labels, seeds, steps=args.steps, cfg=CFG,
                               sampler=lab_sampler(computed, scheme, degree, weights, uncond,
                                                   args.uncond_from_difference))
            mean = sum(rm.psnr(images[i:i + 1], reference[i:i + 1]) for i in range(len(seeds))) / len(seeds)
            print(f"{schedule:28s} {scheme:12s} compute {compute:.3f}  PSNR {mean:6.2f} dB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
