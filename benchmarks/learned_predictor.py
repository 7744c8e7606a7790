"""An L2P-style baseline (a learned linear predictor; arXiv 2604.26365, research/algorithms.md
section 11), written here from the paper's idea, no code of theirs: every forecast is a fixed
linear combination of what the model computed at the steps before it, and the weights of each
forecast step are fitted by least squares to a few uncached runs of the same model, sampler and
step count.

What is forecast here is the model output as the noise it implies, eps = (x - denoised) / sigma,
per row of the CFG batch (cond and uncond alike; CFG is linear, so weights applied before it act
as they would after). The sources of a forecast step are the (up to) ``points`` computed steps
before it. Which steps are computed: the node's own planner (``cache_core.target.plan_schedule``)
for the target's whole calls, the last step computed as the node computes it: the row spends what
the node's planned target spends, less the node's cond-only half call, and gets the node's
knowledge of where calls matter. Calibration: uncached runs at other seeds (5000 and up), shared
by every row of one workload."""

from __future__ import annotations

import importlib

import torch

from devkit import comfy_env

POINTS = 3            # computed steps a forecast combines
CALIBRATION_RUNS = 8  # uncached runs the weights are fitted to
_CALIBRATIONS: dict = {}   # (model, steps, sampler, scheduler, cfg, runs, workload) -> trajectories


def fit_learned_weights(trajectories: list, computed: set, steps: int, points: int = POINTS,
                        min_sources: int = 2) -> dict:
    """For each step not in ``computed`` with at least ``min_sources`` computed steps before it:
    the least-squares weights of the noise at the (up to) ``points`` computed steps before it
    that best give its noise, over every element of the calibration runs (``trajectories``: one
    list of per-step noise tensors per run). {step: (source steps, weights)}."""
    order = sorted(computed)
    weights = {}
    for j in range(steps):
        sources = [c for c in order if c < j][-points:]
        if j in computed or len(sources) < max(min_sources, 1):
            continue
        a = torch.cat([torch.stack([t[c].flatten() for c in sources], 1) for t in trajectories]).double()
        b = torch.cat([t[j].flatten() for t in trajectories]).double().unsqueeze(1)
        weights[j] = (sources, torch.linalg.lstsq(a, b).solution.squeeze(1).tolist())
    return weights


def _row_sigma(timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return timestep.reshape([-1] + [1] * (like.ndim - 1)).to(like.dtype)


class _StepWrapper:
    """A ``model_function_wrapper``: finds the sampler's step from the call's sigma; with
    ``record`` every step runs and its noise is kept (a calibration run); otherwise the steps in
    ``schedule`` run and the others are the learned combination of the noise computed before."""

    def __init__(self, sigmas: list, schedule: set | None = None, weights: dict | None = None):
        self.sigmas = sigmas
        self.schedule = schedule
        self.weights = weights or {}
        self.noise: dict = {}           # step -> noise of this run's computed step
        self.calls = []                 # steps at which the model ran (the tests read it)

    def __deepcopy__(self, memo):
        return self     # one predictor: ComfyUI's ModelPatcher.clone deep-copies model_options

    def step_of(self, timestep) -> int:
        sigma = float(timestep.flatten()[0])
        return min(range(len(self.sigmas) - 1), key=lambda i: abs(self.sigmas[i] - sigma))

    def __call__(self, apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        step = self.step_of(timestep)
        if step == 0:
            self.noise = {}             # a new sampling run
        sigma = _row_sigma(timestep, x)
        forecast = self.schedule is not None and step not in self.schedule and step in self.weights
        sources, w = self.weights.get(step, ((), ()))
        if forecast and all(s in self.noise and self.noise[s].shape == x.shape for s in sources):
            eps = sum(wi * self.noise[s] for wi, s in zip(w, sources))
            return x - sigma * eps
        out = apply_model(x, timestep, **c)
        self.calls.append(step)
        self.noise[step] = (x - out) / sigma
        return out


class LearnedPredictor:
    """The benchmark row: ``prepare(workload, sample_one)`` fits the weights (once), ``apply(model)``
    returns the model with the predictor installed."""

    def __init__(self, target_speedup: float, points: int = POINTS, calibration: int = CALIBRATION_RUNS):
        self.target_speedup = float(target_speedup)
        self.points = points
        self.calibration = calibration
        self.wrapper: _StepWrapper | None = None

    def settings(self) -> dict:
        return {"schedule": "the node's plan", "target_speedup": self.target_speedup,
                "calibration_runs": self.calibration, "points": self.points}

    def prepare(self, workload, sample_one) -> None:
        """``sample_one(model, positive, negative, seed)``: one sampling run of the workload."""
        if self.wrapper is not None:
            return
        import comfy.samplers
        target = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.target")
        model = workload.model
        sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(
            model.get_model_object("model_sampling"), workload.scheduler, workload.steps)]
        steps = workload.steps
        schedule = set(target.plan_schedule(sigmas, target.planned_calls(steps, self.target_speedup),
                                            forced=[steps - 1]))
        key = (id(model), steps, workload.sampler, workload.scheduler, workload.cfg, self.calibration, workload.name)
        if key not in _CALIBRATIONS:
            trajectories = []
            for i in range(self.calibration):
                positive, negative, _ = workload.samples[(i + 3) % len(workload.samples)]
                recorder = _StepWrapper(sigmas)
                recording = model.clone()
                recording.set_model_unet_function_wrapper(recorder)
                sample_one(recording, positive, negative, 5000 + i)
                trajectories.append([recorder.noise[j] for j in range(steps)])
            _CALIBRATIONS[key] = trajectories
        weights = fit_learned_weights(_CALIBRATIONS[key], schedule, steps, self.points, min_sources=1)
        self.wrapper = _StepWrapper(sigmas, schedule, weights)

    def apply(self, model):
        if self.wrapper is None:
            raise RuntimeError("LearnedPredictor.prepare(workload, sample_one) must run before apply")
        m = model.clone()
        m.set_model_unet_function_wrapper(self.wrapper)
        return m
