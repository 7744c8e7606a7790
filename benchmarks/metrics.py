"""Measurement tools of the benchmark: fidelity metrics and a counter of the
multiply-accumulates a transformer actually runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) of ``a`` against the reference ``b``."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 0.01,
    K2 0.03, sample covariances, over the valid region. Images [..., H, W]; channels and
    batch are averaged."""
    a = a.double().reshape(-1, 1, *a.shape[-2:])
    b = b.double().reshape(-1, 1, *b.shape[-2:])
    w = _gaussian_window(win, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    n = win * win
    cov = n / (n - 1)  # unbiased, as in the reference implementation
    var_a = cov * (F.conv2d(a * a, w) - mu_a ** 2)
    var_b = cov * (F.conv2d(b * b, w) - mu_b ** 2)
    cov_ab = cov * (F.conv2d(a * b, w) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


class MacCounter:
    """Counts multiply-accumulates actually executed inside a module tree: every
    ``nn.Linear`` call (tokens x in x out) plus the two attention matmuls of every
    transformer block call (2 x B x heads x L^2 x head_dim), measured from the shapes
    the calls really see. Element-wise work (norms, activations, the cache's own
    forecasts) is not counted."""

    def __init__(self, module, blocks=(), heads: int | None = None):
        self.total = 0
        self.by_block: dict[int, int] = {}
        self._handles = []
        self._current_block = None
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                self._handles.append(sub.register_forward_hook(self._linear))
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_pre_hook(self._enter(i), with_kwargs=True))
            self._handles.append(blk.register_forward_hook(self._leave))
        self.heads = heads

    def _linear(self, mod, inputs, output):
        x = inputs[0]
        macs = (x.numel() // x.shape[-1]) * mod.in_features * mod.out_features
        self._add(macs)

    def _add(self, macs):
        self.total += macs
        if self._current_block is not None:
            self.by_block[self._current_block] = self.by_block.get(self._current_block, 0) + macs

    def _enter(self, index):
        def hook(mod, args, kwargs):
            self._current_block = index
            img = kwargs["img"] if "img" in kwargs else kwargs["x"] if "x" in kwargs else args[0]
            txt = kwargs.get("txt")
            length = img.shape[1] + (txt.shape[1] if isinstance(txt, torch.Tensor) else 0)
            # q @ k^T and attn @ v over all heads: 2 * B * L * L * dim
            self._add(2 * img.shape[0] * length * length * img.shape[-1])
        return hook

    def _leave(self, mod, inputs, output):
        self._current_block = None

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []
