"""Setup step run by ``make setup``: find ComfyUI (or install the pinned version) and
install its Python requirements into the current interpreter's environment.

torch/torchvision/torchaudio are left out of ComfyUI's requirements here: the Makefile
installs torch itself (users of the pack bring their own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import COMFYUI_VERSION, comfyui_candidates, find_comfyui  # noqa: E402

REPO = "https://github.com/comfyanonymous/ComfyUI"
SKIP = {"torch", "torchvision", "torchaudio"}


def install_pinned(target: Path) -> bool:
    if shutil.which("git") is None:
        return False
    print(f"[setup] ComfyUI not found; cloning {COMFYUI_VERSION} into {target} ...", flush=True)
    try:
        subprocess.run(["git", "clone", "--depth", "1", "--branch", COMFYUI_VERSION, REPO, str(target)],
                       check=True, timeout=600)
        return True
    except (subprocess.SubprocessError, OSError) as e:
        print(f"[setup] could not clone ComfyUI ({e}).", flush=True)
        return False


def main() -> int:
    path = find_comfyui()
    if path is None:
        target = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()
        if not target.exists() and install_pinned(target):
            path = find_comfyui()
    if path is None:
        print("=" * 78)
        print("[setup] NO COMFYUI FOUND. Looked in: " + ", ".join(map(str, comfyui_candidates())))
        print("[setup] Point the pack at one:  export COMFYUI_PATH=/path/to/ComfyUI  and rerun.")
        print("[setup] Without it only the engine tests run; the ComfyUI tests and the demo skip.")
        print("=" * 78)
        return 0
    print(f"[setup] using ComfyUI at {path}", flush=True)
    reqs = []
    for line in (path / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").split("=")[0].strip().lower()
        if name not in SKIP:
            reqs.append(line)
    # main.py also imports requests, which requirements.txt does not list.
    reqs.append("requests")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
