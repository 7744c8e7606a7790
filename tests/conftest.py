"""Test setup. Engine tests need only torch. ComfyUI tests need a ComfyUI checkout
(found as in devkit/comfy_env.py); without one they skip with one loud line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: ComfyUI's own `nodes` must win over ours

from devkit import comfy_env  # noqa: E402

COMFYUI = comfy_env.find_comfyui()
_skipped_for_comfy: list[str] = []


def pytest_report_header(config):
    if COMFYUI:
        return f"ComfyUI {comfy_env.comfyui_version(COMFYUI)}: {COMFYUI}"
    if IN_CI:
        return "ComfyUI: NOT FOUND under CI=true: every ComfyUI test will fail (looked in " + comfy_env.where_looked() + ")"
    return "ComfyUI: NOT FOUND (set COMFYUI_PATH); ComfyUI tests will be skipped"


IN_CI = os.environ.get("CI", "").lower() == "true"


def require(module: str):
    """Import a test dependency (tests/requirements.txt): skip without it on a developer's
    machine, fail under CI=true, where the setup must have installed it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"CI=true: test dependency {module} is missing ({e})")
        pytest.skip(f"{module} not installed: pip install -r tests/requirements.txt")


def pytest_collection_modifyitems(config, items):
    if COMFYUI is not None or IN_CI:
        # Under CI a ComfyUI test never skips for lack of ComfyUI: it errors (spec_nodes says why).
        return
    marker = pytest.mark.skip(reason="ComfyUI not found: set COMFYUI_PATH to run the ComfyUI tests")
    for item in items:
        if "comfy" in item.keywords:
            item.add_marker(marker)
            _skipped_for_comfy.append(item.nodeid)


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: needs a ComfyUI checkout")


def pytest_terminal_summary(terminalreporter):
    if _skipped_for_comfy:
        terminalreporter.write_line(
            f"!!! COMFYUI NOT FOUND: {len(_skipped_for_comfy)} ComfyUI tests SKIPPED "
            f"(looked in {comfy_env.where_looked()}; set COMFYUI_PATH) !!!",
            red=True, bold=True)


@pytest.fixture(scope="session")
def pack():
    return comfy_env.load_pack()


@pytest.fixture(scope="session")
def core(pack):
    import importlib
    return importlib.import_module(f"{comfy_env.PACK_MODULE}.cache_core")


@pytest.fixture(scope="session")
def spec_nodes():
    """ComfyUI set up headless on the CPU; returns the pack's nodes module."""
    comfy_env.setup_comfyui(COMFYUI)
    return comfy_env.pack_nodes()


@pytest.fixture
def stats_log(spec_nodes):
    """Final stats of every run during the test, in order."""
    import importlib
    hooks = importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.step_cache.run_context")
    seen = []
    listener = lambda node_id, stats, final: final and seen.append(dict(stats, node=node_id))  # noqa: E731
    hooks.STEP_CACHE.listeners.append(listener)
    yield seen
    hooks.STEP_CACHE.listeners.remove(listener)


def cached(spec_nodes, model, **settings):
    """``model`` through the Speculative Cache node with these inputs."""
    return spec_nodes.SpeculativeCache.execute(model, **settings).result[0]


def simple(spec_nodes, model, **inputs):
    """``model`` through the main Speculative Cache node with these inputs."""
    return spec_nodes.SpeculativeCacheSimple.execute(model, **inputs).result[0]


def latent_parts(latent) -> list:
    """A latent's tensors: one, or each of a nested latent's (LTX-2's video and audio)."""
    return list(latent.unbind()) if getattr(latent, "is_nested", False) else [latent]


def same(a, b) -> bool:
    """Bit-identical latents (nested ones part by part)."""
    import torch
    return all(torch.equal(x, y) for x, y in zip(latent_parts(a), latent_parts(b), strict=True))


def finite(latent) -> bool:
    import torch
    return all(bool(torch.isfinite(t).all()) for t in latent_parts(latent))


def with_context_windows(model, length: int = 4, overlap: int = 2):
    """ComfyUI's Context Windows (Manual) node over the frames (dim 2) of a video latent."""
    import inspect
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode as node
    inputs = dict(context_length=length, context_overlap=overlap, context_schedule="standard_static",
                  context_stride=1, closed_loop=False, fuse_method="pyramid", dim=2)
    if "freenoise" in inspect.signature(node.execute).parameters:       # ComfyUI 0.8.0
        inputs["freenoise"] = False
    return node.execute(model, **inputs).result[0]


def options(spec_nodes, **inputs):
    """A Speculative Cache Options node's output with these inputs (the others at auto)."""
    return spec_nodes.SpeculativeCacheOptions.execute(**inputs).result[0]


def forget_warnings():
    """Forget which once-per-process warnings were given (so a test sees its own)."""
    import importlib
    importlib.import_module(f"{comfy_env.PACK_MODULE}.nodes.runtime.log")._warned.clear()


def config_of(patched):
    """The CacheConfig a patched model carries."""
    return patched.model_options["transformer_options"]["speculative_cache"].config


def live_tensor_count() -> int:
    """Tensors alive in the process (after a collection)."""
    import gc
    import warnings

    import torch
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch.distributed aliases
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def random_double_block_mlp(hidden: int = 32, tokens: int = 12, seed: int = 0):
    """ComfyUI's FLUX DoubleStreamBlock with random weights, a residual stream [2, tokens,
    hidden], a modulation, and the block's own image MLP output on every token of that
    stream: (block, stream, mod2, mlp_output). Built without autograd."""
    import comfy.ops
    import torch
    from comfy.ldm.flux.layers import DoubleStreamBlock
    blk = DoubleStreamBlock(hidden, 2, 4.0, qkv_bias=True, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        rows = torch.randn(2, tokens, hidden, generator=g)
        _, mod2 = blk.img_mod(torch.randn(2, hidden, generator=g))
        full = blk.img_mlp(torch.addcmul(mod2.shift, blk.img_norm2(rows), 1 + mod2.scale))
    return blk, rows, mod2, full
