"""The README is for a newcomer (short), and every link in the README, the changelog and the docs
resolves to a file of the repository."""

from __future__ import annotations

import re

from devkit.comfy_env import PACK_ROOT

DOCS = [PACK_ROOT / "README.md", PACK_ROOT / "CHANGELOG.md", *sorted((PACK_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_reads_in_five_minutes():
    lines = (PACK_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    assert lines[0].startswith("# ") and "![" in "\n".join(lines[:12]), "a title and a picture on the first screen"


def test_every_link_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"(https?:|mailto:|#)", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists() or PACK_ROOT not in path.parents and path != PACK_ROOT:
                broken.append(f"{doc.relative_to(PACK_ROOT)}: {target}")
    assert not broken, broken


def test_every_workflow_has_a_valid_id_or_none():
    """The frontend's workflow schema allows a UUID as the top-level id, or none."""
    import json
    import uuid
    for path in sorted((PACK_ROOT / "workflows").glob("*.json")):
        graph = json.loads(path.read_text())
        if "id" in graph:
            assert isinstance(graph["id"], str) and str(uuid.UUID(graph["id"])) == graph["id"].lower(), path.name


def test_every_workflow_has_a_thumbnail_no_older_than_itself():
    """The template browser shows workflows/<name>.jpg for a custom node's workflow <name>.json
    (devkit/workflow_thumbnails.py makes them); each is committed with or after its workflow."""
    import subprocess

    def committed(path):
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path], cwd=PACK_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out) if out else None
    for path in sorted((PACK_ROOT / "workflows").glob("*.json")):
        jpg = path.with_suffix(".jpg")
        assert jpg.is_file() and jpg.read_bytes()[:3] == b"\xff\xd8\xff", jpg.name
        rel = lambda p: str(p.relative_to(PACK_ROOT))  # noqa: E731
        assert committed(rel(jpg)) is not None and committed(rel(jpg)) >= committed(rel(path)), jpg.name


def test_the_settings_path_the_readme_names_is_the_frontends():
    js = (PACK_ROOT / "web" / "js" / "speculative_cache.js").read_text()
    category = re.search(r"category: \[([^\]]*)\]", js).group(1)
    name = re.search(r'\bname: "([^"]+)"', js[js.index("category:"):]).group(1)
    groups = [c.strip().strip('"') for c in category.split(",")][:2]
    path = " → ".join(["Settings", *groups, name])
    assert path in (PACK_ROOT / "README.md").read_text(), path


def test_the_readme_screenshot_is_no_older_than_the_panel_code():
    """web/screenshot.png is the browser test's picture of a real run (test-artifacts/
    node_after_run.png, copied when the panel changes): its last commit is not older than the
    panel code's."""
    import subprocess

    def committed(path):
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path], cwd=PACK_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out) if out else None
    js, png = committed("web/js/speculative_cache.js"), committed("web/screenshot.png")
    assert js is not None and png is not None and png >= js, (png, js)
    assert "web/screenshot.png" in (PACK_ROOT / "README.md").read_text()


# "0.388 → 42.8 dB": a compute fraction and the PSNR it gave (bold marks allowed around the dB).
COMPUTE_TO_DB = re.compile(r"\b(0\.\d+)\s*(?:→|->)\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*dB")


def committed_results():
    """Every (compute fraction, PSNR) pair of every committed results file: each row (a dict at
    any depth) crossed with itself over its compute-like and dB-like fields."""
    import json

    def rows(obj):
        if isinstance(obj, dict):
            yield obj
            for v in obj.values():
                yield from rows(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from rows(v)
    pairs = set()
    for path in sorted((PACK_ROOT / "benchmarks" / "results").rglob("*.json")):
        for row in rows(json.loads(path.read_text())):
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            computes = [v for k, v in numbers.items() if "compute" in k]
            dbs = [v for k, v in numbers.items() if "psnr" in k or k.endswith("_db")]
            pairs.update((c, d, path.name) for c in computes for d in dbs)
    return pairs


def test_every_compute_to_db_figure_is_in_a_committed_results_file():
    """Each "compute → PSNR" figure in the README and the docs is a row of a results file in
    benchmarks/results/ (to the digits shown), so no figure outlives the run that made it."""
    pairs = committed_results()
    assert len(pairs) > 100

    def backed(compute: str, db: str) -> bool:
        dc = len(compute.split(".")[1])
        dd = len(db.split(".")[1]) if "." in db else 0
        return any(abs(round(c, dc) - float(compute)) < 1e-9 and abs(round(d, dd) - float(db)) < 1e-9
                   for c, d, _ in pairs)
    unbacked, seen = [], 0
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for m in COMPUTE_TO_DB.finditer(line):
                seen += 1
                if not backed(m.group(1), m.group(2)):
                    unbacked.append(f"{doc.relative_to(PACK_ROOT)}:{number}: {m.group(0)}")
    assert seen > 20, "the pattern no longer finds the docs' figures"
    assert not unbacked, "figures no committed results file holds:\n" + "\n".join(unbacked)
