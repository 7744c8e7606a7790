"""The pack as ComfyUI loads it (ComfyUI's own custom-node loader), and the example
workflows against ComfyUI's real node definitions."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks import comfy_env

pytestmark = pytest.mark.comfy

WORKFLOWS = sorted((comfy_env.PACK_ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def comfy_nodes(spec_nodes):
    import nodes
    asyncio.run(nodes.init_builtin_extra_nodes())
    assert asyncio.run(nodes.load_custom_node(str(comfy_env.PACK_ROOT)))
    return nodes


def test_comfyui_loader_registers_the_node_and_web_dir(comfy_nodes):
    assert "SpeculativeCache" in comfy_nodes.NODE_CLASS_MAPPINGS
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.get("SpeculativeCache") == "Speculative Cache"
    web_dirs = [d for d in comfy_nodes.EXTENSION_WEB_DIRS.values() if d.endswith("web/js")]
    assert any(str(comfy_env.PACK_ROOT) in d for d in web_dirs)


def _widget_inputs(node_class):
    info = node_class.GET_NODE_INFO_V1() if hasattr(node_class, "GET_NODE_INFO_V1") else None
    if info is not None:
        order = info["input_order"]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    else:
        types = node_class.INPUT_TYPES()
        spec = {**types.get("required", {}), **types.get("optional", {})}
        order = {"required": list(types.get("required", {})), "optional": list(types.get("optional", {}))}
    names = order.get("required", []) + order.get("optional", [])
    out = []
    for n in names:
        t = spec[n][0]
        opts = spec[n][1] if len(spec[n]) > 1 else {}
        if isinstance(t, list) or t in WIDGET_TYPES:
            out.append(n)
            if opts.get("control_after_generate"):
                out.append(n + ":control")
    return out, {n: spec[n][0] for n in names}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_matches_comfyui_nodes(comfy_nodes, path):
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    types = [n["type"] for n in wf["nodes"]]
    assert "SpeculativeCache" in types
    for node in wf["nodes"]:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        assert cls is not None, f"{path.name}: unknown node {node['type']}"
        widgets, input_types = _widget_inputs(cls)
        assert len(node["widgets_values"]) == len(widgets), (node["type"], widgets, node["widgets_values"])
        for inp in node["inputs"]:
            assert inp["name"] in input_types, (node["type"], inp["name"])
    for link_id, src, sslot, dst, dslot, typ in wf["links"]:
        assert by_id[src]["outputs"][sslot]["type"] == typ
        assert by_id[dst]["inputs"][dslot]["type"] == typ
        assert by_id[dst]["inputs"][dslot]["link"] == link_id
    # Every Speculative Cache sits between a model loader and a sampler
    for sc in (n for n in wf["nodes"] if n["type"] == "SpeculativeCache"):
        downstream = {by_id[dst]["type"] for _, src, _, dst, _, _ in wf["links"] if src == sc["id"]}
        assert downstream in ({"KSampler"}, {"KSamplerAdvanced"})


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_settings_are_valid_node_settings(spec_nodes, path):
    """The Speculative Cache widget values in the workflow build a working config."""
    wf = json.loads(path.read_text())
    sc = next(n for n in wf["nodes"] if n["type"] == "SpeculativeCache")
    widgets, _ = _widget_inputs(spec_nodes.SpeculativeCache)
    settings = dict(zip(widgets, sc["widgets_values"]))
    import benchmarks.tiny_models as tm
    out = spec_nodes.SpeculativeCache.execute(tm.build("flux"), **settings)
    assert out.result[0] is not None
