"""Soak test: many prompts through a real ComfyUI server with this pack, the way a server
that runs for hours sees them.

    .venv/bin/python -m benchmarks.soak --prompts 200          (about 5 minutes on 2 cores)

Each prompt draws a seed, a resolution, a batch size, a step count and a node setting: the
main node in each mode (auto, probe, speed target, off), with or without an Options node, the
legacy node with other methods, the Edit Region on an inpainting FLUX Fill (alone and under the
main node) and Token Pruning on an SD1.5 U-Net (alone and under the main node). Some are
interrupted at a random step (``/interrupt``), some are queued behind another and cancelled
(``/queue`` delete). After every finished prompt its final stats must be consistent (the step
cache's ``speculative_cache.stats`` event: every step accounted for, one report per run; the
other nodes' final stats: not switched off by an error). After all of them the server must hold
none of the pack's run objects and no cached byte of any node, and its tensor count must be
where it was after warm-up within one tensor per ten prompts: both counts are taken right after
the same closing prompt, so ComfyUI's output cache holds the same thing. The CI variant
(tests/server/test_soak.py) runs 30 prompts."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid

from devkit.comfy_server import OTHER_NODES, ComfyServer, api_graph, other_node_graph, widget_defaults

RESOLUTIONS = [(64, 64), (128, 128), (96, 128), (128, 64)]
SETTINGS = ["auto", "auto_fast", "probe", "speed_target", "off", "options_block", "options_clusca",
            "legacy_taylorseer", "legacy_reuse", "edit_region", "edit_region_cached", "token_pruning",
            "token_pruning_cached"]
TINY_FLUX_BLOCKS = 4          # the test pack's model: 2 double + 2 single blocks
RSS_MARGIN = 200 * 2**20      # resident memory may move this much after warm-up (allocator, caches)
TENSORS_PER_PROMPT = 0.1      # live tensors may differ this much per prompt after warm-up


class Soak:
    def __init__(self, server: ComfyServer, seed: int = 0, log=print):
        import websocket
        self.server = server
        self.rng = random.Random(seed)
        self.log = log
        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=120)
        self.options_defaults = widget_defaults(
            server.get("/object_info/SpeculativeCacheAdvancedOptions")["SpeculativeCacheAdvancedOptions"])
        self.legacy_defaults = widget_defaults(server.get("/object_info/SpeculativeCache")["SpeculativeCache"])
        self.problems: list[str] = []
        self.counts = {"completed": 0, "interrupted": 0, "cancelled": 0, "settings": {}}
        self.warmup = len(SETTINGS)
        self.server.get("/sc_test/finals")          # the other nodes' final stats are collected from now

    # ---- one prompt -------------------------------------------------------------
    def graph(self, setting: str | None = None):
        r = self.rng
        steps = r.choice([4, 6, 8, 10])
        setting = setting or r.choice(SETTINGS)
        options = None
        sc_type = "SpeculativeCacheSimple"
        main = {"mode": "auto", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0}
        if setting == "auto_fast":
            main["speed"] = round(r.uniform(0.6, 1.0), 2)
        elif setting == "probe":
            main["mode"] = "probe"
        elif setting == "speed_target":
            main.update(mode="speed_target", speed=round(r.uniform(0.1, 0.5), 2))
        elif setting == "off":
            main["speed"] = 0.0
        elif setting == "options_block":
            options = dict(self.options_defaults, granularity="block", threshold=5.0, warmup_steps=1)
        elif setting == "options_clusca":
            options = dict(self.options_defaults, method="clusca", clusters=4, warmup_steps=1)
        elif setting.startswith("legacy_"):
            sc_type = "SpeculativeCache"
            main = dict(self.legacy_defaults, method=setting[len("legacy_"):], max_forecast_steps=2)
        cfg, seed = r.choice([1.0, 2.0]), r.randrange(10_000)
        w, h = r.choice(RESOLUTIONS)
        batch = r.choice([1, 1, 2])
        if setting.startswith(OTHER_NODES):
            return other_node_graph(setting, steps, cfg, seed, w, h, batch, main), steps, setting
        g = api_graph(main, steps=steps, cfg=cfg, seed=seed, sc_type=sc_type, options=options)
        g["3"]["inputs"].update(width=w, height=h, batch_size=batch)
        return g, steps, setting

    def post(self, graph) -> str:
        return self.server.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id, interrupt_at=None, timeout=120):
        """Events until ``prompt_id`` ends; with ``interrupt_at``, POST /interrupt after that
        many stats events. Returns (final stats events, how it ended)."""
        finals, seen, deadline = [], 0, time.time() + timeout
        while time.time() < deadline:
            msg = self.ws.recv()
            if isinstance(msg, bytes):
                continue
            msg = json.loads(msg)
            kind, data = msg["type"], msg.get("data", {})
            if kind == "speculative_cache.stats":
                seen += 1
                if data.get("final"):
                    finals.append(data)
                if interrupt_at is not None and seen == interrupt_at:
                    self.server.post("/interrupt", {})
            elif data.get("prompt_id") == prompt_id:
                if kind == "execution_error":
                    return finals, "error: " + str(data.get("exception_message"))[:300]
                if kind == "execution_interrupted":
                    # the run's final report comes from the sampler's cleanup, before this message
                    return finals, "interrupted"
                if kind == "executing" and data.get("node") is None:
                    return finals, "completed"
                if kind == "execution_success":
                    continue
        return finals, "timeout"

    def check_other_nodes(self, i, setting, ended, before):
        """The Edit Region's or Token Pruning's final stats of this prompt: one, not switched off
        by an error of the pack."""
        key = "edit" if setting.startswith("edit_region") else "pruning"
        finals = self.server.get("/sc_test/finals")[key][before[key]:]
        where = f"prompt {i} ({setting}, {ended})"
        if len(finals) != 1:
            self.problems.append(f"{where}: {len(finals)} final {key} reports, expected 1")
        elif "error" in finals[0]["disabled"]:
            self.problems.append(f"{where}: {key} off: {finals[0]['disabled']}")

    def check_stats(self, i, setting, steps, finals, ended):
        where = f"prompt {i} ({setting}, {steps} steps, {ended})"
        if setting.startswith(OTHER_NODES) and not setting.endswith("_cached"):
            return                                  # no step cache in this graph
        if len(finals) != 1:
            self.problems.append(f"{where}: {len(finals)} final stats reports, expected 1")
            return
        s = finals[0]
        t = s["timeline"]
        done = len(t.rstrip("."))
        if s["steps"] != steps or len(t) != steps or "." in t[:done]:
            self.problems.append(f"{where}: timeline {t!r} for {steps} steps")
        if ended == "completed" and (done != steps or s["computed"] + s["forecast"] != steps):
            self.problems.append(f"{where}: completed with timeline {t!r}, {s['computed']} + {s['forecast']}")
        # (an interrupt may land after the sampler's last step, between nodes: then every step
        # is reported and the prompt still ends interrupted)
        if setting == "off" and s["forecast"]:
            self.problems.append(f"{where}: {s['forecast']} forecasts at speed 0")
        if s["internal_error"]:
            self.problems.append(f"{where}: internal error {s['internal_error']}")
        # the back-off bound: 2 % of the run, or the first probe of the run (one of the tiny
        # model's 4 blocks in one of the steps it ran) when that is more
        bound = 1 + max(0.02, 1 / (TINY_FLUX_BLOCKS * max(done, 1))) + 1e-4   # the stats round to 4 places
        if not (0 < s["compute_fraction"] <= bound or s["evaluations"] == 0):
            self.problems.append(f"{where}: compute fraction {s['compute_fraction']}")

    def one(self, i, setting=None):
        r = self.rng
        graph, steps, setting = self.graph(setting)
        before = {k: len(v) for k, v in self.server.get("/sc_test/finals").items()}
        action = r.random() if i >= self.warmup else 1.0       # the warm-up runs each setting to the end
        if action < 0.15:
            prompt_id = self.post(graph)
            finals, ended = self.wait(prompt_id, interrupt_at=r.randint(1, steps - 1))
            if ended == "completed":
                ended = "completed"         # the interrupt came after the last step: fine
            else:
                self.counts["interrupted"] += 1
        elif action < 0.25:
            prompt_id = self.post(graph)
            other, _, _ = self.graph()
            cancelled = self.post(other)
            self.server.post("/queue", {"delete": [cancelled]})
            finals, ended = self.wait(prompt_id)
            history = self.server.get(f"/history/{cancelled}")
            if history:
                self.problems.append(f"prompt {i}: the cancelled prompt ran")
            self.counts["cancelled"] += 1
        else:
            prompt_id = self.post(graph)
            finals, ended = self.wait(prompt_id)
        if ended.startswith("error") or ended == "timeout":
            self.problems.append(f"prompt {i} ({setting}): {ended}")
            return
        if ended == "completed":
            self.counts["completed"] += 1
        self.counts["settings"][setting] = self.counts["settings"].get(setting, 0) + 1
        self.check_stats(i, setting, steps, finals, ended)
        if setting.startswith(OTHER_NODES) and ended == "completed":
            self.check_other_nodes(i, setting, ended, before)

    def closing_prompt(self) -> dict:
        """The same prompt before the baseline and at the end (ComfyUI's output cache then holds
        the same outputs); what the server holds right after it."""
        graph = api_graph({"mode": "auto", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0}, steps=4,
                          sc_type="SpeculativeCacheSimple")
        finals, ended = self.wait(self.post(graph))
        if ended != "completed":
            self.problems.append(f"the closing prompt: {ended}")
        return self.server.get("/sc_test/memory")

    # ---- the whole soak ---------------------------------------------------------
    def run(self, prompts: int) -> dict:
        """``prompts`` prompts: first each setting once to the end (the warm-up: every tiny model
        built, every path taken), then random ones."""
        started = time.time()
        for i in range(prompts):
            if i == self.warmup:
                baseline = self.closing_prompt()
            self.one(i, SETTINGS[i] if i < self.warmup else None)
            if (i + 1) % 20 == 0 or i + 1 == prompts:
                took = time.time() - started
                self.log(f"  {i + 1}/{prompts} prompts, {took:.0f} s (about {took / (i + 1) * (prompts - i - 1):.0f} s "
                         f"left), {len(self.problems)} problems", flush=True)
        end = self.closing_prompt()
        if prompts <= self.warmup:
            baseline = end
        if end["runs_alive"] or end["open_runs"] or end["cache_bytes"]:
            self.problems.append(f"after the soak: {end['runs_alive']} run objects alive ({end['open_runs']} open), "
                                 f"{end['cache_bytes']} cached bytes")
        margin = int(TENSORS_PER_PROMPT * max(0, prompts - self.warmup))
        if abs(end["tensors"] - baseline["tensors"]) > margin:
            self.problems.append(f"live tensors went from {baseline['tensors']} to {end['tensors']} "
                                 f"(margin {margin} for {prompts - self.warmup} prompts)")
        if end["rss"] > baseline["rss"] + RSS_MARGIN:
            self.problems.append(f"resident memory grew from {baseline['rss'] >> 20} MiB to {end['rss'] >> 20} MiB")
        self.ws.close()
        return {"prompts": prompts, **self.counts, "seconds": round(time.time() - started, 1),
                "memory_after_warmup": baseline, "memory_at_end": end, "problems": self.problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from devkit import comfy_env
    comfyui = comfy_env.find_comfyui()
    if comfyui is None:
        print("ComfyUI not found. Looked in: " + comfy_env.where_looked())
        return 1
    server = ComfyServer(comfyui).start()
    try:
        print(f"soak: {args.prompts} prompts through ComfyUI {comfy_env.comfyui_version(comfyui)} at {server.url}")
        result = Soak(server, seed=args.seed).run(args.prompts)
    finally:
        server.stop()
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
    for p in result["problems"]:
        print("PROBLEM:", p)
    print("OK" if not result["problems"] else f"{len(result['problems'])} problems")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
