"""Engine tests (cache_core, no ComfyUI): token methods."""

from __future__ import annotations


import pytest
import torch

from engine_helpers import clustering_module, engine_module


def test_kmeans_recovers_planted_clusters(core):
    cl = clustering_module(core)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 10
    truth = torch.arange(5).repeat_interleave(40)
    x = centers[truth] + torch.randn(200, 16, generator=g) * 0.3
    perm = torch.randperm(200, generator=g)
    x, truth = x[perm][None], truth[perm]
    labels, cent = cl.kmeans(x, 5, generator=torch.Generator().manual_seed(1), iters=20)
    labels = labels[0]
    # every planted cluster maps to exactly one found cluster, and vice versa
    pairs = {(int(t), int(l)) for t, l in zip(truth, labels)}
    assert len(pairs) == 5 and len({l for _, l in pairs}) == 5
    # warm start from the found centroids converges at once to the same partition
    again, _ = cl.kmeans(x, 5, init=cent, iters=1)
    assert torch.equal(again[0], labels)


def test_gamma_zero_leaves_non_representatives_untouched(core):
    cl = clustering_module(core)
    anchor = torch.randn(2, 30, 8)
    labels = torch.randint(0, 4, (2, 30), generator=torch.Generator().manual_seed(2))
    idx = cl.pick_representatives(labels, 4, torch.Generator().manual_seed(3))
    for r in range(2):
        for c in range(4):
            if (labels[r] == c).any():
                assert labels[r, idx[r, c]] == c          # a member of its cluster
    fresh = torch.randn(2, 4, 8)
    out = cl.propagate(anchor, labels, idx, fresh, gamma=0.0)
    touched = torch.zeros(2, 30, dtype=torch.bool)
    touched.scatter_(1, idx, True)
    assert torch.equal(out[~touched], anchor[~touched])
    assert torch.equal(torch.gather(out, 1, idx[..., None].expand(-1, -1, 8)), fresh)
    half = cl.propagate(anchor, labels, idx, fresh, gamma=0.5)
    member = (~touched[0]).nonzero()[0, 0]
    expected = 0.5 * fresh[0, labels[0, member]] + 0.5 * anchor[0, member]
    assert torch.allclose(half[0, member], expected)


def test_error_prediction_refuses_doomed_forecasts_and_skips_safe_probes(core):
    """Verification errors 0.1 at d = 1 and 0.4 at d = 2 grow like d^2, so d = 3 is
    predicted at 0.4 * (3/2)^2 = 0.9 > threshold 0.5: computed at once, no wasted probe.
    The next run's first forecast (predicted 0.1 < 0.5 * 0.5) skips its probe."""
    cfg = core.CacheConfig(threshold=0.5, warmup_steps=1, max_forecast_steps=8, final_full_steps=0,
                           order=1, skip_verify_below=0.5)
    pol = core.Policy(cfg, 20)
    pol.record_full()
    d1 = pol.decide(2, 0.5)                 # d = 1, nothing known: probe
    assert d1.forecast and d1.verify
    pol.record_error(0.1)
    pol.record_forecast()
    d2 = pol.decide(3, 0.4)                 # predicted 0.1 * 2^2 = 0.4: not safe enough to skip
    assert d2.forecast and d2.verify
    pol.record_error(0.4)
    pol.record_forecast()
    d3 = pol.decide(4, 0.3)
    assert not d3.forecast and d3.reason == "predicted_reject"
    pol.record_full()
    d1b = pol.decide(5, 0.2)
    assert d1b.forecast and not d1b.verify and d1b.reason == "predicted_accept"


