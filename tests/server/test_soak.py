"""The CI variant of the soak test (benchmarks/soak.py): 30 prompts through a real ComfyUI
server with changing seeds, resolutions, batch sizes, settings, interrupts and a cancelled
queue; then no open run, no cached tensor, tensor count and memory flat."""

from __future__ import annotations

import pytest

from devkit.comfy_server import ComfyServer
from conftest import COMFYUI

pytestmark = pytest.mark.comfy


def test_thirty_prompts_leave_nothing_behind(spec_nodes):
    from benchmarks.soak import Soak
    server = ComfyServer(COMFYUI).start()
    try:
        result = Soak(server, seed=1, log=lambda *a, **k: None).run(30)
    finally:
        server.stop()
    assert result["problems"] == [], "\n".join(result["problems"]) + "\n" + server.log()
    assert result["completed"] >= 15 and result["interrupted"] + result["cancelled"] >= 3
    end = result["memory_at_end"]
    assert end["open_runs"] == 0 and end["cache_bytes"] == 0
