"""ClusCa (arXiv 2509.10312): cluster the tokens, compute one token per cluster for real,
propagate its update to the whole cluster."""

from __future__ import annotations

import torch

from .tokens import gather_tokens, scatter_tokens


def kmeans(x: torch.Tensor, k: int, init: torch.Tensor | None = None, iters: int = 10,
           generator: torch.Generator | None = None, p: float = 1.0):
    """K-means of the tokens of each row. x [R, N, D] -> labels [R, N] (long), centroids
    [R, K, D] (float32). L1 distance (p = 1) as in ClusCa; mean centroids; warm-started
    from ``init`` when its shape fits, else seeded by k-means++ (Arthur & Vassilvitskii
    2007: each new seed drawn with probability ~ distance^2 to the nearest seed, which
    avoids the empty and merged clusters of a purely random start); stops early when
    the centroids settle."""
    r, n, d = x.shape
    k = max(1, min(int(k), n))
    xf = x.detach().float()
    if init is not None and tuple(init.shape) == (r, k, d):
        cent = init.to(device=x.device, dtype=torch.float32).clone()
    else:
        cent = _kmeans_pp(xf, k, generator, p)
    labels = None
    for _ in range(iters):
        labels = torch.cdist(xf, cent, p=p).argmin(dim=-1)                    # [R, N]
        onehot = torch.zeros(r, n, k, device=x.device, dtype=torch.float32)
        onehot.scatter_(2, labels[..., None], 1.0)
        counts = onehot.sum(1)                                                 # [R, K]
        sums = onehot.transpose(1, 2) @ xf                                     # [R, K, D]
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
        settled = torch.allclose(new, cent, rtol=1e-4, atol=1e-6)
        cent = new
        if settled:
            break
    labels = torch.cdist(xf, cent, p=p).argmin(dim=-1)
    return labels, cent


def _kmeans_pp(xf: torch.Tensor, k: int, generator, p: float) -> torch.Tensor:
    r, n, d = xf.shape
    first = torch.randint(0, n, (r,), generator=generator).to(xf.device)
    seeds = [xf[torch.arange(r), first]]
    nearest = torch.cdist(xf, seeds[0][:, None], p=p)[..., 0]                # [R, N]
    for _ in range(1, k):
        weights = (nearest ** 2).cpu()
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        pick = torch.multinomial(weights, 1, generator=generator)[:, 0].to(xf.device)
        seeds.append(xf[torch.arange(r), pick])
        nearest = torch.minimum(nearest, torch.cdist(xf, seeds[-1][:, None], p=p)[..., 0])
    return torch.stack(seeds, 1).clone()


def pick_representatives(labels: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly random token of each cluster, per row: [R, K] token indices. An
    empty cluster gets a random token (its update then lands on that token alone)."""
    r, n = labels.shape
    noise = torch.rand(r, n, generator=generator).to(labels.device)
    idx = torch.empty(r, k, dtype=torch.long, device=labels.device)
    for c in range(k):
        score = torch.where(labels == c, noise, torch.full_like(noise, -1.0))
        idx[:, c] = score.argmax(dim=1)
    return idx


def propagate(anchor: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, fresh: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """ClusCa's update of a cached feature (factor 0): the representatives take their fresh
    values, and every token moves towards its cluster's fresh value by ``gamma``:
    C <- gamma * R + (1 - gamma) * C, R = the fresh value of the token's cluster.
    anchor [R, N, D], labels [R, N], idx [R, K], fresh [R, K, D]."""
    out = anchor
    if gamma > 0:
        out = gamma * gather_tokens(fresh, labels).to(out.dtype) + (1 - gamma) * out
    return scatter_tokens(out, idx, fresh)
