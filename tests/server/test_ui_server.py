"""A real ComfyUI server with this pack: the graph runs through /prompt and the
`speculative_cache.stats` events arrive on /ws with the numbers of the run."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from devkit.comfy_server import ComfyServer, api_graph, other_node_graph, widget_defaults
from conftest import COMFYUI

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def server():
    srv = ComfyServer(COMFYUI).start()
    yield srv
    srv.stop()


def run_prompt(server, prompt, timeout=120, queue_as_client=True):
    """Queue ``prompt`` (with this websocket client's id, or with none) and collect the events
    this client receives until the prompt has finished."""
    import websocket
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        body = {"prompt": prompt, "client_id": client_id} if queue_as_client else {"prompt": prompt}
        answer = server.post("/prompt", body)
        prompt_id = answer["prompt_id"]
        events = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            msg = json.loads(msg)
            events.append(msg)
            data = msg.get("data", {})
            if msg["type"] == "execution_error":
                raise AssertionError(f"execution error: {data}\n{server.log()}")
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
            if not queue_as_client and msg["type"] == "status" and \
                    data.get("status", {}).get("exec_info", {}).get("queue_remaining") == 0 and \
                    server.get(f"/history/{prompt_id}").get(prompt_id):
                break
        else:
            raise AssertionError("prompt did not finish\n" + server.log())
        return prompt_id, events
    finally:
        ws.close()


def sc_defaults(server):
    return widget_defaults(server.get("/object_info/SpeculativeCache")["SpeculativeCache"])


def test_stats_events_follow_the_run(server):
    steps = 12
    inputs = dict(sc_defaults(server), threshold=5.0)
    prompt_id, events = run_prompt(server, api_graph(inputs, steps=steps))
    stats = [e["data"] for e in events if e["type"] == "speculative_cache.stats"]
    assert stats, "no speculative_cache.stats events\n" + server.log()
    live = [s for s in stats if not s["final"]]
    final = [s for s in stats if s["final"]]
    assert len(live) == steps and len(final) == 1
    f = final[0]
    assert f["node"] == "10" and all(s["node"] == "10" for s in stats)
    assert f["steps"] == steps and len(f["timeline"]) == steps and set(f["timeline"]) <= set("CFR")
    assert f["computed"] + f["forecast"] == steps
    assert f["computed"] == f["timeline"].count("C") + f["timeline"].count("R")
    assert f["forecast"] == f["timeline"].count("F") > 0
    assert 0 < f["compute_fraction"] < 1 and f["speedup"] == pytest.approx(1 / f["compute_fraction"], rel=1e-2)
    assert f["cache_bytes"] > 0
    # live events fill the timeline step by step
    for i, s in enumerate(live):
        assert len(s["timeline"].replace(".", "")) == i + 1
    history = server.get(f"/history/{prompt_id}")[prompt_id]
    assert history["status"]["completed"]
    assert "finite=True" in history["outputs"]["5"]["text"][0]


def test_stats_go_only_to_the_client_that_queued_the_prompt(server):
    """A second websocket client that queued nothing receives none of the run's stats (ComfyUI's
    own progress events go to the queuing client too); the queuing client's stats carry the
    prompt's id; a prompt queued without a client id sends its stats to nobody."""
    import websocket
    other_id = uuid.uuid4().hex
    other = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={other_id}", timeout=5)
    try:
        inputs = dict(sc_defaults(server), threshold=5.0)
        prompt_id, events = run_prompt(server, api_graph(inputs, steps=8))
        mine = [e["data"] for e in events if e["type"] == "speculative_cache.stats"]
        assert len(mine) == 9 and all(s["prompt_id"] == prompt_id for s in mine)
        _, events = run_prompt(server, api_graph(inputs, steps=8, seed=4), queue_as_client=False)
        assert not [e for e in events if e["type"] == "speculative_cache.stats"]
        seen_by_other = []
        other.settimeout(0.5)
        while True:
            try:
                msg = other.recv()
            except websocket.WebSocketTimeoutException:
                break
            if isinstance(msg, str):
                seen_by_other.append(json.loads(msg)["type"])
        assert "status" in seen_by_other                      # it was connected and listening
        assert "speculative_cache.stats" not in seen_by_other, seen_by_other
    finally:
        other.close()


