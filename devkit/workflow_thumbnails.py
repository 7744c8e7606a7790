"""Makes the thumbnails the template browser shows for the shipped workflows
(workflows/<name>.jpg, served at /api/workflow_templates/speculative-cache/<name>.jpg, the URL the
frontend asks for): each workflow loaded into the real frontend of a real server, fitted to the
view, photographed by headless Chromium.

    .venv/bin/python -m devkit.workflow_thumbnails          # after changing a workflow
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

from devkit import comfy_env
from devkit.comfy_server import ROOT, ComfyServer

SIZE = (480, 360)
AREA = (100, 120, 2120, 1590)   # x, y, width, height on the 2560 x 2000 page (clear of the frontend's
#                                  side bar, tabs and minimap); 4:3 like SIZE, large enough for full detail


def main() -> int:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("Chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    server = ComfyServer(comfy_env.find_comfyui())
    _model_files_the_workflows_name(server)
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 2560, "height": 2000})
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph", timeout=90_000)
            for path in sorted((ROOT / "workflows").glob("*.json")):
                page.evaluate("async (wf) => { await app.loadGraphData(wf); }", __import__("json").loads(path.read_text()))
                page.wait_for_timeout(500)
                # fit the graph into AREA (clear of the frontend's side bar, tabs and minimap)
                page.evaluate("""([ax, ay, aw, ah]) => { const ds = app.canvas.ds;
                    const r = app.canvas.canvas.getBoundingClientRect();
                    const xs = app.graph._nodes.map(n => [n.pos[0], n.pos[1] - 30, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
                    const b = [Math.min(...xs.map(x => x[0])), Math.min(...xs.map(x => x[1])),
                               Math.max(...xs.map(x => x[2])), Math.max(...xs.map(x => x[3]))];
                    const s = Math.min(aw / (b[2] - b[0] + 40), ah / (b[3] - b[1] + 40));
                    if (ds.changeScale) ds.changeScale(s, [0, 0]); else ds.scale = s;
                    ds.offset = [(ax - r.x + (aw - (b[2] - b[0]) * s) / 2) / s - b[0],
                                 (ay - r.y + (ah - (b[3] - b[1]) * s) / 2) / s - b[1]];
                    app.canvas.setDirty(true, true); }""", list(AREA))
                page.wait_for_timeout(500)
                shot = page.screenshot(type="png", clip=dict(zip(("x", "y", "width", "height"), AREA)))
                image = Image.open(io.BytesIO(shot)).convert("RGB")
                image.thumbnail((SIZE[0] * 2, SIZE[1] * 2))
                canvas = Image.new("RGB", (SIZE[0] * 2, SIZE[1] * 2), image.getpixel((0, 0)))
                canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
                canvas.resize(SIZE, Image.LANCZOS).save(path.with_suffix(".jpg"), quality=82, optimize=True)
                print(f"wrote {path.with_suffix('.jpg').relative_to(ROOT)}")
            browser.close()
    finally:
        server.stop()
    return 0


def _model_files_the_workflows_name(server) -> None:
    """Empty files under the names the workflows' loaders ask for (so the frontend marks no
    model as missing in the picture) and the inpainting workflow's input image."""
    import json
    from PIL import Image
    base = Path(server.tmp.name)
    for path in (ROOT / "workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            for value in node.get("widgets_values") or []:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    for folder in ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae"):
                        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                        (base / "models" / folder / value).touch()
                elif isinstance(value, str) and value.endswith(".png"):
                    Image.new("RGB", (64, 64), (128, 128, 128)).save(base / "input" / value)


if __name__ == "__main__":
    raise SystemExit(main())
