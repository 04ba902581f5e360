"""ModelRunner: StepBatch -> (append slots, AttentionPlan) -> one forward -> logits.

A step that feeds more than ``max_forward_tokens`` tokens (a long prompt, a big join's
re-prefill, a long ``score``) runs as several forward passes, so that a pass's
temporaries (activations, MLP hidden states: tens of KB a token) stay bounded whatever
the prompt's length. ``split_passes`` says what may be split without changing what any
query row sees.
"""
from __future__ import annotations

from array import array
from dataclasses import replace
from itertools import accumulate

import torch

from . import attention
from .attention.plan import ThreadStep
from .cache import KVCache
from .interrupts import DEFERRED
from .model import CausalLM, ForwardBatch
from .step import StepBatch, StepItem

DEFAULT_MAX_FORWARD_TOKENS = 2048


def split_passes(items: list[StepItem], budget: int) -> list[list[tuple[int, int, int]]] | None:
    """How to run one step's items as forward passes of at most ``budget`` tokens each:
    a list of passes, each a list of (item index, first token, token count), or None when
    the step runs as one pass (it fits, or none of its items may be split).

    Within a step every query row sees the tokens all items write in that step (DESIGN.md
    §2: appends come before attention). Running an item's first tokens in an earlier pass
    is therefore exact only when its view reads no segment another item of the step
    writes: its rows then see the same keys either way (their own segment causally,
    every other segment complete). Such items keep only their last token for the final
    pass, and their other tokens are packed, in order, into the passes before it; the
    final pass takes every other item whole (so a step of many unsplittable items can
    exceed the budget), and as many of the split items' last tokens as fit."""
    if sum(len(it.token_ids) for it in items) <= budget:
        return None
    written = {it.own.id for it in items}
    tail = []  # tokens of each item in the final pass
    for it in items:
        n, own = len(it.token_ids), it.own.id
        alone = n > 1 and all(s.id == own or s.id not in written for s, _ in it.view)
        tail.append(1 if alone else n)
    room = budget - sum(tail)
    # The split items' earlier tokens, last first, go back to the final pass while it has room.
    for i in reversed(range(len(items))):
        if room <= 0:
            break
        more = min(room, len(items[i].token_ids) - tail[i])
        tail[i] += more
        room -= more
    passes, cur, used = [], [], 0
    for i, it in enumerate(items):
        start, end = 0, len(it.token_ids) - tail[i]
        while start < end:
            take = min(end - start, budget - used)
            cur.append((i, start, take))
            start += take
            used += take
            if used == budget:
                passes.append(cur)
                cur, used = [], 0
    if cur:
        passes.append(cur)
    if not passes:  # nothing may be split
        return None
    passes.append([(i, len(it.token_ids) - tail[i], tail[i]) for i, it in enumerate(items)])
    return passes


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, backend: str,
                 max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS):
        self.model, self.cache = model, cache
        self.max_forward_tokens = max_forward_tokens
        self.device = model.device
        self.backend_name, attn_fn = attention.get_backend(backend, self.device)
        model.attention = attn_fn
        model.append_kv = attention.get_append_kv(self.device)
        # One call per decoder layer when every op of the fused forward is Loom's own CPU op.
        model.layer_step = None
        if self.backend_name == "cpu" and model.fused:
            from . import _ops
            model.layer_step = getattr(_ops._C, "decoder_layer", None)
        self._build_plan = attention.get_plan_builder()
        self._plan_arrays = self._i32 = None  # the C++ plan builder's flat entry point
        if attention.ops_available():
            from . import _ops
            self._plan_arrays, self._i32 = _ops.build_plan_arrays, _ops.i32_tensor
        # id(view) -> (view, segment ids, shifts) for the tuple views of the last step: a
        # thread's view changes only when it is reassigned (fork, join, set_view, a live
        # view's re-layout), so most steps reuse its flat arrays.
        self._views: dict[int, tuple] = {}
        self._batch_key, self._flat = None, None

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Append every item's tokens, attend, and return logits [R, V] (float32) for the
        wanted rows in item order (all rows of an ``all_logits`` item, else its last).
        A step that fails (an error, or Ctrl-C, in the forward) leaves the segments as they
        were: its tokens stay pending and a later step writes them once, not twice."""
        cache = self.cache
        cache.begin_append()
        try:
            DEFERRED.check()  # a waiting Ctrl-C: here (or between layers), as a failed forward
            passes = split_passes(batch.items, self.max_forward_tokens)
            out = self._run(batch) if passes is None else self._run_passes(batch, passes)
        except BaseException:
            cache.rollback_append()
            raise
        cache.end_append()
        return out

    def _run_passes(self, batch: StepBatch, passes) -> torch.Tensor:
        """``_run`` as several forward passes (``split_passes``); the logits of every pass
        land in one [R, V] tensor, in item order."""
        items = batch.items
        rows = [len(it.token_ids) if it.all_logits else int(it.want_logits) for it in items]
        first = list(accumulate(rows, initial=0))  # where each item's rows start in the output
        out = None
        done = [0] * len(items)  # rows of each item written so far
        for p, pieces in enumerate(passes):
            if p:
                DEFERRED.check()  # a safe point between two passes, as between two steps
            last = p == len(passes) - 1
            sub = []
            for i, start, count in pieces:
                it = items[i]
                sub.append(replace(it, token_ids=it.token_ids[start:start + count],
                                   want_logits=it.want_logits and last))
            logits = self._run(StepBatch(sub))
            if out is None:
                out = torch.empty(first[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
            r = 0
            for (i, _, count), it in zip(pieces, sub):
                k = count if it.all_logits else int(it.want_logits)
                if k:
                    out[first[i] + done[i]:first[i] + done[i] + k] = logits[r:r + k]
                    done[i] += k
                    r += k
        return out

    def _run(self, batch: StepBatch) -> torch.Tensor:
        cache = self.cache
        ids, pos, slots, logits_rows = [], [], [], []
        row, max_pos = 0, -1
        for it in batch.items:
            n = len(it.token_ids)
            if n == 0:
                raise ValueError("StepItem with no new tokens")
            start = it.own.base + it.own.length
            slots.extend(cache.append_slots(it.own, n))
            ids.extend(it.token_ids)
            pos.extend(range(start, start + n))
            max_pos = max(max_pos, start + n - 1)
            if it.all_logits:
                logits_rows.extend(range(row, row + n))
            elif it.want_logits:
                logits_rows.append(row + n - 1)
            row += n
        plan = self._plan_flat(batch) if self._plan_arrays is not None else self._plan_threads(batch)
        dev = self.device
        fb = ForwardBatch(plan=plan.to(dev) if dev.type != "cpu" else plan,
                          slots=torch.tensor(slots, dtype=torch.int64, device=dev),
                          logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
                          all_rows=len(logits_rows) == row and logits_rows == list(range(row)),
                          max_position=max_pos)
        return self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                  torch.tensor(pos, dtype=torch.int64, device=dev),
                                  fb, cache.k, cache.v)

    def _plan_threads(self, batch: StepBatch):
        """The plan through ThreadStep lists (the plain-Python builder)."""
        threads = [ThreadStep([(s.id, sh) for s, sh in it.view], it.own.id, len(it.token_ids))
                   for it in batch.items]
        segs = {s.id: s for it in batch.items for s, _ in it.view}
        return self._build_plan(threads, {i: s.length for i, s in segs.items()},
                                {i: s.pages for i, s in segs.items()})

    def _plan_flat(self, batch: StepBatch):
        """The plan from flat int32 arrays, built without a Python loop over view entries:
        each view's (segment id, shift) arrays are kept from step to step, and the segment
        table is the cache's (every live segment, so no union over the views). At 1,000
        threads with views of 50 segments: ~1-2 ms with the op (0.5-0.9 ms) instead of ~18."""
        items = batch.items
        key = [id(it.view) for it in items]
        if key != self._batch_key:  # else: the same (immutable) views as last step, in order
            views, old = {}, self._views
            indptr, vseg, vshift = array("i", [0]), array("i"), array("i")
            for it in items:
                v = it.view
                ent = old.get(id(v))
                if ent is None or ent[0] is not v:
                    ent = (v, array("i", [s.id for s, _ in v]), array("i", [sh for _, sh in v]))
                if isinstance(v, tuple):  # immutable: safe to keep by identity
                    views[id(v)] = ent
                vseg.extend(ent[1])
                vshift.extend(ent[2])
                indptr.append(len(vseg))
            self._views, self._flat = views, (indptr, vseg, vshift)
            # Reuse by identity only while every view is kept alive (and so its id unique).
            self._batch_key = key if len(views) == len(items) else None
        indptr, vseg, vshift = self._flat
        own = array("i", [it.own.id for it in items])
        num_new = array("i", [len(it.token_ids) for it in items])
        segs = self.cache.segments
        nseg = max(segs, default=-1) + 1
        lens, page_indptr, pages = array("i", [-1]) * nseg, array("i", [0]) * (nseg + 1), array("i")
        for sid in range(nseg):
            s = segs.get(sid)
            if s is not None:
                lens[sid] = s.length
                pages.extend(s.pages)
            page_indptr[sid + 1] = len(pages)
        i32 = self._i32
        return self._plan_arrays(i32(indptr), i32(vseg), i32(vshift), i32(own), i32(num_new), i32(lens),
                                 i32(page_indptr), i32(pages))
