"""A real ComfyUI server (main.py --cpu on a free loopback port) with this pack and the
development node pack (devkit/ui_testpack: a tiny FLUX, conditioning, a latent sink) in its
custom nodes; plus graph helpers, for the server and browser tests and the soak."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "speculative-cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui: Path):
        self.comfyui = Path(comfyui)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="sc-server-")
        base = Path(self.tmp.name)
        nodes_dir = base / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
        (nodes_dir / "sc_ui_testpack").symlink_to(ROOT / "devkit" / "ui_testpack", target_is_directory=True)
        for sub in ("output", "input", "temp", "user", "models"):
            (base / sub).mkdir()
        # a returning user: no first-run template dialog over the canvas
        (base / "user" / "default").mkdir()
        (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        self.log_path = base / "server.log"
        self.proc = None

    def start(self, timeout: float = 120.0):
        base = Path(self.tmp.name)
        # Everything the server writes (settings, outputs) stays in a temporary base directory.
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(base), "--user-directory", str(base / "user"),
               "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log())
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not start:\n" + self.log())

    def log(self, whole: bool = False) -> str:
        """The server's console output: its last 6000 characters, or all of it."""
        try:
            text = self.log_path.read_text()
        except OSError:
            return ""
        return text if whole else text[-6000:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        """POST JSON; the JSON answer, or None for an empty one (/interrupt, /queue)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body.strip() else None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
        self.tmp.cleanup()


def widget_defaults(object_info: dict) -> dict:
    """Default values of a node's widget inputs, from /object_info."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in object_info["input"].get(section, {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                out[name] = spec[1]["default"]
    return out


OPTIONS_TYPE = "SpeculativeCacheAdvancedOptions"        # the Options node (SpeculativeCacheOptions: before 0.5)


def api_graph(sc_inputs: dict, steps: int = 12, cfg: float = 2.0, seed: int = 3, sc_type: str = "SpeculativeCache",
              options: dict | None = None, options_type: str = OPTIONS_TYPE) -> dict:
    """API-format prompt: tiny FLUX -> Speculative Cache (node "10", of type ``sc_type``;
    with ``options``, fed by an Options node "11" of type ``options_type``) -> KSampler -> sink."""
    graph = {
        "1": {"class_type": "SCTestTinyFlux", "inputs": {"seed": 0}},
        "10": {"class_type": sc_type, "inputs": {"model": ["1", 0], **sc_inputs}},
        "2": {"class_type": "SCTestConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
            "denoise": 1.0}},
        "5": {"class_type": "SCTestLatentSink", "inputs": {"samples": ["4", 0]}},
    }
    if options is not None:
        graph["11"] = {"class_type": options_type, "inputs": dict(options)}
        graph["10"]["inputs"]["options"] = ["11", 0]
    return graph


OTHER_NODES = ("edit_region", "token_pruning")     # the settings of other_node_graph


