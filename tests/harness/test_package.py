"""The published pack carries the product only: the registry archive, built the way `comfy node
publish` builds it (comfy-cli's own zip_files: git-tracked files less .comfyignore), holds the
nodes, the engine, the frontend, the workflows and the docs, and no reference weights, tests,
benchmarks or lab."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

from devkit.comfy_env import PACK_ROOT

PRODUCT = ["__init__.py", "pyproject.toml", "README.md", "LICENSE", "nodes/__init__.py", "nodes/step_cache/node.py",
           "nodes/runtime/feature.py", "cache_core/__init__.py", "cache_core/recipe.py", "cache_core/families.py",
           "web/js/speculative_cache.js", "workflows/flux_dev_text_to_image.json",
           "workflows/flux_dev_text_to_image.jpg"]
DEVELOPMENT = ("tests/", "devkit/", "benchmarks/", ".ci/")


def test_the_registry_archive_holds_the_product_only(tmp_path):
    archive = tmp_path / "node.zip"
    includes = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    subprocess.run([sys.executable, "-c", "import sys; from comfy_cli.file_utils import zip_files; "
                    "zip_files(sys.argv[1], includes=sys.argv[2:])", str(archive), *includes],
                   cwd=PACK_ROOT, check=True, capture_output=True, text=True)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        size = sum(i.file_size for i in z.infolist())
    assert not [n for n in names if n.endswith((".safetensors", ".pt", ".ckpt"))], names
    assert not [n for n in names if n.startswith(DEVELOPMENT)], [n for n in names if n.startswith(DEVELOPMENT)]
    assert not [p for p in PRODUCT if p not in names], [p for p in PRODUCT if p not in names]
    assert size < 2 * 2**20, f"{size / 2**20:.1f} MiB unpacked"