def test_main_node_with_options_node_runs_through_the_server(server):
    """The main node fed by an Options node, as a graph has them: the options reach the run,
    and the stats carry the speed target and the time saved."""
    options = dict(widget_defaults(server.get("/object_info/SpeculativeCacheAdvancedOptions")["SpeculativeCacheAdvancedOptions"]),
                   warmup_steps=2, threshold=5.0)
    _, events = run_prompt(server, api_graph({"mode": "speed_target", "speed": 0.25, "start_percent": 0.0,
                                              "end_percent": 1.0}, steps=12, sc_type="SpeculativeCacheSimple",
                                             options=options))
    final = [e["data"] for e in events if e["type"] == "speculative_cache.stats" and e["data"]["final"]][-1]
    assert final["node"] == "10" and final["target_speedup"] == 2.0
    assert final["timeline"].startswith("CC") and final["timeline"][2] != "C"   # warm-up 2 from the options
    assert final["elapsed_seconds"] > 0 and final["saved_seconds"] > 0 and final["errors"]


def test_a_prompt_with_the_first_options_node_still_runs(server):
    """A graph saved before 0.5 with the first Options node (node id SpeculativeCacheOptions,
    its inputs as they were): it validates and runs, and what it changed reaches the run."""
    info = server.get("/object_info/SpeculativeCacheOptions")["SpeculativeCacheOptions"]
    assert info["deprecated"]
    options = dict(widget_defaults(info), warmup_steps=2, threshold=5.0)
    assert options["order"] == 2 and options["step_weighting"] is False      # the old defaults
    _, events = run_prompt(server, api_graph({"mode": "speed_target", "speed": 0.25, "start_percent": 0.0,
                                              "end_percent": 1.0}, steps=12, sc_type="SpeculativeCacheSimple",
                                             options=options, options_type="SpeculativeCacheOptions"))
    final = [e["data"] for e in events if e["type"] == "speculative_cache.stats" and e["data"]["final"]][-1]
    assert final["target_speedup"] == 2.0 and final["timeline"].startswith("CC") and final["timeline"][2] != "C"


def test_a_prompt_with_inputs_the_node_no_longer_has_still_runs(server):
    """An old or hand-edited API prompt with inputs the node does not have (ComfyUI drops
    undeclared inputs before the node runs): it runs, with the inputs it does have."""
    inputs = {"mode": "auto", "speed": 0.0, "start_percent": 0.0, "end_percent": 1.0,
              "threshold": 0.3, "an_input_from_a_future_version": 1}
    _, events = run_prompt(server, api_graph(inputs, steps=6, sc_type="SpeculativeCacheSimple"))
    final = [e["data"] for e in events if e["type"] == "speculative_cache.stats" and e["data"]["final"]][-1]
    assert final["timeline"] == "C" * 6          # speed 0 was applied: off


def test_threshold_zero_reports_every_step_computed(server):
    inputs = dict(sc_defaults(server), threshold=0.0)
    _, events = run_prompt(server, api_graph(inputs, steps=8, seed=5))
    final = [e["data"] for e in events if e["type"] == "speculative_cache.stats" and e["data"]["final"]]
    assert final[-1]["timeline"] == "C" * 8 and final[-1]["forecast"] == 0


WORKFLOWS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


