"""The node as a user meets it: Debian's headless Chromium, driven by Playwright, against a
real ComfyUI server with this pack. Saves a screenshot to test-artifacts/."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from devkit.comfy_server import ROOT, ComfyServer, ui_graph, widget_defaults, with_tiny_models
from conftest import COMFYUI, IN_CI

pytestmark = pytest.mark.comfy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
STEPS = 12



def _playwright():
    """Playwright and Debian's Chromium; without them the browser tests skip on a developer's
    machine and fail under CI=true (CI must never pass by skipping them)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "Playwright (python package) not installed: pip install playwright"
    if missing is None and CHROMIUM is None:
        missing = "Chromium not found: apt-get install chromium (see docs/development.md)"
    if missing is not None:
        if IN_CI:
            pytest.fail(f"CI=true: {missing}")
        pytest.skip(missing)
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


def open_node_search(page):
    """Open the frontend's node search: through its own command where it has one (1.47 on
    ComfyUI 0.29: ``Workspace.SearchBox.Toggle``; a double-click on the canvas no longer opens
    it there), else by double-clicking the empty canvas until it is there (older frontends).
    Keeps a screenshot when it never opens."""
    search = page.get_by_placeholder(re.compile(r"^(search nodes|add a node)", re.I))
    has_command = page.evaluate("""() => (app.extensionManager?.command?.commands || [])
        .some(c => c.id === 'Workspace.SearchBox.Toggle')""")
    for _ in range(6):
        page.keyboard.press("Escape")
        if has_command:
            page.evaluate("() => app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
        else:
            page.mouse.dblclick(750, 450)
        try:
            search.first.wait_for(timeout=5_000)
            return search.first
        except Exception:
            page.wait_for_timeout(1_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "node_search_not_found.png"))
    raise AssertionError("the node search did not open (test-artifacts/node_search_not_found.png)")


# The panel of the Speculative Cache node of the graph on screen. (Frontend 1.47 keeps the DOM
# widgets of graphs loaded before, hidden: a bare class selector can find one of those.)
P = "[data-sc-current] "


def mark_panel(page, node_type="SpeculativeCacheSimple"):
    """Mark the panel of the graph's ``node_type`` node: selectors starting with ``P`` find
    its parts only. Waits for the node and its panel (a busy machine draws them late)."""
    page.wait_for_function("(type) => window.app?.graph?._nodes?.some(n => n.type === type && n.speculativeCachePanel)",
                           arg=node_type, timeout=30_000)
    page.evaluate("""(type) => {
        document.querySelectorAll('[data-sc-current]').forEach(e => e.removeAttribute('data-sc-current'));
        const n = app.graph._nodes.find(n => n.type === type);
        n.speculativeCachePanel.root.setAttribute('data-sc-current', '1'); }""", node_type)


def load_graph(page, graph):
    """Load ``graph`` and show it from its top left corner at scale 1 (frontend 1.47 keeps the
    previous view, and hides the DOM widgets of nodes off screen)."""
    page.evaluate("async (g) => { await app.loadGraphData(g); }", graph)
    count = len(graph.get("nodes", [])) if isinstance(graph, dict) else 0
    page.wait_for_function("(n) => (window.app?.graph?._nodes?.length || 0) >= n", arg=count, timeout=30_000)
    page.wait_for_timeout(400)         # (1.47 sets its own view once the graph is in)
    reset_view(page)


def reset_view(page):
    page.evaluate("""() => { const ds = app.canvas.ds; if (ds.changeScale) ds.changeScale(1, [0, 0]); else ds.scale = 1;
        ds.offset = [0, 0]; app.canvas.setDirty(true, true); }""")   # (1.47: offset reads as a copy)
    page.wait_for_timeout(300)


def wait_for_summary(page, text, node_type="SpeculativeCacheSimple", timeout=120_000):
    """Wait until the summary on the graph's ``node_type`` node contains ``text``."""
    page.wait_for_function("""([type, text]) => app.graph._nodes.find(n => n.type === type)
        ?.speculativeCachePanel?.text.textContent.includes(text)""", arg=[node_type, text], timeout=timeout)
    mark_panel(page, node_type)


