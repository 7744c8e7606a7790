"""A lookback forecast step is answered at ComfyUI's batch function (served_forecast.py): the
picture is bit-identical to serving it inside the model call, ComfyUI's preparation of the call (and
a ControlNet's network) no longer runs on forecast steps, and every case it does not cover falls
back to the call. Through ComfyUI's real sampler on the trained reference model."""

from __future__ import annotations

import pytest
import torch

from conftest import options, simple
from test_comfy_robustness import _reference_controlnet

pytestmark = pytest.mark.comfy


@pytest.fixture
def prepared_calls(spec_nodes, monkeypatch):
    """How many calls reached ComfyUI's own _calc_cond_batch (its per-call preparation)."""
    import comfy.samplers
    calls = []
    original = comfy.samplers._calc_cond_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", counting)
    return calls


def _with_foreign_wrapper(patcher):
    """The same model with another node's (identity) DIFFUSION_MODEL wrapper: forecast steps go
    through the model call, as before served_forecast."""
    import comfy.patcher_extension as pe
    m = patcher.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another_node", lambda executor, *a, **k: executor(*a, **k))
    return m


def test_forecast_steps_skip_comfyuis_preparation_with_the_same_picture(spec_nodes, stats_log, prepared_calls):
    from devkit import reference_model as rm
    model = rm.load_reference()
    labels, seeds = [0, 3], [1000, 1001]
    patched = simple(spec_nodes, model)
    served = rm.sample(patched, labels, seeds, steps=28)
    served_stats = stats_log[-2:]
    served_calls = len(prepared_calls)
    # only the computed steps reached ComfyUI's preparation (one batched call of cond and uncond each)
    assert served_calls == sum(s["computed"] for s in served_stats)
    assert all(s["forecast"] >= 10 and not s["internal_error"] for s in served_stats)
    del prepared_calls[:]
    through_call = rm.sample(_with_foreign_wrapper(patched), labels, seeds, steps=28)
    assert len(prepared_calls) == 2 * 28                                  # every step prepared
    assert torch.equal(served, through_call)
    assert [s["timeline"] for s in stats_log[-2:]] == [s["timeline"] for s in served_stats]
    assert [s["compute_fraction"] for s in stats_log[-2:]] == [s["compute_fraction"] for s in served_stats]


def test_a_controlnet_does_not_run_on_forecast_steps(spec_nodes, stats_log):
    """The ControlNet's network ran on every step before (ComfyUI computes its residuals before the
    model call, which a forecast step then did not use); now only on the computed steps."""
    import comfy.sample
    from devkit import reference_model as rm
    model = rm.load_reference()
    controlnet = _reference_controlnet()
    hint = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    control_calls = []
    net = controlnet.control_model
    handle = net.register_forward_pre_hook(lambda *a: control_calls.append(1))

    def sample(patcher):
        latent = torch.zeros(1, 16, 32, 32)
        c = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        positive, negative = ([[t, dict(d, control=c, control_apply_to_uncond=False)] for t, d in cond]
                              for cond in (rm.conditioning(0), rm.conditioning(rm.NULL_CLASS)))
        return comfy.sample.sample(patcher, comfy.sample.prepare_noise(latent, 1), 28, 2.0, "euler", "simple",
                                   positive, negative, latent, disable_pbar=True, seed=1)
    try:
        patched = simple(spec_nodes, model)
        served = sample(patched)
        s = stats_log[-1]
        assert s["forecast"] >= 4 and len(control_calls) == s["computed"], (len(control_calls), s["timeline"])
        del control_calls[:]
        through_call = sample(_with_foreign_wrapper(patched))
        assert len(control_calls) == 28
        assert torch.equal(served, through_call)
    finally:
        handle.remove()


def test_a_cond_that_shapes_its_output_goes_through_the_call(spec_nodes, stats_log, prepared_calls):
    """A cond with a strength or a time range (ComfyUI weighs or drops its output): the forecast
    step runs through ComfyUI's batch function, and the run forecasts as before."""
    import comfy.sample
    from devkit import reference_model as rm
    model = rm.load_reference()
    patched = simple(spec_nodes, model)
    for extra in ({"strength": 0.8}, {"start_percent": 0.0, "end_percent": 0.9}):
        del prepared_calls[:]
        latent = torch.zeros(1, 16, 32, 32)
        positive = [[t, dict(d, **extra)] for t, d in rm.conditioning(0)]
        comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 1), 28, 2.0, "euler", "simple", positive,
                            rm.conditioning(rm.NULL_CLASS), latent, disable_pbar=True, seed=1)
        s = stats_log[-1]
        assert s["forecast"] >= 4 and not s["internal_error"], extra
        assert len(prepared_calls) >= 28, extra           # forecast steps prepared too


def test_a_planned_target_with_a_cond_only_step_is_served_too(spec_nodes, stats_log, prepared_calls):
    """6x on 28 steps with CFG: the planned calls and the cond-only step reach ComfyUI, the forecast
    steps do not, and the picture (uncond derived where the plan says) is the one through the call."""
    from devkit import reference_model as rm
    model = rm.load_reference()
    patched = simple(spec_nodes, model, mode="speed_target", options=options(spec_nodes, target_speedup=6.0))
    served = rm.sample(patched, [1], [1000], steps=28)
    s = stats_log[-1]
    assert s["target_schedule"] == "planned" and s["cond_only_steps"] and not s["internal_error"], s
    assert len(prepared_calls) == len(s["planned_steps"]) + len(s["cond_only_steps"])
    del prepared_calls[:]
    through_call = rm.sample(_with_foreign_wrapper(patched), [1], [1000], steps=28)
    assert len(prepared_calls) == 28 and torch.equal(served, through_call)
    assert stats_log[-1]["timeline"] == s["timeline"]
