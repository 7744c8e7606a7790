"""ComfyUI's MultiGPU CFG Split (0.29): a step's cond and uncond calls run concurrently, one
worker thread per device, each on its own deep clone of the model, through ComfyUI's own
``create_multigpu_deepclones`` and thread pool. Two devices are faked on the CPU
(``get_all_torch_devices`` returns cpu:0 and cpu:1; research/comfyui-internals.md §8). In every
mode and granularity, with the Edit Region and cond-only steps, the node takes on two devices the
decisions it takes on one (the same timeline, verifications and compute), the picture is the
single-device one within float tolerance (cond and uncond run as two batches of one), repeated
runs are identical bit for bit, and nothing warns about the block layout (before, the two
threads' blocks landed in one call: the probe dropped to the output level and stopped
verifying, 25 dB from its single-device picture)."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import forget_warnings, options, simple

pytestmark = pytest.mark.comfy


@pytest.fixture
def two_devices(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("comfy.multigpu") is None:
        pytest.skip(f"MultiGPU CFG Split is not in ComfyUI {comfy_env.comfyui_version(comfy_env.find_comfyui())}")
    import comfy.model_management as mm
    devices = [torch.device("cpu", 0), torch.device("cpu", 1)]
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: list(devices))
    return devices


def split(patcher):
    """``patcher`` as ComfyUI's MultiGPU CFG Split node leaves it: a deep clone per extra device."""
    import comfy.multigpu
    return comfy.multigpu.create_multigpu_deepclones(patcher, 2)


def _load_again(name, seed, **loader_options):
    return tm.build(name, seed=seed)


def tiny(name, seed=3):
    """A tiny model whose patcher can be loaded again, as a core loader's can (the deep clones are
    fresh loads of the same weights)."""
    m = tm.build(name, seed=seed)
    m.cached_patcher_init = (_load_again, (name, seed))
    return m


def threads_running(monkeypatch, block_class) -> set:
    """The threads the model's blocks run in during the test."""
    seen = set()
    forward = block_class.forward

    def recording(self, *a, **k):
        seen.add(threading.current_thread().name)
        return forward(self, *a, **k)
    monkeypatch.setattr(block_class, "forward", recording)
    return seen


CASES = {
    "auto": dict(),
    "probe": dict(mode="probe", options=dict(threshold=5.0)),
    "block granularity": dict(mode="probe", options=dict(threshold=5.0, granularity="block")),
    "planned 4x": dict(mode="speed_target", options=dict(target_speedup=4.0)),
    "planned 4.5x, a cond-only step": dict(mode="speed_target", options=dict(target_speedup=4.5)),
    "adaptive target": dict(mode="speed_target", speed=0.4),
}


