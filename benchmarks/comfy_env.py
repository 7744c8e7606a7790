"""Find ComfyUI, start it headless on the CPU, and load this pack the way ComfyUI does.

ComfyUI is looked up in this order: ``$COMFYUI_PATH``; the ComfyUI that contains this
pack (when it sits in ``ComfyUI/custom_nodes/``); ``~/ComfyUI``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "speculative_cache_pack"
COMFYUI_VERSION = "v0.3.64"  # the version the pack is tested against (pinned by setup)


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def comfyui_candidates() -> list[Path]:
    out = []
    if os.environ.get("COMFYUI_PATH"):
        out.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_ROOT.parent.name == "custom_nodes":
        out.append(PACK_ROOT.parent.parent)
    out.append(Path.home() / "ComfyUI")
    return out


def find_comfyui() -> Path | None:
    for c in comfyui_candidates():
        if _is_comfyui(c):
            return c.resolve()
    return None


_ready = None


def setup_comfyui(path: Path | None = None) -> Path:
    """Put ComfyUI on sys.path and force the CPU (before comfy.model_management loads)."""
    global _ready
    if _ready is not None:
        return _ready
    path = Path(path) if path else find_comfyui()
    if path is None:
        raise RuntimeError("ComfyUI not found; set COMFYUI_PATH (looked in: "
                           + ", ".join(str(c) for c in comfyui_candidates()) + ")")
    p = str(path)
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        import torch
        if not torch.cuda.is_available():
            args.cpu = True
    import utils.install_util  # noqa: F401  (see comfyui-internals: import-order trap)
    _ready = path
    return path


def load_pack(name: str = PACK_MODULE):
    """Import this repository as a package, as ComfyUI's loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pack_nodes():
    """The pack's node classes (needs ComfyUI set up)."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE}.nodes")
