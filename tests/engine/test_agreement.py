"""What several chunks or ranks of one evaluation add to the run: the metrics of a tensor split
between ranks, one verdict per call, and errors booked once, whatever order the chunks finished
in (cache_core/agreement.py, cache_core/run.py)."""

from __future__ import annotations

import threading

import pytest
import torch


@pytest.mark.parametrize("metric", ["relative_l1", "relative_norm", "relative_change"])
def test_a_metric_from_its_shards_sums_is_the_whole_tensors(core, metric):
    from importlib import import_module
    verifier = import_module(core.__name__ + ".verifier")
    g = torch.Generator().manual_seed(0)
    real, anchor = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    pred = real + 0.1 * torch.randn(2, 12, 8, generator=g)
    whole = core.Verifier(metric, 1.0).error(pred, real, anchor)
    shards = [verifier.metric_sums(metric, pred[:, i:i + 4], real[:, i:i + 4], anchor[:, i:i + 4]) for i in (0, 4, 8)]
    assert verifier.metric_from_sums(metric, sum(shards)) == pytest.approx(whole, rel=1e-5)
    # a shard alone is not the whole tensor's error (why the ranks add their sums up)
    assert verifier.metric_from_sums(metric, shards[0]) != pytest.approx(whole, rel=1e-3)


def test_one_process_agrees_with_itself(core):
    from importlib import import_module
    agreement = import_module(core.__name__ + ".agreement").RankAgreement.from_environment()
    assert not agreement.active and not agreement.shards
    assert agreement.worst([0.5, 2.0]) == [0.5, 2.0]
    assert agreement.any(True) and not agreement.any(False)
    sums = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert agreement.sum_shards(sums) is sums


def _verifying_run(core, on_reject="redo"):
    run = core.SpeculativeRun(core.CacheConfig(metric="relative_norm", threshold=0.1, on_reject=on_reject), 10)
    run.begin_evaluation(1.0, 0)
    for key in ("cond", "uncond"):
        run.chunk([key], 1, units_full=1).record({"f": torch.ones(1, 4)})
    run.begin_evaluation(0.9, 1)
    run.begin_call()
    return run


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_an_evaluations_verification_is_booked_once_whatever_order_its_chunks_finish(core, order):
    """Cond's forecast passes (5 %), uncond's fails (50 %): the run books one verification, the
    worst error, one rejection; the call is recomputed; chunk order does not matter."""
    run = _verifying_run(core)
    real = torch.ones(1, 4)
    miss = {"cond": 0.05, "uncond": 0.5}
    for key in order:
        chunk = run.chunk([key], 1, units_full=1)
        ok = chunk.verify(real * (1 + miss[key]), real, "f")
        chunk.finish(core.stats.FORECAST if ok else core.stats.REJECTED)
    assert run.needs_recompute()
    run.end_evaluation()
    s = run.stats
    assert s.verified == 1 and s.rejected == 1 and len(s.errors) == 1
    assert s.errors[0][2] == pytest.approx(0.5, rel=1e-5) and not s.errors[0][4]
    assert s.step_outcomes[1] == core.stats.REJECTED


def test_chunks_that_all_keep_their_forecast_are_not_recomputed(core):
    run = _verifying_run(core)
    for key in ("cond", "uncond"):
        chunk = run.chunk([key], 1, units_full=1)
        assert chunk.verify(torch.ones(1, 4) * 1.01, torch.ones(1, 4), "f")
        chunk.finish(core.stats.FORECAST)
    assert not run.needs_recompute()


def test_a_forecast_beside_a_computed_chunk_is_recomputed_and_booked_as_before(core):
    """A chunk that could not use its forecast computed; its twin kept the forecast: the call is
    made again (all computed), and the evaluation keeps the outcome and full units it had."""
    run = _verifying_run(core, on_reject="next")
    run.chunk(["cond"], 1, units_full=4).finish(core.stats.FORECAST)
    computed = run.chunk(["uncond"], 1, units_full=4)
    computed.add_units(4)
    computed.finish(core.stats.COMPUTED)
    assert run.needs_recompute()
    full = run.stats.block_units_full
    run.recompute_evaluation()
    assert not run.decision.forecast
    for key in ("cond", "uncond"):
        c = run.chunk([key], 1, units_full=4)
        c.add_units(4)
        c.finish(core.stats.COMPUTED)
    run.end_recompute()
    assert run.stats.block_units_full == full and run.current_outcome() == core.stats.COMPUTED
    assert run.decision.reason != "recompute"          # the evaluation's own decision again


def test_units_added_from_two_threads_all_count(core):
    run = core.SpeculativeRun(core.CacheConfig(), 10)
    run.begin_evaluation(1.0, 0)
    chunks = [run.chunk([k], 1, units_full=1) for k in ("a", "b")]

    def spend(chunk):
        for _ in range(20000):
            chunk.add_units(1.0)
    threads = [threading.Thread(target=spend, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert run.stats.block_units == 40000.0


def test_xdits_sequence_group_is_found_when_xfuser_splits_the_sequence(core, monkeypatch):
    """raylight and xDiT keep their sequence-parallel group in xfuser's parallel state
    (``xfuser.core.distributed``: ``get_sequence_parallel_world_size``, ``get_sp_group().device_group``,
    as in xfuser 0.7.0). A stand-in for that module: its group is the one used; with one
    sequence rank, or with its state not initialised, none."""
    import sys
    import types
    from importlib import import_module
    agreement = import_module(core.__name__ + ".agreement")
    group = object()
    module = types.ModuleType("xfuser.core.distributed")
    module.get_sequence_parallel_world_size = lambda: 2
    module.get_sp_group = lambda: types.SimpleNamespace(device_group=group)
    monkeypatch.setitem(sys.modules, "xfuser.core.distributed", module)
    assert agreement._xfuser_sequence_group() is group
    module.get_sequence_parallel_world_size = lambda: 1
    assert agreement._xfuser_sequence_group() is None

    def not_initialised():
        raise AssertionError("sequence parallel group is not initialized")
    module.get_sequence_parallel_world_size = not_initialised
    assert agreement._xfuser_sequence_group() is None


def test_ranks_agree_only_where_a_sequence_group_is_known_or_asked_for(core, monkeypatch):
    """A collective only some processes reach would hang the others: with torch.distributed up
    for something else and no sequence group, nothing is reduced unless asked for."""
    from importlib import import_module
    agreement = import_module(core.__name__ + ".agreement")
    fake = type("Dist", (), {"get_world_size": staticmethod(lambda: 2)})()
    monkeypatch.setattr(agreement, "_distributed", lambda: fake)
    monkeypatch.setattr(agreement, "_registered_group", None)
    monkeypatch.delenv("SPECULATIVE_CACHE_RANKS", raising=False)
    assert not agreement.RankAgreement.from_environment().active
    monkeypatch.setenv("SPECULATIVE_CACHE_RANKS", "agree")
    forced = agreement.RankAgreement.from_environment()
    assert forced.active and not forced.shards
    group = object()
    agreement.use_sequence_group(group)
    try:
        monkeypatch.delenv("SPECULATIVE_CACHE_RANKS")
        known = agreement.RankAgreement.from_environment()
        assert known.active and known.shards and known.sequence_group is group
        monkeypatch.setenv("SPECULATIVE_CACHE_RANKS", "independent")
        assert not agreement.RankAgreement.from_environment().active
    finally:
        agreement.use_sequence_group(None)
