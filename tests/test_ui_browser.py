"""The node as a user meets it: Debian's headless Chromium, driven by Playwright, against a
real ComfyUI server with this pack. Saves a screenshot to test-artifacts/."""

from __future__ import annotations

import shutil

import pytest

from comfy_server import ROOT, ComfyServer, ui_graph, widget_defaults
from conftest import COMFYUI

pytestmark = pytest.mark.comfy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
STEPS = 12



def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright (python package) not installed: pip install playwright")
    if CHROMIUM is None:
        pytest.skip("Chromium not found: apt-get install chromium (see README, 'Tests')")
    return sync_playwright


@pytest.fixture(scope="module")
def page():
    sync_playwright = _playwright()
    server = ComfyServer(COMFYUI).start()
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        pg = browser.new_page(viewport={"width": 1500, "height": 950})
        pg.on("console", lambda m: m.type == "error" and errors.append(m.text))
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                             "app.extensions?.some(e => e.name === 'SpeculativeCache.LiveStats')",
                             timeout=90_000)
        pg.server, pg.errors = server, errors
        yield pg
        browser.close()
    server.stop()


def our_errors(page):
    """Console errors caused by this pack (the frontend logs some of its own offline)."""
    return [e for e in page.errors if "speculative" in e.lower() or "SpeculativeCache" in e]


def test_node_is_found_in_the_node_library_and_added(page):
    page.evaluate("() => app.graph.clear()")
    page.wait_for_timeout(1000)
    page.mouse.dblclick(750, 450)                      # the node search dialog
    search = page.get_by_placeholder("Search Nodes...")
    search.wait_for(timeout=15_000)
    search.fill("Speculative Cache")
    page.get_by_text("model_patches > speculative_cache").wait_for(timeout=15_000)  # the library entry
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph._nodes.some(n => n.type === 'SpeculativeCache')", timeout=15_000)
    info = page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'SpeculativeCache');
        const w = n.widgets.find(w => w.name === 'threshold');
        return {type: w.type, value: w.value, panel: !!n.speculativeCachePanel,
                sliders: n.widgets.filter(w => w.type === 'slider').map(w => w.name)}; }""")
    assert info["type"] == "slider" and info["value"] > 0
    assert info["panel"]
    assert {"threshold", "order", "max_forecast_steps"} <= set(info["sliders"])
    assert our_errors(page) == []


def test_a_run_shows_summary_and_timeline_on_the_node(page):
    defaults = widget_defaults(page.server.get("/object_info/SpeculativeCache")["SpeculativeCache"])
    order = page.server.get("/object_info/SpeculativeCache")["SpeculativeCache"]["input_order"]["required"]
    widgets = [dict(defaults, threshold=5.0)[n] for n in order if n != "model"]
    page.evaluate("(g) => app.loadGraphData(g)", ui_graph(widgets, STEPS))
    page.wait_for_timeout(500)
    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function(
        f"() => document.querySelector('.speculative-cache-summary')?.textContent.includes('/{STEPS} computed')",
        timeout=120_000)
    text = page.text_content(".speculative-cache-summary")
    cells = page.locator(".speculative-cache-timeline .speculative-cache-cell")
    assert cells.count() == STEPS
    forecast_cells = page.locator(".speculative-cache-timeline .speculative-cache-F").count()
    assert forecast_cells > 0
    computed = int(text.split("/")[0])
    assert computed + forecast_cells == STEPS
    assert "rejected" in text and "x" in text and "MB" in text
    # the strip is really on screen, inside the widget area the frontend gave it
    strip = page.locator(".speculative-cache-timeline").bounding_box()
    area = page.evaluate("""() => { const b = document.querySelector('.speculative-cache-stats')
        .parentElement.getBoundingClientRect(); return {y: b.y, bottom: b.bottom}; }""")
    assert strip["height"] >= 8 and strip["y"] + strip["height"] <= area["bottom"] + 1
    assert cells.first.is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    box = page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'SpeculativeCache');
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - 30]);
        const c = app.canvas.canvas.getBoundingClientRect(); const s = app.canvas.ds.scale;
        return {x: x + c.x, y: y + c.y, w: n.size[0] * s, h: (n.size[1] + 40) * s}; }""")
    page.screenshot(path=str(ARTIFACTS / "node_after_run.png"),
                    clip={"x": max(box["x"] - 10, 0), "y": max(box["y"] - 10, 0),
                          "width": box["w"] + 20, "height": box["h"] + 20})
    page.screenshot(path=str(ARTIFACTS / "graph_after_run.png"))
    assert our_errors(page) == []


def test_setting_hides_the_stats(page):
    page.evaluate("() => app.extensionManager.setting.set('SpeculativeCache.ShowStats', false)")
    page.wait_for_timeout(300)
    assert not page.is_visible(".speculative-cache-stats")
    page.evaluate("() => app.extensionManager.setting.set('SpeculativeCache.ShowStats', true)")
    page.wait_for_timeout(300)
    assert page.is_visible(".speculative-cache-stats")


@pytest.mark.parametrize("name", ["flux_dev_text_to_image", "hunyuan_video_text_to_video",
                                  "wan22_text_to_video_two_experts", "qwen_image_text_to_image"])
def test_example_workflows_load_from_the_template_route(page, name):
    before = len(page.errors)
    n_nodes = page.evaluate(f"""async () => {{
        const r = await fetch('/api/workflow_templates/speculative-cache/{name}.json');
        const wf = await r.json(); await app.loadGraphData(wf);
        return [wf.nodes.length, app.graph._nodes.length,
                app.graph._nodes.filter(n => n.type === 'SpeculativeCache').length]; }}""")
    assert n_nodes[0] == n_nodes[1] and n_nodes[2] == (2 if name.startswith("wan22") else 1)
    new_errors = [e for e in page.errors[before:] if "speculative" in e.lower()]
    assert new_errors == []
