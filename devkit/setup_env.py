"""Setup and test steps run by ``make setup`` / ``make test``.

``setup``: find the ComfyUI(s) to test against (see ``comfy_env``; every archive named in
``$COMFYUI_ARCHIVE``, or the one ComfyUI found, or the archives in ``../shared/comfyui``)
and install each one's Python requirements into the current environment. It redoes a
ComfyUI's part whenever that ComfyUI (its folder or its requirements) changes. Exact pins
that differ between versions (the frontend, its templates and docs packages) go into a per-version folder put
first on ``PYTHONPATH`` when that version's tests run.

``test``: the whole suite on the first ComfyUI, then the ComfyUI tests (``-m comfy``) on
each further one; the last line adds them up.

torch/torchvision/torchaudio are left out of ComfyUI's requirements here: the Makefile
installs torch itself (users of the pack bring their own)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env  # noqa: E402

REPO = "https://github.com/comfyanonymous/ComfyUI"
SKIP = {"torch", "torchvision", "torchaudio"}
# ComfyUI's frontend and its data packages (workflow templates, embedded node docs) are pinned
# exactly and differ between versions; a frontend that finds older ones than its ComfyUI asks for
# puts up warnings over the canvas (frontend 1.47 on ComfyUI 0.29). Each version gets its own, in
# its overlay folder, with their own dependencies (the templates package is split into data
# packages from 0.8 on; they depend only on each other).
PER_VERSION = {"comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs"}


def say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def install_pinned(target: Path) -> bool:
    if shutil.which("git") is None:
        return False
    say(f"ComfyUI not found; cloning {comfy_env.COMFYUI_VERSION} into {target} ...")
    try:
        subprocess.run(["git", "clone", "--depth", "1", "--branch", comfy_env.COMFYUI_VERSION, REPO, str(target)],
                       check=True, timeout=600)
        return True
    except (subprocess.SubprocessError, OSError) as e:
        say(f"could not clone ComfyUI ({e}).")
        return False


def comfyuis() -> list[Path]:
    """The ComfyUI folders to set up and test against, in order."""
    if os.environ.get("COMFYUI_PATH"):
        # An explicit folder is used, or the pinned ComfyUI is cloned into it; never another one.
        found = comfy_env.find_comfyui(unpack=False)
        target = Path(os.environ["COMFYUI_PATH"]).expanduser()
        if found is None and not target.exists() and install_pinned(target):
            found = comfy_env.find_comfyui(unpack=False)
        return [found] if found else []
    if os.environ.get("COMFYUI_ARCHIVE"):
        return [comfy_env.unpack_archive(a) for a in comfy_env.archives()]
    found = comfy_env.find_comfyui(unpack=False)
    if found is not None:
        return [found]
    shared = comfy_env.archives()
    if shared:
        return [comfy_env.unpack_archive(a) for a in shared]
    target = Path.home() / "ComfyUI"
    if not target.exists() and install_pinned(target):
        found = comfy_env.find_comfyui(unpack=False)
    return [found] if found else []


def _name(req: str) -> str:
    return re.split(r"[<>=~!;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def overlay_dir(path: Path) -> Path:
    return comfy_env.cache_dir() / "site" / (path.name + "-" + hashlib.sha1(str(path).encode()).hexdigest()[:8])


def requirements(path: Path) -> list[str]:
    out = []
    for line in (path / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and _name(line) not in SKIP:
            out.append(line)
    out.append("requests")  # main.py imports requests, which requirements.txt does not list
    return out


def setup_one(path: Path, first: bool) -> None:
    reqs = requirements(path)
    stamp_key = hashlib.sha1(json.dumps([str(path), reqs, first, sorted(PER_VERSION)]).encode()).hexdigest()[:16]
    stamp = Path(sys.prefix) / f".comfyui-{stamp_key}"
    overlay = overlay_dir(path)
    if stamp.is_file():
        say(f"ComfyUI {comfy_env.comfyui_version(path)} at {path}: requirements already installed")
        return
    say(f"ComfyUI {comfy_env.comfyui_version(path)} at {path}: installing its requirements ...")
    common, separate = [], []
    for r in reqs:
        name, pinned = _name(r), "==" in r
        if not first and name in PER_VERSION and pinned and _installed(name) not in (None, r.split("==", 1)[1].strip()):
            separate.append(r)
        else:
            common.append(r)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *common], check=True)
    if overlay.exists():
        shutil.rmtree(overlay)
    if separate:
        say(f"  version-specific packages for this ComfyUI: {' '.join(separate)} (in {overlay})")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(overlay), *separate],
                       check=True)
    stamp.write_text(str(path))


def setup() -> int:
    paths = comfyuis()
    if not paths:
        print("=" * 78)
        say("NO COMFYUI FOUND. Looked in: " + comfy_env.where_looked())
        say("Point the pack at one:  export COMFYUI_PATH=/path/to/ComfyUI  (or COMFYUI_ARCHIVE=ComfyUI-X.tar.gz)")
        say("Without it only the engine tests run; the ComfyUI tests and the demo skip.")
        print("=" * 78)
        return 0
    for i, p in enumerate(paths):
        setup_one(p, first=i == 0)
    return 0


def _counts(text: str) -> dict:
    """pytest's closing line, as counts."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    out = {}
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1]):
            what = "errors" if what.startswith("error") else what
            out[what] = out.get(what, 0) + int(n)
    return out


