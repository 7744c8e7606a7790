"""The CI variant of the soak test (benchmarks/soak.py): 30 prompts through a real ComfyUI
server (each setting of the three nodes once, then random ones) with changing seeds,
resolutions, batch sizes, settings, interrupts and a cancelled queue; then none of the pack's
run objects alive, no cached byte of any node, the tensor count within one tensor per ten
prompts of the one after warm-up, memory flat."""

from __future__ import annotations

import pytest

from devkit.comfy_server import ComfyServer
from conftest import COMFYUI

pytestmark = pytest.mark.comfy


def test_thirty_prompts_of_the_three_nodes_leave_nothing_behind(spec_nodes):
    from benchmarks.soak import SETTINGS, Soak
    server = ComfyServer(COMFYUI).start()
    try:
        result = Soak(server, seed=1, log=lambda *a, **k: None).run(30)
    finally:
        server.stop()
    assert result["problems"] == [], "\n".join(result["problems"]) + "\n" + server.log()
    assert set(result["settings"]) == set(SETTINGS)             # every setting ran at least once
    assert result["completed"] >= 15 and result["interrupted"] + result["cancelled"] >= 3
    end = result["memory_at_end"]
    assert end["runs_alive"] == 0 and end["open_runs"] == 0 and end["cache_bytes"] == 0
