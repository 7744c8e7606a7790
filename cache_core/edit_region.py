"""Edit regions (EEdit, arXiv 2503.10270: spatial locality caching for image editing).

In an inpainting or edit run the sampler keeps the unmasked part of the latent: after
every model call ComfyUI blends the model's output with the source latent outside the
mask, so those tokens' outputs are thrown away. They still matter as context: the edited
tokens attend to them. EEdit's observation is that this context changes little from step
to step, so:

* at a *refresh* step every token is computed and each block's attention keys and values
  of the tokens outside the region are kept;
* at the other steps only the region's tokens (and the text tokens) go through the
  blocks; their attention reads the kept keys and values for everything else.

The region is the mask, dilated by a margin, on the model's token grid. This module holds
the tensor maths of that (no ComfyUI): the token mask and the refresh schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_mask(mask: torch.Tensor, latent_hw: tuple[int, int], patch: int, margin: int) -> torch.Tensor:
    """The tokens of the edit region, as a flat bool tensor over the token grid
    (row-major, ceil(H / patch) x ceil(W / patch)).

    ``mask``: the sampler's noise mask in any of ComfyUI's layouts ([H, W], [B, H, W],
    [B, C, H, W], [B, C, T, H, W]), at latent or pixel resolution, 1 = regenerate. A token
    is in the region when any latent pixel of its patch has a mask value above 0 (a soft
    mask's feathered edge is edited too), then the region grows by ``margin`` tokens in
    every direction. Rows of a batch share one region (their union)."""
    if mask.ndim < 2:
        raise ValueError(f"noise mask must have at least 2 dimensions, got shape {tuple(mask.shape)}")
    m = mask.detach().float()
    m = m.reshape(-1, *m.shape[-2:]).amax(0, keepdim=True)[None]        # [1, 1, h, w]
    h, w = latent_hw
    if m.shape[-2] >= h and m.shape[-1] >= w:
        m = F.adaptive_max_pool2d(m, (h, w))       # any masked pixel marks its latent pixel
    else:
        m = F.interpolate(m, size=(h, w), mode="nearest")
    rows, cols = math.ceil(h / patch), math.ceil(w / patch)
    m = F.pad(m, (0, cols * patch - w, 0, rows * patch - h))
    grid = F.max_pool2d(m, patch) > 0
    if margin > 0:
        grid = F.max_pool2d(grid.float(), 2 * margin + 1, stride=1, padding=margin) > 0
    return grid.reshape(-1)


class RefreshSchedule:
    """Which steps compute every token: the first ``warmup`` steps, then every
    ``interval``-th step after the last refresh, and the last ``final`` steps."""

    def __init__(self, total_steps: int, interval: int, warmup: int = 1, final: int = 0):
        if interval < 1:
            raise ValueError(f"refresh interval must be >= 1, got {interval}")
        self.total = int(total_steps)
        self.interval = int(interval)
        self.warmup = max(int(warmup), 1)      # the first step fills the context
        self.final = max(int(final), 0)

    def refresh(self, step: int, last_refresh: int | None) -> bool:
        if last_refresh is None or step < self.warmup or step >= self.total - self.final:
            return True
        return step - last_refresh >= self.interval


def partial_cost(text_tokens: int, region_tokens: int, image_tokens: int) -> float:
    """Share of a full call's linear-layer work that a partial call does (attention's
    quadratic part aside): the tokens that go through the blocks over all tokens."""
    total = text_tokens + image_tokens
    return (text_tokens + region_tokens) / total if total else 1.0