def other_node_graph(setting: str, steps: int, cfg: float, seed: int, width: int, height: int, batch: int,
                      main: dict) -> dict:
    """API-format prompt for ``setting`` "edit_region[_cached]" or "token_pruning[_cached]": the
    Edit Region (node "20") on a tiny FLUX Fill with an inpainting mask, or Token Pruning on a tiny
    SD1.5, with the main node ("10", of inputs ``main``) after it for the "_cached" settings; then
    KSampler ("4") -> sink ("5")."""
    edit = setting.startswith(OTHER_NODES[0])
    family = "flux_fill" if edit else "sd15"
    node = ({"class_type": "SpeculativeCacheEditRegion", "inputs": {
                "model": ["1", 0], "margin": 1, "refresh_interval": 3, "final_refresh_steps": 1, "context": "linear"}}
            if edit else
            {"class_type": "SpeculativeCacheTokenPruning", "inputs": {
                "model": ["1", 0], "ratio": 0.5, "refresh_interval": 3, "layers": "self-attention"}})
    g = {
        "1": {"class_type": "SCTestTinyModel", "inputs": {"family": family, "seed": 0}},
        "20": node,
        "2": {"class_type": "SCTestTextConditioning", "inputs": {"family": family, "seed": 1, "negative": False}},
        "6": {"class_type": "SCTestTextConditioning", "inputs": {"family": family, "seed": 1, "negative": True}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["20", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["6", 0], "latent_image": ["3", 0],
            "denoise": 1.0}},
        "5": {"class_type": "SCTestLatentSink", "inputs": {"samples": ["4", 0]}},
    }
    if edit:     # FLUX Fill's inpainting conditioning and the latent with its noise mask
        g["7"] = {"class_type": "SCTestInpaintConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["6", 0], "width": width, "height": height}}
        g["4"]["inputs"].update(positive=["7", 0], negative=["7", 1], latent_image=["7", 2])
    else:        # the U-Net's latent: 8 x 8 pixels per latent pixel, at twice the FLUX sizes
        g["3"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 2 * width, "height": 2 * height,
                                                               "batch_size": batch}}
    if setting.endswith("_cached"):
        g["10"] = {"class_type": "SpeculativeCacheSimple", "inputs": {"model": ["20", 0], **main}}
        g["4"]["inputs"]["model"] = ["10", 0]
    return g


