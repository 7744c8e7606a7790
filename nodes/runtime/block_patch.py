"""The pack's ``patches_replace["dit"]`` block patches, and where each goes in a block's chain.

A block's entry in ``patches_replace["dit"]`` is one callable; every patch this pack installs
keeps the one that was there before it and calls it (or, with none, the model's own block), so
patches of other packs and of ComfyUI's own nodes (SkipLayerGuidance) keep working.

Among the pack's own patches the order is data: each patch class says which feature owns it
and its ``rank`` (higher = further out, called first). Whichever node comes first in the graph,
the chain ends up ordered by rank, and a second node of the same feature replaces the first."""

from __future__ import annotations

import copy

from . import guard


class ChainedBlockPatch:
    """Base of a block patch that chains to the patch that was there before it. Subclasses
    decide in ``act`` when to act, and set ``feature`` and ``rank``. What ``act`` raises is the
    pack's (``guard.ours``); what the patches below and the model's block raise is theirs."""

    feature = ""
    rank = 0

    def __init__(self, key, previous=None):
        self.key = tuple(key)
        self.previous = previous

    def __call__(self, args, extra):
        with guard.ours():
            return self.act(args, extra)

    def act(self, args, extra):
        return self._run(args, extra)

    def _run(self, args, extra):
        if self.previous is not None:
            return guard.theirs(self.previous, args, extra)
        return guard.theirs(extra["original_block"], args)

    def over(self, previous) -> "ChainedBlockPatch":
        """This patch, chained to ``previous`` instead (a copy: a chain may be shared by
        clones of the model)."""
        patch = copy.copy(self)
        patch.previous = previous
        return patch


def chained(top, patch: ChainedBlockPatch):
    """The new top of a block's chain whose top is now ``top``, with ``patch`` in its place:
    below the pack's patches of higher rank, replacing its own feature's patch that sits
    right there, above everything else."""
    outer = []
    below = top
    while isinstance(below, ChainedBlockPatch) and below.rank > patch.rank:
        outer.append(below)
        below = below.previous
    while isinstance(below, ChainedBlockPatch) and below.feature == patch.feature:
        below = below.previous
    new_top = patch.over(below)
    for o in reversed(outer):
        new_top = o.over(new_top)
    return new_top


def install_block_patches(patcher, keys, make_patch) -> None:
    """Put ``make_patch(key)`` into the chain of every block key of ``keys`` on ``patcher``
    (a ModelPatcher clone)."""
    dit = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key in keys:
        top = chained(dit.get(tuple(key)), make_patch(tuple(key)))
        patcher.set_model_patch_replace(top, "dit", key[0], key[1])
