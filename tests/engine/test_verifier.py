"""Engine tests (cache_core, no ComfyUI): verifier."""

from __future__ import annotations


import pytest
import torch


def test_relative_l1_is_elementwise(core):
    real = torch.tensor([1.0, 2.0, 4.0, 0.5])
    pred = torch.tensor([1.5, 2.0, 3.0, 0.0])
    expected = (0.5 / 1 + 0 + 1 / 4 + 0.5 / 0.5) / 4
    assert core.relative_l1(pred, real) == pytest.approx(expected, rel=1e-6)


def test_relative_norm(core):
    real = torch.tensor([3.0, 4.0])
    pred = torch.tensor([3.0, 4.5])
    assert core.relative_norm(pred, real) == pytest.approx(0.5 / 5.0, rel=1e-6)


def test_threshold_schedule_decays_to_floor(core):
    v = core.Verifier("relative_l1", 7.0, decay=0.3, floor=0.1)
    assert v.threshold_at(0.0) == pytest.approx(7.0)
    assert v.threshold_at(0.5) == pytest.approx(7.0 * 0.3 ** 0.5)
    assert v.threshold_at(1.0) == pytest.approx(2.1)
    v2 = core.Verifier("relative_norm", 0.2, decay=0.01, floor=0.1)
    assert v2.threshold_at(1.0) == pytest.approx(0.1)  # floored


def test_verifier_accept_reject(core):
    v = core.Verifier("relative_norm", 0.1)
    assert v.accepts(0.05, 0.5)
    assert not v.accepts(0.15, 0.5)
    assert not v.accepts(float("nan"), 0.5)
    assert not v.accepts(float("inf"), 0.5)
    assert not core.Verifier("relative_norm", 0.0).accepts(0.0, 0.5)