@pytest.mark.parametrize("order", ["cache after the split", "split after the cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_devices_take_the_decisions_of_one(spec_nodes, stats_log, two_devices, monkeypatch, caplog, case, order):
    import comfy.ldm.flux.layers as flux_layers
    inputs = dict(CASES[case])
    if "options" in inputs:
        inputs["options"] = options(spec_nodes, **inputs["options"])
    base = tiny("flux")
    steps = 12
    single = tm.sample(simple(spec_nodes, base, **inputs), "flux", steps=steps)
    alone = stats_log[-1]
    threads = threads_running(monkeypatch, flux_layers.DoubleStreamBlock)
    if order == "cache after the split":
        patched = simple(spec_nodes, split(base), **inputs)
    else:
        patched = split(simple(spec_nodes, base, **inputs))
    forget_warnings()
    with caplog.at_level("WARNING", logger="speculative_cache"):
        multi = tm.sample(patched, "flux", steps=steps)
        s = stats_log[-1]
        again = tm.sample(patched, "flux", steps=steps)
        repeated = stats_log[-1]
    assert len(threads) >= 2, threads                           # the calls really ran in two threads
    assert not [r.getMessage() for r in caplog.records], [r.getMessage() for r in caplog.records]
    # the same decisions, counted once: timeline, level, verifications, compute
    for key in ("timeline", "mode", "forecast", "verified", "rejected", "cond_only_steps", "compute_fraction"):
        assert s[key] == alone[key], (key, s[key], alone[key])
    assert not s["internal_error"] and "F" in s["timeline"]
    if case == "block granularity":
        assert s["mode"] == "block"
    if case.startswith("planned 4.5x"):
        assert s["cond_only_steps"], s
    # the single-device picture within float tolerance (cond and uncond run as two batches of
    # one instead of one batch of two: about 1e-7 apart)
    assert ((multi - single).norm() / single.norm()).item() < 1e-5
    # repeated runs: bit for bit
    assert repeated["timeline"] == s["timeline"] and torch.equal(again, multi)


@pytest.mark.parametrize("case", ["probe", "block granularity"])
def test_a_device_that_calls_the_model_during_the_first_call_waits_for_what_it_learns(
        spec_nodes, stats_log, two_devices, monkeypatch, case):
    """The run's first model call learns where the cache sits (whether the DIFFUSION_MODEL hook
    fires, block or stack granularity). Here the first device's first call is held up before the
    diffusion model runs, so the other device's thread calls the model meanwhile: it must wait for
    what the first call learns, not take the step at another level (a CI run caught it counting an
    output-level chunk besides its blocks: compute 0.4227 where one device has 0.4167)."""
    import time
    import comfy.ldm.flux.model as flux_model
    inputs = dict(CASES[case])
    inputs["options"] = options(spec_nodes, **inputs["options"])
    base = tiny("flux")
    tm.sample(simple(spec_nodes, base, **inputs), "flux", steps=12)
    alone = stats_log[-1]
    forward, calls, lock = flux_model.Flux.forward, [], threading.Lock()

    def first_call_held_up(self, *a, **k):
        with lock:
            calls.append(threading.current_thread().name)
            first = len(calls) == 1
        if first:
            time.sleep(0.5)         # the other device's thread reaches the model meanwhile
        return forward(self, *a, **k)
    monkeypatch.setattr(flux_model.Flux, "forward", first_call_held_up)
    tm.sample(simple(spec_nodes, split(base), **inputs), "flux", steps=12)
    s = stats_log[-1]
    assert len(set(calls[:2])) == 2, calls[:2]              # the first two calls: one per device
    for key in ("timeline", "mode", "verified", "rejected", "compute_fraction"):
        assert s[key] == alone[key], (key, s[key], alone[key])
    assert not s["internal_error"]


def test_a_rejection_on_one_device_recomputes_both(spec_nodes, stats_log, two_devices, monkeypatch):
    """The probe's threshold between cond's and uncond's errors at the first verified step: on
    one device the batch (both streams) is recomputed; on two, cond's forecast passes on one
    device while uncond's fails on the other, and the step is recomputed on both as well."""
    import importlib
    run_module = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.run")
    verified = []
    verify = run_module.Chunk.verify

    def recording(self, pred, real, feature=None, rows=None):
        ok = verify(self, pred, real, feature, rows)
        verified.append((self.run.step_index, len(self.keys), ok, list(self.errors)))
        return ok
    monkeypatch.setattr(run_module.Chunk, "verify", recording)
    base = tiny("flux")
    probe = dict(mode="probe", options=options(spec_nodes, threshold=5.0))
    tm.sample(simple(spec_nodes, base, **probe), "flux", steps=12)
    step, _, _, errors = verified[0]
    assert len(errors) == 2 and errors[0] != errors[1]
    between = options(spec_nodes, threshold=(errors[0] + errors[1]) / 2)
    verified.clear()
    single = tm.sample(simple(spec_nodes, base, mode="probe", options=between), "flux", steps=12)
    alone = stats_log[-1]
    assert alone["timeline"][step] == "R" and verified == [(step, 2, False, verified[0][3])]
    verified.clear()
    multi = tm.sample(simple(spec_nodes, split(base), mode="probe", options=between), "flux", steps=12)
    s = stats_log[-1]
    assert sorted(ok for _, rows, ok, _ in verified) == [False, True]      # one passed, one failed
    assert s["timeline"] == alone["timeline"] and s["compute_fraction"] == alone["compute_fraction"]
    assert s["rejected"] == alone["rejected"] == 1 and s["verified"] == alone["verified"]
    assert ((multi - single).norm() / single.norm()).item() < 1e-5


def _load_reference_again(name, **loader_options):
    from devkit import reference_model as rm
    return rm.load_reference(name)


@pytest.mark.parametrize("with_cache", [False, True], ids=["edit region", "edit region and step cache"])
def test_edit_region_on_two_devices(spec_nodes, stats_log, two_devices, with_cache):
    """Inpainting on the reference model with the Edit Region node (and the step cache): the
    region's work and picture on two devices are those of one, and repeat bit for bit."""
    from devkit import reference_model as rm
    edit = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.edit_region.region")
    seen = []
    listener = lambda node_id, stats, final: seen.append(stats)  # noqa: E731
    edit.EDIT.listeners.append(listener)
    try:
        model = rm.load_reference()
        model.cached_patcher_init = (_load_reference_again, ("reference",))
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1

        def patched(m):
            m = comfy_env.pack_nodes().SpeculativeCacheEditRegion.execute(m).result[0]
            return simple(spec_nodes, m, speed=0.4) if with_cache else m

        def inpaint(m):
            out = rm.inpaint(patched(m), [0], [1000], mask, steps=12)
            return out, dict(seen[-1]), (stats_log[-1] if with_cache else None)
        single, region_alone, cache_alone = inpaint(model)
        multi, region, cache = inpaint(split(model))
        again, _, _ = inpaint(split(model))
    finally:
        edit.EDIT.listeners.remove(listener)
    assert not region["disabled"] and region["partial_calls"] > 0
    assert region["compute_fraction"] == pytest.approx(region_alone["compute_fraction"], rel=1e-9)
    # (each device's calls: cond and uncond as two calls per step where one device makes one)
    assert region["model_calls"] == 2 * region_alone["model_calls"]
    if with_cache:
        assert cache["timeline"] == cache_alone["timeline"] and not cache["internal_error"]
    assert ((multi - single).norm() / single.norm()).item() < 1e-5
    assert torch.equal(again, multi)


def test_speed_0_under_two_devices_is_plain_multigpu(spec_nodes, stats_log, two_devices):
    base = tiny("flux")
    plain = tm.sample(split(base), "flux", steps=8)
    assert torch.equal(tm.sample(simple(spec_nodes, split(base), speed=0.0), "flux", steps=8), plain)
