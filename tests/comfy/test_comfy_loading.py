"""The pack as ComfyUI loads it (ComfyUI's own custom-node loader), and the example
workflows against ComfyUI's real node definitions."""

from __future__ import annotations

import asyncio
import json

import pytest

from devkit import comfy_env

pytestmark = pytest.mark.comfy

WORKFLOWS = sorted((comfy_env.PACK_ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
OUR_NODES = {"SpeculativeCacheSimple", "SpeculativeCacheEditRegion", "SpeculativeCacheTokenPruning"}


@pytest.fixture(scope="module")
def comfy_nodes(spec_nodes):
    import nodes
    asyncio.run(nodes.init_builtin_extra_nodes())
    assert asyncio.run(nodes.load_custom_node(str(comfy_env.PACK_ROOT)))
    return nodes


def test_comfyui_loader_registers_the_node_and_web_dir(comfy_nodes):
    names = comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert names.get("SpeculativeCacheSimple") == "Speculative Cache"
    assert names.get("SpeculativeCacheAdvancedOptions") == "Speculative Cache Options"
    # graphs saved with the first Options node still find it, marked deprecated
    assert "before 0.5" in names.get("SpeculativeCacheOptions")
    assert comfy_nodes.NODE_CLASS_MAPPINGS["SpeculativeCacheOptions"].GET_SCHEMA().is_deprecated
    # graphs saved with the 19-input node still find it, marked deprecated
    assert "legacy" in names.get("SpeculativeCache")
    assert comfy_nodes.NODE_CLASS_MAPPINGS["SpeculativeCache"].GET_SCHEMA().is_deprecated
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
    assert OUR_NODES & set(types)
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
    for sc in (n for n in wf["nodes"] if n["type"] in OUR_NODES):
        downstream = {by_id[dst]["type"] for _, src, _, dst, _, _ in wf["links"] if src == sc["id"]}
        assert downstream in ({"KSampler"}, {"KSamplerAdvanced"})


# Workflows that set the nodes' inputs on purpose; every other one keeps each node at its defaults.
SET_ON_PURPOSE = {"flux_dev_draft_and_final_with_options"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_settings_are_valid_node_settings(spec_nodes, path):
    """The Speculative Cache widget values in the workflow (and those of the Options node feeding
    it) build a working config."""
    wf = json.loads(path.read_text())
    import devkit.tiny_models as tm
    by_id = {n["id"]: n for n in wf["nodes"]}
    defaults = {"SpeculativeCacheSimple": {"mode": "auto", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0},
                "SpeculativeCacheEditRegion": {"margin": 2, "refresh_interval": 3, "final_refresh_steps": 1,
                                               "context": "linear"},
                "SpeculativeCacheTokenPruning": {"ratio": 0.5, "refresh_interval": 3, "layers": "self-attention"}}
    family = {"SpeculativeCacheTokenPruning": "sd15"}
    for sc in (n for n in wf["nodes"] if n["type"] in OUR_NODES):
        node_class = getattr(spec_nodes, sc["type"])
        widgets, _ = _widget_inputs(node_class)
        settings = dict(zip(widgets, sc["widgets_values"]))
        assert set(settings) == set(defaults[sc["type"]])
        if path.stem not in SET_ON_PURPOSE:
            assert settings == defaults[sc["type"]]
            assert {i.id: i.default for i in node_class.GET_SCHEMA().inputs if i.id in settings} == settings
        options = None
        link = next((i["link"] for i in sc["inputs"] if i["name"] == "options" and i["link"] is not None), None)
        if link is not None:
            src = by_id[next(s for lid, s, _, _, _, _ in wf["links"] if lid == link)]
            option_widgets, _ = _widget_inputs(getattr(spec_nodes, "SpeculativeCacheOptions"))
            options = spec_nodes.SpeculativeCacheOptions.execute(
                **dict(zip(option_widgets, src["widgets_values"], strict=True))).result[0]
            assert options, f"{path.name}: an Options node that sets nothing"
        model = tm.build(family.get(sc["type"], "flux"))
        out = node_class.execute(model, **settings, **({"options": options} if options else {}))
        assert out.result[0] is not None
        if sc["type"] == "SpeculativeCacheTokenPruning":
            assert out.result[0] is not model            # the U-Net got the pruning patches


def test_the_draft_and_final_workflow_sets_what_it_says(spec_nodes):
    """Its draft asks the Options node for a planned 6x target; its final keeps lookback with a longer
    warm-up and end."""
    wf = json.loads((comfy_env.PACK_ROOT / "workflows" / "flux_dev_draft_and_final_with_options.json").read_text())
    option_widgets, _ = _widget_inputs(spec_nodes.SpeculativeCacheOptions)
    chosen = {n["title"]: spec_nodes.SpeculativeCacheOptions.execute(
        **dict(zip(option_widgets, n["widgets_values"], strict=True))).result[0]
        for n in wf["nodes"] if n["type"] == "SpeculativeCacheAdvancedOptions"}
    assert sorted(chosen.values(), key=len) == [{"target_speedup": 6.0}, {"warmup_steps": 4, "final_full_steps": 2}]


def test_comparison_workflow_samples_the_same_seed_with_and_without_the_cache():
    """Two KSamplers with the same settings, conditioning and latent: one through the node,
    one straight from the loader; their images are stitched side by side."""
    wf = json.loads((comfy_env.PACK_ROOT / "workflows" / "flux_dev_compare_with_and_without_cache.json").read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    source = {(dst, dslot): src for _, src, _, dst, dslot, _ in wf["links"]}
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 2 and samplers[0]["widgets_values"] == samplers[1]["widgets_values"]
    models = sorted(by_id[source[(k["id"], 0)]]["type"] for k in samplers)
    assert models == ["SpeculativeCacheSimple", "UNETLoader"]
    for slot in (1, 2, 3):              # positive, negative, latent: the same nodes
        assert source[(samplers[0]["id"], slot)] == source[(samplers[1]["id"], slot)]
    stitch = next(n for n in wf["nodes"] if n["type"] == "ImageStitch")
    assert {by_id[source[(stitch["id"], s)]]["type"] for s in (0, 1)} == {"VAEDecode"}
