"""Find ComfyUI, start it headless on the CPU, and load this pack the way ComfyUI does.

ComfyUI is looked up in this order: ``$COMFYUI_PATH``; the ComfyUI that contains this
pack (when it sits in ``ComfyUI/custom_nodes/``); ``~/ComfyUI``; the first source archive
named in ``$COMFYUI_ARCHIVE`` (space-separated paths of ComfyUI ``.tar.gz`` archives),
unpacked once into ``$COMFYUI_CACHE`` (default ``.cache/comfyui`` in this repository); and
last the archives in ``../shared/comfyui/`` beside this repository, when there are any."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tarfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE = "speculative_cache_pack"
COMFYUI_VERSION = "v0.3.64"  # the oldest version the pack is tested against (pinned by setup)
SHARED_ARCHIVES = PACK_ROOT.parent / "shared" / "comfyui"


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def cache_dir() -> Path:
    return Path(os.environ.get("COMFYUI_CACHE") or PACK_ROOT / ".cache" / "comfyui").expanduser()


def _version_key(path: Path):
    return [int(n) for n in re.findall(r"\d+", path.name)]


def archives() -> list[Path]:
    """ComfyUI source archives to use: ``$COMFYUI_ARCHIVE``, else the shared ones (oldest
    first)."""
    named = os.environ.get("COMFYUI_ARCHIVE", "").split()
    if named:
        return [Path(a).expanduser().resolve() for a in named]
    if SHARED_ARCHIVES.is_dir():
        return sorted(SHARED_ARCHIVES.glob("ComfyUI-*.tar.gz"), key=_version_key)
    return []


def unpack_archive(archive: Path) -> Path:
    """Unpack ``archive`` once into the cache folder; returns the ComfyUI folder inside."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"ComfyUI archive not found: {archive}")
    target = cache_dir() / archive.name.removesuffix(".tar.gz").removesuffix(".tgz")
    done = target / ".unpacked"
    if not done.is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        done.write_text(str(archive))
    inner = [p for p in target.iterdir() if p.is_dir() and _is_comfyui(p)]
    if _is_comfyui(target):
        return target.resolve()
    if len(inner) != 1:
        raise RuntimeError(f"{archive} does not hold one ComfyUI folder")
    return inner[0].resolve()


def comfyui_candidates() -> list[Path]:
    """Folders that may hold ComfyUI, in the order they are tried (archives not included)."""
    out = []
    if os.environ.get("COMFYUI_PATH"):
        out.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if PACK_ROOT.parent.name == "custom_nodes":
        out.append(PACK_ROOT.parent.parent)
    out.append(Path.home() / "ComfyUI")
    return out


def where_looked() -> str:
    places = [str(c) for c in comfyui_candidates()]
    places.append("$COMFYUI_ARCHIVE" + (f" ({os.environ['COMFYUI_ARCHIVE']})" if os.environ.get("COMFYUI_ARCHIVE") else ""))
    places.append(f"archives in {SHARED_ARCHIVES}")
    return ", ".join(places)


def find_comfyui(unpack: bool = True) -> Path | None:
    """The ComfyUI to use. With ``unpack`` a source archive is unpacked when no folder is
    found (cheap after the first time)."""
    if os.environ.get("COMFYUI_PATH"):
        # An explicit path wins and is never silently replaced by another ComfyUI.
        p = Path(os.environ["COMFYUI_PATH"]).expanduser()
        return p.resolve() if _is_comfyui(p) else None
    for c in comfyui_candidates():
        if _is_comfyui(c):
            return c.resolve()
    if unpack:
        for a in archives():
            try:
                return unpack_archive(a)
            except (OSError, RuntimeError, tarfile.TarError) as e:
                print(f"[comfy_env] could not unpack {a}: {e}", file=sys.stderr)
    return None


def comfyui_version(path: Path) -> str:
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


_ready = None


def setup_comfyui(path: Path | None = None) -> Path:
    """Put ComfyUI on sys.path and force the CPU (before comfy.model_management loads)."""
    global _ready
    if _ready is not None:
        return _ready
    path = Path(path) if path else find_comfyui()
    if path is None:
        raise RuntimeError("ComfyUI not found; set COMFYUI_PATH (looked in: " + where_looked() + ")")
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