def test_attention_received_is_the_softmax_column_mean_over_heads_and_queries(core):
    tt = engine_module(core, "token_tiers")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    probs = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1)            # head dim 4: scale 1/2
    got = tt.attention_received(q, k, slice(2, 7), queries=64)        # every query row used
    assert torch.allclose(got, probs.mean((1, 2))[:, 2:], atol=1e-6)
    full = tt.attention_received(q, k, slice(0, 7), queries=64)
    assert torch.allclose(full.sum(-1), torch.ones(2), atol=1e-6)    # each query spreads 1 over the keys
    sampled = tt.attention_received(q, k, slice(0, 7), queries=3, generator=g)
    assert sampled.shape == (2, 7) and torch.allclose(sampled.sum(-1), torch.ones(2), atol=1e-6)


def test_token_tiers_split_by_history_plus_look_ahead_and_combine(core):
    tt = engine_module(core, "token_tiers")
    change = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    history = torch.tensor([[8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    score = tt.importance(history, change)
    assert torch.allclose(score, change / 1.0 + history / 1.75)
    assert torch.equal(tt.importance(None, change), change)           # no history yet: look ahead alone
    assert torch.equal(tt.importance(history[:, :4], change), change)  # stale shape: ignored
    compute_idx, reuse = tt.split(score, compute=0.25, reuse=0.25)
    assert compute_idx.shape == (1, 2) and compute_idx[0, 0] == 0     # the most attended token first
    assert reuse.sum() == 2 and bool(reuse[0, 7]) and not bool(reuse[0, 0])
    forecast, anchor = torch.full((1, 8, 3), 2.0), torch.full((1, 8, 3), 1.0)
    fresh = torch.full((1, 2, 3), 5.0)
    out = tt.combine(forecast, anchor, compute_idx, fresh, reuse)
    tiers = out[0, :, 0].tolist()
    assert tiers.count(5.0) == 2 and tiers.count(1.0) == 2 and tiers.count(2.0) == 4
    assert tiers[0] == 5.0 and tiers[7] == 1.0
    none_idx, none_reuse = tt.split(score, compute=0.0, reuse=0.0)
    assert torch.equal(tt.combine(forecast, anchor, none_idx, None, none_reuse), forecast)


def test_token_tier_fractions_are_validated(core):
    for bad in (dict(token_compute=-0.1), dict(token_reuse=1.5), dict(token_compute=0.6, token_reuse=0.6)):
        with pytest.raises(ValueError, match="token_compute"):
            core.CacheConfig(**bad)
    assert core.CacheConfig(token_compute=0.1).block_level and not core.CacheConfig().block_level


def test_noise_space_forecasts_a_flow_velocity_exactly_when_the_noise_it_implies_holds(core):
    """Rectified flow: x = (1 - s) x0 + s eps, v = eps - x0. With eps fixed and x0 moving
    quadratically in sigma, v is quadratic (an order-1 forecast of it misses) while the noise
    v implies is constant: forecast in noise space and turned back with the step's real x,
    the velocity comes out exact. Both directions are exact inverses at any sigma below 1."""
    space = engine_module(core, "output_space")
    g = torch.Generator().manual_seed(0)
    eps, a, b = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    x0 = lambda s: a + b * s * s  # noqa: E731
    x = lambda s: (1 - s) * x0(s) + s * eps  # noqa: E731
    v = lambda s: eps - x0(s)  # noqa: E731
    in_model, in_noise = core.TaylorForecaster(1), core.TaylorForecaster(1)
    for s in (0.9, 0.7):
        in_model.update(s, v(s))
        in_noise.update(s, space.noise_from_velocity(v(s), x(s), s))
    target = 0.5
    from_noise = space.velocity_from_noise(in_noise.predict(target), x(target), target)
    assert torch.allclose(from_noise, v(target), atol=1e-5)
    assert (in_model.predict(target) - v(target)).abs().max() > 0.05
    out = torch.randn(3, 5, generator=g)
    xs = torch.randn(3, 5, generator=g)
    assert torch.allclose(space.velocity_from_noise(space.noise_from_velocity(out, xs, 0.3), xs, 0.3), out,
                          atol=1e-6)
    # near sigma = 1 the way back divides by almost nothing: those steps are not forecast
    assert space.can_forecast_noise(0.5) and not space.can_forecast_noise(0.9995)
