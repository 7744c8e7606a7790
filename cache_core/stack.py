"""Stack granularity: the block stack split into stages whose residuals are forecast.

A stage is a run of consecutive blocks of one kind (FLUX: the double-stream blocks,
then the single-stream blocks). The last block of the stack is a stage of its own: it
is the block SpeCa runs for real to verify a forecast (arXiv 2509.11628 verifies the
last block on the forecast input). Per stage and per tensor (img, txt) the residual
``out - in`` is stored at full steps and forecast at the others: a few tensors per
stream, whatever the depth of the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    keys: tuple            # block keys in execution order
    tensors: tuple         # names of the tensors the stage carries ("img", "txt")
    verify: bool = False   # the verification stage (the last block)

    def feature(self, tensor: str) -> str:
        return f"{self.name}.{tensor}"

    @property
    def features(self) -> tuple:
        return tuple(self.feature(t) for t in self.tensors)


class StackPlan:
    """Stages of a block stack. ``blocks`` is ``[(key, tensor_names), ...]`` in
    execution order, a key being e.g. ``("double_block", 3)``."""

    def __init__(self, blocks):
        blocks = [(tuple(k), tuple(t)) for k, t in blocks]
        if not blocks:
            raise ValueError("a stack plan needs at least one block")
        self.blocks = blocks
        stages: list[Stage] = []
        body, last = blocks[:-1], blocks[-1]
        run_keys, run_tensors, run_kind = [], None, None
        for key, tensors in body:
            kind = key[0]
            if run_keys and (kind != run_kind or tensors != run_tensors):
                stages.append(Stage(f"{run_kind}{len(stages)}", tuple(run_keys), run_tensors))
                run_keys = []
            run_keys.append(key)
            run_kind, run_tensors = kind, tensors
        if run_keys:
            stages.append(Stage(f"{run_kind}{len(stages)}", tuple(run_keys), run_tensors))
        stages.append(Stage("verify", (last[0],), last[1], verify=True))
        self.stages = tuple(stages)
        self._where = {}
        for stage in self.stages:
            for i, key in enumerate(stage.keys):
                self._where[key] = (stage, i == 0, i == len(stage.keys) - 1)

    @property
    def keys(self) -> tuple:
        return tuple(k for k, _ in self.blocks)

    @property
    def verify_stage(self) -> Stage:
        return self.stages[-1]

    def locate(self, key):
        """(stage, is_first_block_of_stage, is_last_block_of_stage), or None."""
        return self._where.get(tuple(key))

    @property
    def features(self) -> tuple:
        return tuple(f for s in self.stages for f in s.features)

    def __len__(self) -> int:
        return len(self.blocks)
