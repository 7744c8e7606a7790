"""Few-step runs (distilled models at 4 to 8 steps): the run says in one line why it saves
little, and only then."""

from __future__ import annotations


def test_a_run_too_short_to_save_much_says_why(core):
    four = core.SpeculativeRun(core.CacheConfig(), 4)
    note = four.few_steps_note()
    assert "4 steps leave at most 0 to forecast" in note and "warm-up" in note and "1.00x" in note
    five = core.SpeculativeRun(core.CacheConfig(), 5)
    assert "at most 1 to forecast" in five.few_steps_note() and "1.25x" in five.few_steps_note()
    lookback = core.CacheConfig(acceptance="lookback")
    assert core.SpeculativeRun(lookback, 8).few_steps_note() == ""      # up to 2x: worth it
    assert core.SpeculativeRun(core.CacheConfig(), 28).few_steps_note() == ""
    # the per-step probe at 8 steps or fewer: it says that probes wait until forecasts paid for them
    probe = core.SpeculativeRun(core.CacheConfig(), 8).few_steps_note()
    assert "never costs more than the uncached run" in probe and "2.00x" in probe
    assert core.SpeculativeRun(core.CacheConfig(threshold=0.0), 4).few_steps_note() == ""


def test_a_planned_target_on_few_steps_counts_its_plan(core):
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    four_x = core.SpeculativeRun(core.CacheConfig(target_speedup=4.0, target_schedule="planned"), 4, sigmas=sigmas)
    planned = len(four_x.policy.plan)
    assert planned < 4 and four_x.few_steps_note() == ""       # 2 of 4 computed: up to 2x
    slow = core.SpeculativeRun(core.CacheConfig(target_speedup=1.2, target_schedule="planned"), 4, sigmas=sigmas)
    assert f"the planned target computes {len(slow.policy.plan)}" in slow.few_steps_note()


def test_a_planned_target_with_few_model_calls_says_so_before_the_run(core):
    """8x on 28 steps runs the model 4 times (24.6-31.7 dB on the reference models at 4 or 5 calls):
    one line before the run; 4x on 28 steps (7 calls) and 8x on 50 steps (6 calls) say nothing."""
    def run(target, steps, shift=3.0):
        sigmas = [shift * s / (1 + (shift - 1) * s) for s in (1.0 - i / steps for i in range(steps + 1))]
        return core.SpeculativeRun(core.CacheConfig(acceptance="lookback", target_speedup=target,
                                                    target_schedule="planned"), steps, sigmas=sigmas)
    eight = run(8.0, 28)
    assert len(eight.policy.plan) == 4
    assert "the 8x target on 28 steps runs the model 4 times in all" in eight.few_calls_note()
    assert "5 calls or fewer" in run(6.0, 28).few_calls_note()
    assert run(4.0, 28).few_calls_note() == "" and run(8.0, 50).few_calls_note() == ""
    assert core.SpeculativeRun(core.CacheConfig(), 28).few_calls_note() == ""      # nothing planned
