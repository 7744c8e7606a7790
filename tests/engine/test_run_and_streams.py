"""Engine tests (cache_core, no ComfyUI): run and streams."""

from __future__ import annotations

import math

import torch

from engine_helpers import simulate


def test_stream_resets_on_shape_dtype_change(core):
    s = core.StreamCache(lambda: core.TaylorForecaster(2))
    assert s.update(1.0, {"a": torch.ones(2, 3)}) is False
    assert s.update(0.8, {"a": torch.ones(2, 3)}) is False
    assert s.forecasters["a"].points == 2
    assert s.update(0.6, {"a": torch.ones(4, 3)}) is True  # new resolution: history dropped, said so
    assert s.resets == 1 and s.forecasters["a"].points == 1
    s.update(0.5, {"a": torch.ones(4, 3, dtype=torch.float64)})
    assert s.resets == 2
    assert not s.can_predict(["a"], {"a": core.tensor_signature(torch.ones(5, 3))})


def test_a_token_count_change_is_counted_in_the_runs_stats(core):
    """ComfyUI's FluxKVCache drops the reference tokens after the first step: the chunk that
    records the shorter features drops each stream's history once and the stats count it."""
    run = core.SpeculativeRun(core.CacheConfig(order=1), 10)
    for step, tokens in enumerate((12, 8, 8)):
        run.begin_evaluation(1.0 - 0.1 * step, step)
        c = run.chunk(["uncond", "cond"], 2, 1)
        c.record({"img": torch.ones(2, tokens, 4) * step})
        c.finish("C")
    assert run.stats.shape_changes == 2 and run.stats.to_dict()["shape_changes"] == 2
    assert all(s.forecasters["img"].points == 2 for s in run.streams.values())


def test_chunk_keeps_streams_apart_when_batch_order_changes(core):
    cfg = core.CacheConfig(order=0)
    run = core.SpeculativeRun(cfg, 10)
    run.begin_evaluation(1.0, 0)
    c = run.chunk(["uncond", "cond"], 4, 1)
    c.record({"x": torch.tensor([[0.0], [0.0], [1.0], [1.0]])})
    c.finish("C")
    run.begin_evaluation(0.9, 1)
    c2 = run.chunk(["cond", "uncond"], 4, 1)      # the other order
    assert torch.equal(c2.predict("x"), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    c3 = run.chunk(["cond"], 2, 1)                # cond alone (e.g. cfg 1 or split batches)
    assert torch.equal(c3.predict("x"), torch.tensor([[1.0], [1.0]]))
    assert run.stats.streams == 2


def test_a_weights_change_drops_only_that_streams_history(core):
    """LoRA hook keyframes change the weights of one stream mid-run: its history is
    dropped (no forecast from other weights), the other stream keeps forecasting."""
    run = core.SpeculativeRun(core.CacheConfig(order=0), 10)
    run.begin_evaluation(1.0, 0)
    run.chunk(["cond"], 1, 1, ("lora", 1.0)).record({"x": torch.ones(1, 2)})
    run.chunk(["uncond"], 1, 1).record({"x": torch.zeros(1, 2)})
    run.begin_evaluation(0.9, 1)
    same = run.chunk(["cond"], 1, 1, ("lora", 1.0))
    assert same.can_forecast(["x"]) and run.stats.weight_changes == 0
    changed = run.chunk(["cond"], 1, 1, ("lora", 0.0))
    assert not changed.can_forecast(["x"]) and run.stats.weight_changes == 1
    assert run.chunk(["uncond"], 1, 1).can_forecast(["x"])
    changed.record({"x": torch.full((1, 2), 2.0)})
    assert torch.equal(run.chunk(["cond"], 1, 1, ("lora", 0.0)).predict("x"), torch.full((1, 2), 2.0))
    assert run.stats.weight_changes == 1 and run.stats.to_dict()["weight_changes"] == 1


def test_close_frees_every_tensor(core):
    _, stats, run = simulate(core, core.CacheConfig(threshold=1.0), 10)
    assert run.streams == {} and run.cache_bytes() == 0
    assert stats.peak_cache_bytes > 0 and run.closed


def test_stack_plan_stages(core):
    blocks = [(("double_block", i), ("img", "txt")) for i in range(3)] + \
             [(("single_block", i), ("img",)) for i in range(4)]
    plan = core.StackPlan(blocks)
    names = [s.name for s in plan.stages]
    assert names == ["double_block0", "single_block1", "verify"]
    assert plan.stages[0].keys == tuple(("double_block", i) for i in range(3))
    assert plan.stages[1].keys == tuple(("single_block", i) for i in range(3))
    assert plan.verify_stage.keys == (("single_block", 3),)
    stage, first, last = plan.locate(("double_block", 2))
    assert stage.name == "double_block0" and not first and last
    assert plan.features == ("double_block0.img", "double_block0.txt", "single_block1.img", "verify.img")
    single = core.StackPlan([(("double_block", 0), ("img",))])
    assert [s.name for s in single.stages] == ["verify"]


def test_summary_line_has_the_numbers(core):
    _, stats, _ = simulate(core, core.CacheConfig(threshold=1.0), 20)
    line = stats.summary_line()
    for piece in ("20 steps", "computed", "forecast", "rejected", "compute fraction", "speedup", "MiB"):
        assert piece in line
    assert math.isclose(stats.to_dict()["speedup"], 1 / stats.compute_fraction, rel_tol=1e-3)


def test_a_per_thread_attribute_keeps_one_value_per_thread(core):
    """MultiGPU CFG Split runs a step's model calls in one thread per device on one run: the call
    in flight is each thread's own."""
    import threading
    from importlib import import_module
    PerThread = import_module(core.__name__ + ".per_thread").PerThread

    class Run:
        active = PerThread()

    run = Run()
    run.active = "main"
    seen = {}
    started = threading.Barrier(2)

    def worker(name):
        assert run.active is None                 # a new thread starts with the default
        run.active = name
        started.wait()                            # both threads have set theirs
        seen[name] = run.active

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("cond", "uncond")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"cond": "cond", "uncond": "uncond"} and run.active == "main"
