"""Sequence parallelism: two real processes (torch.distributed, gloo on the loopback) each run
ComfyUI's real sampler on a tiny FLUX whose tokens are split between them the way USP splits
them (devkit/sequence_parallel.py: each token on one rank, attention gathers the keys and
values). In every mode both ranks take the same decision at every step, and the picture is the
one-process picture within float tolerance; a threshold that lies between the two ranks' own
shard errors shows why the ranks must agree (deciding from their shards, one rank would
forecast the step its peer computes, and both would wait for each other in the next
collective). A run that hangs fails on the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devkit import comfy_env
from devkit.comfy_server import free_port
from conftest import COMFYUI

pytestmark = pytest.mark.comfy

WORKER = Path(comfy_env.PACK_ROOT) / "devkit" / "sequence_parallel.py"
TIMEOUT_S = 240


def _run(tmp_path: Path, world: int) -> list[dict]:
    port = free_port()
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI), OMP_NUM_THREADS="1")
    env.pop("SPECULATIVE_CACHE_RANKS", None)
    procs, outs = [], []
    for rank in range(world):
        out = tmp_path / f"world{world}_rank{rank}.pt"
        log = open(tmp_path / f"world{world}_rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port), str(out)],
                                       env=env, cwd=comfy_env.PACK_ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        outs.append(out)
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world}-rank run did not finish in {TIMEOUT_S} s (ranks waiting for each other?)")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"world{world}_rank{rank}.log").read_text()[-4000:]
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sequence_parallel")
    (single,) = _run(tmp, 1)
    return single, _run(tmp, 2)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_tokens_are_really_split(runs):
    single, (rank0, rank1) = runs
    for rank in (rank0, rank1):
        (queries, keys), = rank["probe"]["attention_keys"]
        assert queries * 2 == keys                          # each rank holds half the sequence
    assert single["probe"]["attention_keys"] == []          # (one process: no override)
    assert torch.equal(rank0["plain"]["latent"], rank1["plain"]["latent"])
    assert rel(rank0["plain"]["latent"], single["plain"]["latent"]) < 1e-5


@pytest.mark.parametrize("case", ["speed 0", "auto", "probe", "probe, rejecting", "probe, between the shards",
                                  "block granularity", "planned 4x", "adaptive target"])
def test_both_ranks_take_the_decisions_of_one_process(runs, case):
    single, (rank0, rank1) = runs
    one, a, b = single[case], rank0[case], rank1[case]
    assert a["timeline"] == b["timeline"] == one["timeline"], (a["timeline"], b["timeline"], one["timeline"])
    assert a["mode"] == b["mode"] == one["mode"] and not a["internal_error"] and not b["internal_error"]
    assert a["compute_fraction"] == b["compute_fraction"] == pytest.approx(one["compute_fraction"], abs=1e-9)
    assert torch.equal(a["latent"], b["latent"])             # the gathered picture, the same on both
    assert rel(a["latent"], one["latent"]) < 1e-5
    # the errors the decisions came from are the whole image's (one process's) on both ranks
    assert a["errors"] == b["errors"] and a["errors"] == pytest.approx(one["errors"], rel=1e-5)
    if case == "speed 0":
        assert torch.equal(a["latent"], rank0["plain"]["latent"])
    if case == "probe, rejecting":
        assert "R" in a["timeline"]
    if case == "block granularity":
        assert a["mode"] == "block" and "F" in a["timeline"]


def test_ranks_deciding_from_their_shards_would_part(runs):
    """At the first verified step of "probe, between the shards" (threshold 0.364), one rank's
    own error is above the threshold and the other's below; the whole image's is below, and
    both ranks accept, as one process does."""
    single, (rank0, rank1) = runs
    tau = 0.364
    parted = [(own0, own1, whole) for (own0, whole), (own1, _) in
              zip(rank0["probe, between the shards"]["shard_errors"], rank1["probe, between the shards"]["shard_errors"])
              if min(own0, own1) < tau < max(own0, own1)]
    assert parted, "no verification where the ranks' own errors straddle the threshold (the tiny model changed?)"
    own0, own1, whole = parted[0]
    assert whole < tau
    assert "F" in rank0["probe, between the shards"]["timeline"]
    assert single["probe, between the shards"]["shard_errors"] == []     # one process reduces nothing


def test_the_edit_region_steps_aside_on_split_tokens(runs):
    """The Edit Region lays its region out on the whole image's tokens: on a rank that holds
    half of them it turns itself off, on both ranks alike and saying why, and the run is the
    plain inpainting run; on one process it works."""
    single, (rank0, rank1) = runs
    assert not single["edit region"]["disabled"] and single["edit region"]["partial_calls"] > 0
    for rank in (rank0, rank1):
        assert "token layout" in rank["edit region"]["disabled"], rank["edit region"]["disabled"]
        assert torch.equal(rank["edit region"]["latent"], rank["inpaint, plain"]["latent"])
    assert torch.equal(rank0["edit region"]["latent"], rank1["edit region"]["latent"])
