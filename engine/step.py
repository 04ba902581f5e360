"""One object crosses each boundary of a step:

    EngineCore.step(feed, samplers) -> StepBatch -> ModelRunner.run(StepBatch) -> logits [R, V]
    -> sampler -> tokens, applied by the protocols (EngineCore.accept)

A ``StepItem`` is one thread's part of a step: new tokens appended to its own
segment, the view it attends, and whether the logits after its last new token
are wanted. The runner turns a StepBatch into slots, an AttentionPlan and one
forward pass over all items of all requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cache import Segment


@dataclass
class StepItem:
    own: Segment                           # segment the new tokens are appended to
    token_ids: list[int]                   # new tokens, at home positions own.base + own.length + i
    view: list[tuple[Segment, int]]        # (segment, shift) pairs attended, own included
    want_logits: bool = True               # logits after the last new token
    all_logits: bool = False               # logits after every new token (scoring)
    owner: object = None                   # the scheduler's handle (thread or request)

    @property
    def rows_wanted(self) -> int:
        """Logits rows this item asks for: every new token's, its last's, or none."""
        return len(self.token_ids) if self.all_logits else int(self.want_logits)


@dataclass
class StepBatch:
    items: list[StepItem] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)

    def __len__(self) -> int:
        return len(self.items)
