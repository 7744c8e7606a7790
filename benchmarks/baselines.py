"""Baselines that ComfyUI users know, written here from their published ideas (no code
of theirs): a first-block cache (FBCache: run the first block every step; when its
residual barely changed since the last full step, reuse the residual of the rest of the
stack). Installed through ComfyUI's chainable hooks like the pack itself."""

from __future__ import annotations

import comfy.model_patcher
import comfy.patcher_extension as pe

KEY = "bench_fbcache"


class _FBState:
    def __init__(self, threshold, plan):
        self.threshold = threshold
        self.plan = plan                 # [(key, tensors)], first block first
        self.ref = {}                    # chunk key -> first-block residual at last full step
        self.rest = {}                   # chunk key -> {stage: {tensor: residual}}
        self.skip = False
        self.chunk = None
        self.stage_in = {}
        self.computed = 0
        self.skipped = 0
        self.bytes = 0

    def nbytes(self):
        n = sum(t.numel() * t.element_size() for t in self.ref.values())
        for stages in self.rest.values():
            n += sum(t.numel() * t.element_size() for d in stages.values() for t in d.values())
        self.bytes = max(self.bytes, n)
        return n


def _stages(plan):
    """Stages of the blocks after the first: runs of one kind."""
    stages, current = [], []
    for key, tensors in plan[1:]:
        if current and key[0] != current[-1][0][0]:
            stages.append(current)
            current = []
        current.append((key, tensors))
    if current:
        stages.append(current)
    return stages


class FirstBlockPatch:
    def __init__(self, key, index, stage_of, previous=None):
        self.key, self.index, self.stage_of, self.previous = key, index, stage_of, previous

    def __call__(self, args, extra):
        st = args.get("transformer_options", {}).get(KEY)
        run = (lambda: self.previous(args, extra)) if self.previous else (lambda: extra["original_block"](args))
        if st is None:
            return run()
        tensors = [t for t in ("img", "txt") if t in args]
        if self.index == 0:
            st.chunk = tuple(args["transformer_options"].get("uuids") or ())
            inputs = {t: args[t].clone() for t in tensors}
            out = run()
            r1 = out["img"] - inputs["img"]
            prev = st.ref.get(st.chunk)
            st.skip = False
            if prev is not None and prev.shape == r1.shape and st.chunk in st.rest:
                change = float((r1 - prev).abs().mean() / (prev.abs().mean() + 1e-12))
                st.skip = change < st.threshold
            if st.skip:
                st.skipped += 1
            else:
                st.ref[st.chunk] = r1
                st.computed += 1
            return out
        stage, first, last = self.stage_of[self.key]
        if st.skip:
            if first:
                res = st.rest[st.chunk][stage]
                return {t: args[t] + res[t] for t in res}
            return {t: args[t] for t in tensors}
        if first:
            st.stage_in = {t: args[t].clone() for t in tensors}
        out = run()
        if last:
            # (Wan's blocks return the image tokens only: the text is not changed by them)
            st.rest.setdefault(st.chunk, {})[stage] = {t: out[t] - st.stage_in[t] for t in tensors if t in out}
            st.nbytes()
        return out


def fbcache_outer_sample(executor, *args, **kwargs):
    guider = executor.class_obj
    orig = guider.model_options
    holder = orig["transformer_options"].get(KEY + "_settings")
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        guider.model_options["transformer_options"][KEY] = _FBState(*holder)
        state = guider.model_options["transformer_options"][KEY]
        out = executor(*args, **kwargs)
        fbcache_outer_sample.last = {"computed": state.computed, "skipped": state.skipped,
                                     "cache_bytes": state.bytes}
        return out
    finally:
        guider.model_options = orig


def apply_fbcache(model, threshold: float, plan):
    """plan: [(key, tensors)] of all blocks in execution order (first block first)."""
    m = model.clone()
    stage_of = {}
    for s_index, stage in enumerate(_stages(plan)):
        for i, (key, _) in enumerate(stage):
            stage_of[key] = (s_index, i == 0, i == len(stage) - 1)
    m.model_options["transformer_options"][KEY + "_settings"] = (threshold, list(plan))
    existing = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for index, (key, _) in enumerate(plan):
        m.set_model_patch_replace(FirstBlockPatch(key, index, stage_of, existing.get(key)), "dit", key[0], key[1])
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, fbcache_outer_sample)
    return m


__all__ = ["apply_fbcache", "fbcache_outer_sample"]