def _workers(env: dict) -> list[str]:
    """pytest-xdist over the machine's cores (TEST_WORKERS overrides; 1: one process), a file's
    tests together in one worker (its module fixtures build models once), one torch thread per
    core: the tiny models are bound by Python, so two processes run nearly twice the tests of
    one (ComfyUI 0.8.0's tests on 2 cores: 9:14 against 13:10)."""
    cores = os.cpu_count() or 1
    workers = int(os.environ.get("TEST_WORKERS") or min(cores, 4))
    if workers <= 1:
        return []
    env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    return ["-n", str(workers), "--dist", "loadfile"]


def test(pytest_args: list[str]) -> int:
    paths = comfyuis()
    runs = [(p, i == 0) for i, p in enumerate(paths)] or [(None, True)]
    total, worst = {}, 0
    for path, first in runs:
        env = dict(os.environ)
        label = "no ComfyUI"
        if path is not None:
            env["COMFYUI_PATH"] = str(path)
            label = f"ComfyUI {comfy_env.comfyui_version(path)}"
            overlay = overlay_dir(path)
            if overlay.is_dir():
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(overlay), env.get("PYTHONPATH")]))
        # (the slowest tests of each version, to keep the three within CI's time)
        cmd = [sys.executable, "-m", "pytest", "-q", "--durations=15", "tests", *_workers(env), *pytest_args]
        if not first:
            cmd += ["-m", "comfy"]
        print(f"\n===== tests on {label}{'' if first else ' (ComfyUI tests only)'}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=comfy_env.PACK_ROOT)
        captured = []
        for line in proc.stdout:
            sys.stdout.write(line)
            captured.append(line)
        rc = proc.wait()
        for k, v in _counts("".join(captured)).items():
            total[k] = total.get(k, 0) + v
        if rc != 0:
            worst = rc
    if len(runs) > 1:
        print("\n===== all ComfyUI versions: " + ", ".join(f"{comfy_env.comfyui_version(p)}" for p, _ in runs))
        line = f"{total.get('passed', 0)} passed, {total.get('failed', 0) + total.get('errors', 0)} failed"
        if total.get("skipped"):
            line += f", {total['skipped']} skipped"
        print(line, flush=True)
    return worst


def main(argv: list[str]) -> int:
    if argv and argv[0] == "test":
        return test(argv[1:])
    if argv and argv[0] == "paths":
        for p in comfyuis():
            print(p)
        return 0
    return setup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
