"""ComfyUI's MultiGPU CFG Split (0.29): a step's cond and uncond calls run concurrently, one
worker thread per device, each on its own deep clone of the model, through ComfyUI's own
``create_multigpu_deepclones`` and thread pool. Two devices are faked on the CPU
(``get_all_torch_devices`` returns cpu:0 and cpu:1; research/comfyui-internals.md §8). In every
mode tested the node takes on two devices the decisions it takes on one (the same timeline), the
picture is the single-device one within float tolerance, repeated runs take the same decisions,
and nothing warns about the block layout (before, the two threads' blocks landed in one call: the probe dropped
to the output level and stopped verifying, 25 dB from its single-device picture)."""

from __future__ import annotations

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


# (Block granularity under two devices computes every step, and the probe's compute fraction
# counts a device's verification differently: both still open, issue 34.)
CASES = {
    "auto": dict(),
    "probe": dict(mode="probe", options=dict(threshold=5.0)),
    "planned 4x": dict(mode="speed_target", options=dict(target_speedup=4.0)),
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
    assert s["timeline"] == alone["timeline"] and s["mode"] == alone["mode"], (s["timeline"], alone["timeline"])
    assert s["forecast"] == alone["forecast"] and not s["internal_error"]
    # Float tolerance: the probe's picture on two devices is within 4e-4 of its single-device one
    # (about 70 dB; before, 25 dB), not bit for bit yet (issue 34)
    assert ((multi - single).norm() / single.norm()).item() < 1e-3
    # Repeated runs: the same decisions; the picture within float tolerance (which device gets
    # which call can change from run to run: not bit for bit yet, issue 34)
    assert repeated["timeline"] == s["timeline"]
    assert ((again - multi).norm() / multi.norm()).item() < 1e-3


def test_speed_0_under_two_devices_is_plain_multigpu(spec_nodes, stats_log, two_devices):
    base = tiny("flux")
    plain = tm.sample(split(base), "flux", steps=8)
    assert torch.equal(tm.sample(simple(spec_nodes, split(base), speed=0.0), "flux", steps=8), plain)