def test_example_workflows_are_served_as_templates(server):
    templates = server.get("/workflow_templates")
    ours = templates.get("speculative-cache")
    assert sorted(ours) == WORKFLOWS
    assert {"wan22_text_to_video_two_experts", "qwen_image_text_to_image"} <= set(ours)
    wf = server.get("/api/workflow_templates/speculative-cache/flux_dev_text_to_image.json")
    assert any(n["type"] == "SpeculativeCacheSimple" for n in wf["nodes"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_node_and_input_of_a_template_exists_on_the_server(server, name):
    """Through the real server's /object_info: every node type a shipped workflow uses exists,
    every linked input is one of its inputs with the same type, and it has as many widget
    values as the node has widgets (combos, numbers, strings, a seed's control widget)."""
    info = server.get("/object_info")
    wf = server.get(f"/api/workflow_templates/speculative-cache/{name}.json")
    assert any(n["type"] in ("SpeculativeCacheSimple", "SpeculativeCacheEditRegion", "SpeculativeCacheTokenPruning")
               for n in wf["nodes"])
    for node in wf["nodes"]:
        assert node["type"] in info, f"{name}: no node type {node['type']} on this ComfyUI"
        spec = info[node["type"]]["input"]
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        for inp in node["inputs"]:
            assert inp["name"] in inputs, (name, node["type"], inp["name"])
            assert inputs[inp["name"]][0] == inp["type"], (name, node["type"], inp["name"])
        widgets = 0
        for n, entry in inputs.items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets += 1 + bool(opts.get("control_after_generate"))
        assert len(node["widgets_values"]) == widgets, (name, node["type"], node["widgets_values"])


def test_web_extension_is_served(server):
    assert "/extensions/speculative-cache/speculative_cache.js" in server.get("/extensions")


@pytest.mark.parametrize("name, value", [("threshold", 99.0), ("threshold", -1.0), ("order", 9),
                                         ("max_forecast_steps", 0), ("metric", "no_such_metric"),
                                         ("speed", 1.5), ("mode", "no_such_mode")])
def test_out_of_range_inputs_are_refused_with_the_input_name(server, name, value):
    """Values outside a widget's range, sent straight to /prompt (a script, an old or edited
    workflow), are refused by ComfyUI's validation before anything runs, naming the input.
    (ComfyUI 0.3.64 does not check a V3 combo's value: there the node itself refuses it with
    an error naming the input, before any sampling.)"""
    import urllib.error
    if name in ("speed", "mode"):       # the main node's inputs
        graph = api_graph({"mode": "auto", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0, name: value},
                          steps=4, sc_type="SpeculativeCacheSimple")
    else:
        graph = api_graph(dict(sc_defaults(server), **{name: value}), steps=4)
    try:
        answer = server.post("/prompt", {"prompt": graph})
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert e.code == 400
        errors = body["node_errors"]["10"]["errors"]
        assert any(name in (err.get("extra_info", {}).get("input_name", "") + err.get("details", ""))
                   for err in errors), errors
        return
    assert isinstance(value, str), f"{name}={value!r} was accepted"
    deadline = time.time() + 60
    while time.time() < deadline:
        entry = server.get(f"/history/{answer['prompt_id']}").get(answer["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.3)
    status = entry["status"]
    assert status["status_str"] == "error" and not status["completed"]
    error = next(m[1] for m in status["messages"] if m[0] == "execution_error")
    assert error["node_id"] == "10" and name in error["exception_message"]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("node, name, value", [
    ("main", "speed", NAN), ("main", "speed", INF), ("main", "start_percent", NAN),
    ("options", "threshold", NAN), ("options", "memory_budget_mb", NAN), ("options", "target_speedup", NAN),
    ("options", "threshold_decay", INF),
    ("edit_region", "margin", NAN), ("token_pruning", "ratio", NAN)])
def test_nan_and_infinite_inputs_are_refused_with_the_input_name(server, node, name, value):
    """NaN passes ComfyUI's own min/max check (every comparison with it is false): the node
    refuses it, and an infinite value, with an error that names the input, before sampling."""
    import websocket
    main = {"mode": "auto", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0}
    if node == "main":
        graph = api_graph(dict(main, **{name: value}), steps=4, sc_type="SpeculativeCacheSimple")
    elif node == "options":
        opts = widget_defaults(server.get("/object_info/SpeculativeCacheAdvancedOptions")["SpeculativeCacheAdvancedOptions"])
        graph = api_graph(main, steps=4, sc_type="SpeculativeCacheSimple", options=dict(opts, **{name: value}))
    else:
        kind = {"edit_region": "SpeculativeCacheEditRegion", "token_pruning": "SpeculativeCacheTokenPruning"}[node]
        inputs = dict(widget_defaults(server.get(f"/object_info/{kind}")[kind]), **{name: value})
        graph = api_graph({}, steps=4, sc_type=kind)
        graph["10"]["inputs"].update(inputs)
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=60)
    try:
        answer = urllib_request(server, {"prompt": graph, "client_id": client_id})
        if "prompt_id" not in answer:                            # refused by ComfyUI's validation
            assert name in json.dumps(answer.get("node_errors")), answer
            return
        prompt_id = answer["prompt_id"]
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            msg = json.loads(msg)
            if msg["type"] == "execution_error" and msg["data"].get("prompt_id") == prompt_id:
                assert name in msg["data"]["exception_message"], msg["data"]["exception_message"]
                assert "finite" in msg["data"]["exception_message"] or "[0, 1]" in msg["data"]["exception_message"]
                return
            if msg["type"] == "executing" and msg["data"].get("node") is None and \
                    msg["data"].get("prompt_id") == prompt_id:
                raise AssertionError(f"{name}={value} ran")
    finally:
        ws.close()


def urllib_request(server, body):
    """POST /prompt; the answer, or the error body when ComfyUI refuses the prompt."""
    import urllib.error
    try:
        return server.post("/prompt", body)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def _digest(server, prompt_id) -> str:
    text = server.get(f"/history/{prompt_id}")[prompt_id]["outputs"]["5"]["text"][0]
    assert "finite=True" in text
    return text.split("digest=")[1]


def _failing_graph(graph, where):
    """``graph`` with the pack's code at ``where`` made to raise on its first call, by a test node
    between the model and the node that patches it."""
    graph = json.loads(json.dumps(graph))
    patching = next(k for k, n in graph.items() if n["inputs"].get("model") == ["1", 0])
    graph["12"] = {"class_type": "SCTestFailOnce", "inputs": {"model": ["1", 0], "where": where, "on_call": 1}}
    graph[patching]["inputs"]["model"] = ["12", 0]
    return graph


def _pruning_graph():
    return other_node_graph("token_pruning", steps=8, cfg=5.0, seed=3, width=128, height=128, batch=1, main={})


SERVED_FAULTS = {
    "auto: lookback record": ("auto", "cache_core.run:Chunk.record"),
    "probe: forecast": ("probe", "cache_core.run:Chunk.predict"),
    "probe: block patch": ("probe", "nodes.step_cache.block_call:BlockCall.block"),
    "token pruning: attention patch": ("pruning", "nodes.token_pruning.pruning:select_dynamic"),
}


@pytest.mark.parametrize("case", list(SERVED_FAULTS))
def test_an_error_of_ours_in_a_served_prompt_leaves_it_to_complete_uncached(server, case):
    """Through the real server: the pack's own code fails at a hook point on its first call; the
    prompt completes (no execution error), its picture is the uncached one bit for bit, the
    run's final stats say what failed, and the console says it once."""
    mode, where = SERVED_FAULTS[case]
    if mode == "pruning":
        plain = _pruning_graph()
        plain["4"]["inputs"]["model"] = ["1", 0]
        failing = _failing_graph(_pruning_graph(), where)
    else:
        main = {"mode": mode, "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0}
        graph = api_graph(main, steps=10, sc_type="SpeculativeCacheSimple", options=None)
        plain = json.loads(json.dumps(graph))
        plain["10"]["inputs"]["speed"] = 0.0                 # the main node off: bit-identical to no node
        failing = _failing_graph(graph, where)
    plain_id, _ = run_prompt(server, plain)
    seen = len(server.log(whole=True))
    prompt_id, events = run_prompt(server, failing)           # raises on an execution error
    assert _digest(server, prompt_id) == _digest(server, plain_id)
    said = [line for line in server.log(whole=True)[seen:].splitlines()
            if "injected failure" in line and "continues without" in line]     # the warning
    assert len(said) == 1, server.log()
    if mode != "pruning":
        final = [e["data"] for e in events if e["type"] == "speculative_cache.stats" and e["data"]["final"]]
        assert len(final) == 1 and "injected failure" in final[0]["internal_error"]