def our_errors(page):
    """Console errors caused by this pack (the frontend logs some of its own offline)."""
    return [e for e in page.errors if "speculative" in e.lower() or "SpeculativeCache" in e]


def test_node_is_found_in_the_node_library_and_added(page):
    page.evaluate("() => app.graph.clear()")
    page.wait_for_timeout(1000)
    search = open_node_search(page)
    search.fill("Speculative Cache")
    entries = page.get_by_text(re.compile(r"model_patches [>/] speculative_cache"))   # the library entries
    entries.first.wait_for(timeout=15_000)
    page.wait_for_timeout(300)
    listed = page.locator("[role=option]").all_text_contents()
    assert not any("legacy" in t for t in listed)          # the deprecated node is not offered
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph._nodes.some(n => n.type === 'SpeculativeCacheSimple')", timeout=15_000)
    info = page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'SpeculativeCacheSimple');
        const w = n.widgets.find(w => w.name === 'speed');
        return {type: w.type, value: w.value, panel: !!n.speculativeCachePanel, title: n.title,
                inputs: n.inputs.map(i => i.name),
                widgets: n.widgets.filter(w => w.serialize !== false && w.name !== 'speculative_cache_stats').map(w => w.name),
                sliders: n.widgets.filter(w => w.type === 'slider').map(w => w.name)}; }""")
    assert info["title"] == "Speculative Cache"
    assert info["type"] == "slider" and info["value"] == 0.5
    assert info["widgets"] == ["mode", "speed", "start_percent", "end_percent"]
    assert "options" in info["inputs"] and info["panel"]
    assert our_errors(page) == []


def test_a_run_shows_summary_timeline_and_error_chart_on_the_node(page):
    """The main node fed by an Options node (a threshold the tiny random model passes), run
    from the browser: summary with the time saved, timeline, and the chart of each
    check's error against its threshold."""
    info = page.server.get("/object_info/SpeculativeCacheAdvancedOptions")["SpeculativeCacheAdvancedOptions"]
    defaults = widget_defaults(info)
    options = [dict(defaults, threshold=5.0)[n] for n in info["input_order"]["required"]]
    load_graph(page, ui_graph(["auto", 0.5, 0.0, 1.0], STEPS, options_widgets=options))
    page.evaluate("() => app.queuePrompt(0, 1)")
    wait_for_summary(page, f"/{STEPS} computed")
    reset_view(page)                   # the node on screen, whatever view the frontend chose meanwhile
    text = page.text_content(P + ".speculative-cache-summary")
    cells = page.locator(P + ".speculative-cache-timeline .speculative-cache-cell")
    assert cells.count() == STEPS
    forecast_cells = page.locator(P + ".speculative-cache-timeline .speculative-cache-F").count()
    assert forecast_cells > 0
    computed = int(text.split("/")[0])
    assert computed + forecast_cells == STEPS
    # auto looks back: the summary counts the computed steps that checked the forecasts before them
    assert "checked" in text and "x" in text and "MB" in text and "saved" in text
    # euler: the computed steps after forecasts corrected the path the forecasts took
    assert "corrected" in text
    # the chart: one mark per check (square under the tolerance, cross over), a dashed tolerance line,
    # labelled axes and a legend
    assert page.text_content(P + ".speculative-cache-axis-y") == "error (log)"
    assert "steps" in page.text_content(P + ".speculative-cache-axis-x")
    legend = page.text_content(P + ".speculative-cache-legend")
    assert "under tolerance" in legend and "over" in legend and page.is_visible(P + ".speculative-cache-legend")
    dots = page.locator(P + ".speculative-cache-chart .speculative-cache-error")
    assert dots.count() > 0 and page.locator(P + ".speculative-cache-chart .speculative-cache-threshold").count() == 1
    assert page.locator(P + ".speculative-cache-chart .accepted").count() > 0
    chart = page.locator(P + ".speculative-cache-chart").bounding_box()
    assert chart["height"] >= 20 and chart["y"] + chart["height"] <= area_bottom(page) + 1
    # the strip is really on screen, inside the widget area the frontend gave it
    strip = page.locator(P + ".speculative-cache-timeline").bounding_box()
    assert strip["height"] >= 8 and strip["y"] + strip["height"] <= area_bottom(page) + 1
    assert cells.first.is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    # move the graph below the frontend's top bar, so the node's title is in the picture
    page.evaluate("() => { app.canvas.ds.offset = [0, 90]; app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(400)
    # the node's box on screen, from its stats panel's own box (the panel sits 10 px inside the
    # node, 10 px below its widget's y; the title bar is 30 px)
    box = page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'SpeculativeCacheSimple');
        const w = n.widgets.find(w => w.name === 'speculative_cache_stats'), s = app.canvas.ds.scale;
        const r = document.querySelector('[data-sc-current].speculative-cache-stats').getBoundingClientRect();
        return {x: r.left - 10 * s, y: r.top - (w.y + 10 + 30) * s, w: n.size[0] * s, h: (n.size[1] + 40) * s}; }""")
    x, y = max(box["x"] - 10, 0), max(box["y"] - 10, 0)          # kept inside the page
    page.screenshot(path=str(ARTIFACTS / "node_after_run.png"),
                    clip={"x": x, "y": y, "width": min(box["w"] + 20, 1500 - x), "height": min(box["h"] + 20, 950 - y)})
    page.screenshot(path=str(ARTIFACTS / "graph_after_run.png"))
    assert our_errors(page) == []


def test_a_second_tabs_panel_stays_empty_while_the_first_tab_runs(page):
    """Two tabs on one server, the same graph open in both: the run queued from the first tab
    draws on the first tab's node only; the other tab's panel keeps waiting for a run."""
    graph = ui_graph(["auto", 0.5, 0.0, 1.0], STEPS)
    second = page.context.browser.new_page(viewport={"width": 1500, "height": 950})   # its own session
    try:
        second.goto(page.server.url)
        second.wait_for_function("() => window.app && window.app.graph && "
                                 "app.extensions?.some(e => e.name === 'SpeculativeCache.LiveStats')", timeout=90_000)
        load_graph(second, graph)
        load_graph(page, graph)
        mark_panel(second)
        waiting = second.text_content(P + ".speculative-cache-summary")
        assert page.evaluate("() => window.comfyAPI?.api?.api?.clientId ?? sessionStorage.getItem('clientId')") != \
            second.evaluate("() => window.comfyAPI?.api?.api?.clientId ?? sessionStorage.getItem('clientId')")
        page.evaluate("() => app.queuePrompt(0, 1)")
        wait_for_summary(page, f"/{STEPS} computed")
        second.wait_for_timeout(1000)
        assert second.text_content(P + ".speculative-cache-summary") == waiting
        assert second.evaluate("() => app.graph._nodes.find(n => n.type === 'SpeculativeCacheSimple')"
                               ".speculativeCacheStats ?? null") is None
    finally:
        second.close()


def test_the_summary_says_what_each_mode_did(page):
    """The panel's summary, from the pack's own module in the browser: lookback counts the checks
    and corrections, the probe what it verified and rejected, a target what was asked and reached."""
    texts = page.evaluate("""async () => {
        const m = await import('/extensions/speculative-cache/speculative_cache.js');
        const base = {steps: 28, computed: 11, timeline: 'C'.repeat(28), final: true, speedup: 2.5,
                      saved_seconds: 41, cache_bytes: 300000};
        return [m.summaryText({...base, acceptance: 'lookback', looked_back: 10, corrected: 8}),
                m.summaryText({...base, acceptance: 'probe', verified: 17, rejected: 2}),
                m.summaryText({...base, acceptance: 'lookback', looked_back: 6, target_speedup: 4,
                               target_schedule: 'planned'})]; }""")
    lookback, probe, target = texts
    assert "11/28 computed" in lookback and "10 checked, 8 corrected" in lookback and "2.5x" in lookback
    assert "17 verified, 2 rejected" in probe
    assert "asked 4.0x planned, reached 2.5x" in target


def area_bottom(page):
    """The bottom of the area the frontend gave the stats widget."""
    return page.evaluate("""() => document.querySelector('[data-sc-current].speculative-cache-stats')
        .parentElement.getBoundingClientRect().bottom""")


def test_setting_hides_the_stats(page):
    reset_view(page)
    page.evaluate("() => app.extensionManager.setting.set('SpeculativeCache.ShowStats', false)")
    mark_panel(page)
    # (the frontend redraws when it gets to it: waited for, up to 10 s, not a fixed pause that a
    # busy machine outlasts)
    page.wait_for_selector("[data-sc-current].speculative-cache-stats", state="hidden", timeout=10_000)
    assert not page.is_visible("[data-sc-current].speculative-cache-stats")
    page.evaluate("() => app.extensionManager.setting.set('SpeculativeCache.ShowStats', true)")
    page.wait_for_selector("[data-sc-current].speculative-cache-stats", state="visible", timeout=10_000)
    assert page.is_visible("[data-sc-current].speculative-cache-stats")


TOASTS = "() => [...document.querySelectorAll('.p-toast-message')].map(t => t.textContent.trim())"


def load_and_collect_alerts(page, workflow_js: str):
    """Load a workflow the way the frontend does for a dropped file (``loadGraphData``, which
    validates it against the frontend's workflow schema when Comfy.Validation.Workflows is on)
    and return what it put up: every toast that was not on screen before, and console errors."""
    before_toasts = set(page.evaluate(TOASTS))
    before_errors = len(page.errors)
    counts = page.evaluate(f"""async () => {{
        const wf = await ({workflow_js}); await app.loadGraphData(wf);
        return [wf.nodes.length, app.graph._nodes.length,
                app.graph._nodes.filter(n => n.type === 'SpeculativeCacheSimple').length,
                app.graph._nodes.filter(n => n.type === 'SpeculativeCacheEditRegion').length]; }}""")
    page.wait_for_timeout(400)
    toasts = [t for t in page.evaluate(TOASTS) if t not in before_toasts]
    return counts, toasts, page.errors[before_errors:]


def test_the_frontend_validates_workflows_and_reports_a_bad_one(page):
    """The control for the test below: the frontend's workflow validation is on, and a workflow
    outside its schema (a top-level id that is not a UUID) shows an alert this test sees."""
    # (on by default up to frontend 1.35; 1.47 ships it off: switched on here, as a user may)
    page.evaluate("() => app.extensionManager.setting.set('Comfy.Validation.Workflows', true)")
    page.wait_for_timeout(300)
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.Validation.Workflows')") is True
    _, toasts, _ = load_and_collect_alerts(page, """fetch('/api/workflow_templates/speculative-cache/flux_dev_text_to_image.json')
        .then(r => r.json()).then(wf => ({...wf, id: 12345}))""")
    assert any("workflow" in t.lower() for t in toasts), toasts
    for _ in range(20):                 # close the alerts, so the next test starts with none
        if page.evaluate("""() => { const b = document.querySelector('.p-toast-message .p-toast-close-button');
                                    if (b) b.click(); return !!b; }"""):
            page.wait_for_timeout(250)
        else:
            break
    assert page.evaluate(TOASTS) == []


@pytest.mark.parametrize("name", ["flux_dev_text_to_image", "hunyuan_video_text_to_video",
                                  "wan22_text_to_video_two_experts", "qwen_image_text_to_image",
                                  "flux_dev_compare_with_and_without_cache", "flux_fill_inpainting_edit_region",
                                  "sd15_token_pruning", "flux_dev_draft_and_final_with_options"])
def test_example_workflows_load_from_the_template_route(page, name):
    """Each shipped workflow loads from the template route with every node, no alert of any kind
    (schema validation, link repair, missing node) and no console error."""
    n_nodes, toasts, errors = load_and_collect_alerts(
        page, f"fetch('/api/workflow_templates/speculative-cache/{name}.json').then(r => r.json())")
    expected = {"wan22_text_to_video_two_experts": (2, 0), "flux_fill_inpainting_edit_region": (0, 1),
                "sd15_token_pruning": (0, 0), "flux_dev_draft_and_final_with_options": (2, 0)}.get(name, (1, 0))
    assert n_nodes[0] == n_nodes[1] and tuple(n_nodes[2:]) == expected
    assert toasts == []
    # the thumbnail the template browser asks for (custom nodes' templates are shown as <name>.jpg)
    thumbnail = page.evaluate(f"""async () => {{
        const r = await fetch('/api/workflow_templates/speculative-cache/{name}.jpg');
        return [r.status, r.headers.get('content-type'), (await r.arrayBuffer()).byteLength]; }}""")
    assert thumbnail[0] == 200 and thumbnail[1] == "image/jpeg" and thumbnail[2] > 5000, thumbnail
    assert [e for e in errors if "speculative" in e.lower()] == []


WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_workflow_runs_through_the_server_with_tiny_models(page, name):
    """Each shipped workflow as the frontend queues it (``app.graphToPrompt`` after loading it),
    its model files swapped for tiny models of their families, through the real server's
    /prompt: it runs to the end with every node of the pack in it, and the latents it makes
    are finite."""
    import time
    queued = page.evaluate(f"""async () => {{
        const r = await fetch('/api/workflow_templates/speculative-cache/{name}.json');
        await app.loadGraphData(await r.json());
        return (await app.graphToPrompt()).output; }}""")
    ours = sorted(n["class_type"] for n in queued.values() if n["class_type"].startswith("SpeculativeCache"))
    assert ours, "the workflow has no node of this pack"
    prompt = with_tiny_models(queued)
    assert sorted(n["class_type"] for n in prompt.values() if n["class_type"].startswith("SpeculativeCache")) == ours
    prompt_id = page.server.post("/prompt", {"prompt": prompt, "client_id": "workflow-test"})["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        history = page.server.get(f"/history/{prompt_id}").get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{name} did not finish in 300 s:\n" + page.server.log())
    assert history["status"]["status_str"] == "success", history["status"]
    sinks = [o["text"][0] for o in history["outputs"].values() if "text" in o]
    assert sinks and all("finite=True" in t for t in sinks), sinks


def test_a_graph_saved_with_the_legacy_node_loads_with_its_settings(page):
    """A workflow saved with the 19-input node (0.1): it loads with every widget holding its
    saved value (checked by input name), the node says it is the legacy one, and it runs."""
    wf = json.loads((ROOT / "tests" / "data" / "legacy_flux_workflow.json").read_text())
    saved = next(n for n in wf["nodes"] if n["type"] == "SpeculativeCache")["widgets_values"]
    order = [n for n in page.server.get("/object_info/SpeculativeCache")["SpeculativeCache"]["input_order"]["required"]
             if n != "model"]
    before = len(page.errors)
    values = page.evaluate("""async (wf) => { await app.loadGraphData(wf);
        const n = app.graph._nodes.find(n => n.type === 'SpeculativeCache');
        return {widgets: Object.fromEntries(n.widgets.filter(w => w.name !== 'speculative_cache_stats')
                                             .map(w => [w.name, w.value])),
                text: n.speculativeCachePanel?.text.textContent ?? ''}; }""", wf)
    assert values["widgets"] == dict(zip(order, saved, strict=True))
    assert values["widgets"]["max_forecast_steps"] == 4
    assert "Legacy node" in values["text"]
    assert [e for e in page.errors[before:] if "speculative" in e.lower()] == []
    # and it runs, through the same graph the browser builds
    legacy_graph = ui_graph(saved, STEPS, sc_type="SpeculativeCache")
    load_graph(page, legacy_graph)
    page.evaluate("() => app.queuePrompt(0, 1)")
    wait_for_summary(page, f"/{STEPS} computed", node_type="SpeculativeCache")
    assert our_errors(page) == []
