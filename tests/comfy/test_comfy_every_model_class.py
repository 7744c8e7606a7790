"""Every model class of the running ComfyUI (``comfy.supported_models.models``) through the main
node: each is built tiny from its own config class (devkit/tiny_models.py) and sampled by the
real sampler at speed 0 (bit-identical to no cache) and at the node's defaults (finite, no
internal error, at the level the family registry names for its diffusion model). Every
diffusion-model class of 0.3.64, 0.8.0 and 0.29.0 is built; the classes that are not diffusion
models are named below. A new class of a newer ComfyUI fails the first test until it is built
in devkit/tiny_models.py or named here with a reason."""

from __future__ import annotations

import importlib

import pytest

from devkit import comfy_env
from devkit import tiny_models as tm
from conftest import finite, latent_parts, same, simple

pytestmark = pytest.mark.comfy

# Classes the sampler never runs: they are loaded by ComfyUI's model loaders but are not
# diffusion models.
NOT_DIFFUSION = {
    "RT_DETR_v4": "object detector",
    "SAM3": "segmentation model",
    "SAM31": "segmentation model",
    "DepthAnything3": "depth estimator",
}

# Diffusion-model classes with no tiny build, and why (none today: a class goes here only with a
# reason it cannot be built at a tiny size).
NOT_BUILT_TINY: dict = {}


def _running_version() -> str:
    return comfy_env.comfyui_version(comfy_env.find_comfyui())


def _tiny_name_by_class() -> dict:
    by_class = {}
    for name, spec in tm.CONFIGS.items():
        by_class.setdefault(spec["cls"], name)
    return by_class


def test_every_model_class_is_built_tiny_or_named_with_its_reason(spec_nodes):
    import comfy.supported_models as sm
    classes = [c.__name__ for c in sm.models]
    assert len(classes) > 50
    built = _tiny_name_by_class()
    unaccounted = [c for c in classes if c not in built and c not in NOT_DIFFUSION and c not in NOT_BUILT_TINY]
    assert not unaccounted, (f"ComfyUI {_running_version()} has model classes with no tiny build in "
                             f"devkit/tiny_models.py and no reason here: {unaccounted}")
    stale = sorted(set(NOT_BUILT_TINY) & set(built))
    assert not stale, f"built tiny now, take them off NOT_BUILT_TINY: {stale}"


@pytest.mark.parametrize("name", sorted(tm.CONFIGS))
def test_model_class_runs_through_the_node_at_speed_0_defaults_and_probe(spec_nodes, stats_log, name):
    """Speed 0 changes nothing; the defaults (lookback: the whole output forecast) and mode probe
    (forecast, then verify, at the level the registry names) run clean. Whether the defaults
    skip work depends on the model's dynamics, which random weights do not have: the family
    tests (test_comfy_families.py) check the forecasting itself."""
    if not tm.available(name):
        pytest.skip(f"{tm.CONFIGS[name]['cls']} is not in ComfyUI {_running_version()}")
    families = importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core.families")
    m = tm.build(name, seed=5)
    fam = families.family_of(m.get_model_object("diffusion_model"))
    assert fam is not families.GENERIC, f"{tm.CONFIGS[name]['cls']}: no registry entry for its diffusion model"
    steps, side = 6, 16          # the U-Nets' 32 x 32 latents cost most of this test's time: 16 x 16
    ref = tm.sample(m, name, steps=steps, max_side=side)
    assert finite(ref)
    assert same(tm.sample(simple(spec_nodes, m, speed=0.0), name, steps=steps, max_side=side), ref)
    assert stats_log[-1]["compute_fraction"] == 1.0
    for inputs, level in (({}, "output"), ({"mode": "probe"}, "stack" if fam.block_level else "output")):
        out = tm.sample(simple(spec_nodes, m, **inputs), name, steps=steps, max_side=side)
        s = stats_log[-1]
        assert finite(out) and [t.shape for t in latent_parts(out)] == [t.shape for t in latent_parts(ref)], inputs
        assert not s["internal_error"] and s["steps"] == steps, inputs
        assert s["mode"] == level, (inputs, fam.name, s["mode"])