def ui_graph(sc_widgets: list, steps: int = 12, sc_type: str = "SpeculativeCacheSimple",
             options_widgets: list | None = None, options_type: str = OPTIONS_TYPE) -> dict:
    """The same graph in the frontend's (UI) format, for the browser test; with
    ``options_widgets``, a Speculative Cache Options node (11) feeds the main node."""
    def node(nid, typ, pos, widgets, inputs, outputs, size=(300, 120)):
        return {"id": nid, "type": typ, "pos": list(pos), "size": list(size), "flags": {}, "order": nid,
                "mode": 0, "inputs": [{"name": n, "type": t, "link": l} for n, t, l in inputs],
                "outputs": [{"name": n, "type": t, "links": ls} for n, t, ls in outputs],
                "properties": {}, "widgets_values": widgets}
    nodes = [
        node(1, "SCTestTinyFlux", (20, 40), [0], [], [("MODEL", "MODEL", [1])]),
        node(10, sc_type, (360, 40), sc_widgets,
             [("model", "MODEL", 1)] + ([("options", "SPECULATIVE_CACHE_OPTIONS", 7 if options_widgets else None)]
                                        if sc_type == "SpeculativeCacheSimple" else []),
             [("MODEL", "MODEL", [2])], size=(340, 260 if sc_type == "SpeculativeCacheSimple" else 420)),
        node(2, "SCTestConditioning", (20, 260), [1], [],
             [("positive", "CONDITIONING", [3]), ("negative", "CONDITIONING", [4])]),
        node(3, "EmptySD3LatentImage", (20, 420), [128, 128, 1], [], [("LATENT", "LATENT", [5])]),
        node(4, "KSampler", (740, 40), [3, "fixed", steps, 2.0, "euler", "simple", 1.0],
             [("model", "MODEL", 2), ("positive", "CONDITIONING", 3), ("negative", "CONDITIONING", 4),
              ("latent_image", "LATENT", 5)], [("LATENT", "LATENT", [6])], size=(300, 260)),
        node(5, "SCTestLatentSink", (1080, 40), [], [("samples", "LATENT", 6)], []),
    ]
    links = [[1, 1, 0, 10, 0, "MODEL"], [2, 10, 0, 4, 0, "MODEL"], [3, 2, 0, 4, 1, "CONDITIONING"],
             [4, 2, 1, 4, 2, "CONDITIONING"], [5, 3, 0, 4, 3, "LATENT"], [6, 4, 0, 5, 0, "LATENT"]]
    if options_widgets:
        nodes.append(node(11, options_type, (20, 560), options_widgets, [],
                          [("options", "SPECULATIVE_CACHE_OPTIONS", [7])], size=(320, 560)))
        links.append([7, 11, 0, 10, 1, "SPECULATIVE_CACHE_OPTIONS"])
    return {"last_node_id": 11, "last_link_id": 7, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


# The model files the shipped workflows name -> the tiny model of their family (devkit.tiny_models).
TINY_FAMILY_BY_FILE = [("flux1-fill", "flux_fill"), ("flux1-", "flux"), ("hunyuan_video", "hunyuan_video"),
                       ("wan2.2_t2v", "wan21"), ("qwen_image", "qwen_image"), ("v1-5", "sd15")]
_LOADERS = {"UNETLoader": "unet_name", "CheckpointLoaderSimple": "ckpt_name"}
_LATENTS = {"EmptySD3LatentImage", "EmptyLatentImage", "EmptyHunyuanLatentVideo"}
_DECODERS = {"VAEDecode", "VAEDecodeTiled"}
_DROPPED = {"DualCLIPLoader", "CLIPLoader", "VAELoader", "LoadImage", "SaveImage", "SaveAnimatedWEBP",
            "ImageStitch", "PreviewImage"}


def with_tiny_models(prompt: dict) -> dict:
    """An API-format prompt (what the frontend queues) with its model files swapped for tiny
    models of their families: each model loader becomes ``SCTestTinyModel``, each text encoding
    ``SCTestTextConditioning``, InpaintModelConditioning ``SCTestInpaintConditioning``, each VAE
    decode a latent sink; the latents shrink to the tiny models' size and the loaders, images and
    savers that no longer have a use go. Everything else (the pack's nodes with the workflow's
    settings, samplers, guidance, model sampling) stays as the workflow has it."""
    from devkit import tiny_models
    out = json.loads(json.dumps(prompt))
    family = None
    for i, (nid, node) in enumerate(sorted(out.items())):
        if node["class_type"] in _LOADERS:
            name = node["inputs"][_LOADERS[node["class_type"]]]
            fam = next((f for key, f in TINY_FAMILY_BY_FILE if key in name), None)
            if fam is None:
                raise ValueError(f"no tiny model for {name!r}: add it to TINY_FAMILY_BY_FILE")
            family = family or fam
            out[nid] = {"class_type": "SCTestTinyModel", "inputs": {"family": fam, "seed": i}}
    if family is None:
        raise ValueError("the workflow loads no model")
    negatives = {v[0] for node in out.values() for k, v in node["inputs"].items()
                 if k == "negative" and isinstance(v, list)}
    latent = tiny_models.CONFIGS[family]["latent"]
    for nid, node in list(out.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPTextEncode":
            seed = sum(map(ord, str(inputs.get("text", "")))) % 1000 + 1
            out[nid] = {"class_type": "SCTestTextConditioning",
                        "inputs": {"family": family, "seed": seed, "negative": nid in negatives}}
        elif kind == "InpaintModelConditioning":
            out[nid] = {"class_type": "SCTestInpaintConditioning",
                        "inputs": {"positive": inputs["positive"], "negative": inputs["negative"],
                                   "width": latent[-1] * 8, "height": latent[-2] * 8}}
        elif kind in _LATENTS:
            inputs["width"], inputs["height"] = latent[-1] * 8, latent[-2] * 8
            if "length" in inputs:
                inputs["length"] = (latent[2] - 1) * 4 + 1
        elif kind in _DECODERS:
            out[nid] = {"class_type": "SCTestLatentSink", "inputs": {"samples": inputs["samples"]}}
    dropped = {nid for nid, node in out.items() if node["class_type"] in _DROPPED}
    sinks = {nid for nid, node in out.items() if node["class_type"] == "SCTestLatentSink"}
    changed = True
    while changed:       # whatever reads a dropped node or a sink's (absent) output goes too
        changed = False
        for nid, node in out.items():
            if nid not in dropped and any(isinstance(v, list) and v and (v[0] in dropped or v[0] in sinks)
                                          for v in node["inputs"].values()):
                dropped.add(nid)
                changed = True
    return {nid: node for nid, node in out.items() if nid not in dropped}
