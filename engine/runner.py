"""ModelRunner: StepBatch -> (append slots, AttentionPlan) -> one forward -> logits.

A step that feeds more than ``max_forward_tokens`` tokens (a long prompt, a big join's
re-prefill, a long ``score``) runs as several forward passes, so that a pass's
temporaries (activations, MLP hidden states: tens of KB a token) stay bounded whatever
the prompt's length. So does a step whose attention would keep more than
``MAX_ATTENTION_STATE_BYTES`` of partial states: one (o, lse) per query row and segment of
its view, every query head (a 1,000-token join header over 1,000 segments asked for 16 GB
on a 7B model). ``split_passes`` says what may be split without changing what any query
row sees.
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
# A pass's attention partial states: float32 (o, lse) per (query row, view segment, query
# head). 1 GiB lets a 7B model (32 heads of 128) decode 1,000 threads with views of 60
# segments in one pass; wider steps (a long header over hundreds of segments) are split.
MAX_ATTENTION_STATE_BYTES = 1 << 30


def split_passes(items: list[StepItem], budget: int,
                 entry_budget: int | None = None) -> list[list[tuple[int, int, int]]] | None:
    """How to run one step's items as forward passes of at most ``budget`` tokens and at
    most ``entry_budget`` attention entries (query row x segment of its view) each: a list
    of passes, each a list of (item index, first token, token count), or None when the
    step runs as one pass (it fits, or cannot be split).

    Within a step every query row sees the tokens all items write in that step (DESIGN.md
    §2: appends come before attention). So an item that reads a segment another item of
    the step writes (its *writer*) runs, all of it, in passes no earlier than its writer's
    last: it still sees that segment complete. An item runs its own earlier tokens before
    its later ones, which read them causally as in one pass. Items that read each other
    (Hogwild! workers) cannot be ordered: each such group runs whole in one pass, which
    exceeds the budgets when the group does, as does a single token whose view alone has
    more than ``entry_budget`` segments. Every other pass keeps within both budgets: the
    items are packed in order (writers pulled ahead of their readers), an item split
    wherever a pass fills up."""
    limit = entry_budget if entry_budget is not None else 1 << 62
    if (sum(len(it.token_ids) for it in items) <= budget
            and (entry_budget is None or sum(len(it.token_ids) * len(it.view) for it in items) <= limit)):
        return None
    width = [max(1, len(it.view)) for it in items]  # entries per token
    writer = {it.own.id: i for i, it in enumerate(items)}
    deps = [[j for s, _ in it.view if (j := writer.get(s.id, i)) != i] for i, it in enumerate(items)]
    groups = _groups_in_order(deps) if any(deps) else [[i] for i in range(len(items))]
    passes, cur, used, used_e = [], [], 0, 0
    for g in groups:
        if len(g) > 1:  # read each other: whole, in one pass
            size = sum(len(items[i].token_ids) for i in g)
            size_e = sum(len(items[i].token_ids) * width[i] for i in g)
            if cur and (used + size > budget or used_e + size_e > limit):
                passes.append(cur)
                cur, used, used_e = [], 0, 0
            cur += [(i, 0, len(items[i].token_ids)) for i in g]
            used += size
            used_e += size_e
            if used >= budget or used_e >= limit:
                passes.append(cur)
                cur, used, used_e = [], 0, 0
        else:
            i, start = g[0], 0
            n, w = len(items[i].token_ids), width[i]
            while start < n:
                take = min(n - start, budget - used, (limit - used_e) // w)
                if take < 1:  # not one more token's entries fit: close the pass
                    if cur:
                        passes.append(cur)
                        cur, used, used_e = [], 0, 0
                        continue
                    take = 1  # one token whose view alone exceeds the budget: alone
                cur.append((i, start, take))
                start += take
                used += take
                used_e += take * w
                if used >= budget or used_e >= limit:
                    passes.append(cur)
                    cur, used, used_e = [], 0, 0
    if cur:
        passes.append(cur)
    return passes if len(passes) > 1 else None


def _groups_in_order(deps: list[list[int]]) -> list[list[int]]:
    """The strongly connected components of "item i reads item j" (``deps[i]``), each
    after every component it reads, otherwise in item order (Tarjan's algorithm,
    iterative: a component is complete once everything it reads is)."""
    n = len(deps)
    index, low, on_stack = [-1] * n, [0] * n, [False] * n
    stack, out, counter = [], [], 0
    for root in range(n):
        if index[root] >= 0:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, 0)]
        while work:
            v, k = work[-1]
            if k < len(deps[v]):
                work[-1] = (v, k + 1)
                w = deps[v][k]
                if index[w] < 0:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = True
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def segment_table(segs: dict, ids=None) -> tuple[array, array, array]:
    """The step's segment table, indexed by segment id: the length and pages (CSR:
    ``pages[page_indptr[id]:page_indptr[id + 1]]``) of the segments ``ids`` (those the step's
    views read; default: every live one); other ids get length -1 and no pages. Python work
    over those segments only (it listed every live segment of the cache: ~0.85 ms a step with
    1,200 of them), and the cache hands out the smallest free id, so ids stay few."""
    live = sorted(segs if ids is None else ids)
    nseg = live[-1] + 1 if live else 0
    lens, page_indptr, pages = array("i", [-1]) * nseg, array("i", [0]) * (nseg + 1), array("i")
    end = 0  # (ids below it are in page_indptr)
    for sid in live:
        s = segs.get(sid)
        if s is None:  # (a view naming a freed segment: the plan builder names it)
            continue
        if sid > end:
            page_indptr[end + 1:sid + 1] = array("i", [len(pages)]) * (sid - end)
        lens[sid] = s.length
        pages.extend(s.pages)
        page_indptr[sid + 1] = len(pages)
        end = sid + 1
    if nseg > end:
        page_indptr[end + 1:] = array("i", [len(pages)]) * (nseg - end)
    return lens, page_indptr, pages


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, backend: str,
                 max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS):
        self.model, self.cache = model, cache
        self.max_forward_tokens = max_forward_tokens
        # Attention entries (query row x view segment) a pass may have: their partial states
        # take (head_dim + 2) floats per query head each.
        cfg = model.cfg
        self.max_pass_entries = max(1, MAX_ATTENTION_STATE_BYTES // (4 * cfg.num_heads * (cfg.head_dim + 2)))
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
            passes = split_passes(batch.items, self.max_forward_tokens, self.max_pass_entries)
            out = self._run(batch) if passes is None else self._run_passes(batch, passes)
        except BaseException:
            cache.rollback_append()
            raise
        cache.end_append()
        return out

    def _run_passes(self, batch: StepBatch, passes) -> torch.Tensor:
        """``_run`` as several forward passes (``split_passes``). The passes return their
        wanted rows' final hidden states, gathered in item order; the logits of all of them
        are computed once at the end (a pass's own [rows, V] logits would be one more
        large tensor at a time: 1.2 GB for 2,048 rows of a 150k vocabulary)."""
        items = batch.items
        first = list(accumulate((it.rows_wanted for it in items), initial=0))  # each item's first row
        out = None  # [R, hidden]
        done = [0] * len(items)  # rows of each item written so far
        for p, pieces in enumerate(passes):
            if p:
                DEFERRED.check()  # a safe point between two passes, as between two steps
            sub = []
            for i, start, count in pieces:
                it = items[i]
                last = start + count == len(it.token_ids)  # the item's last piece
                sub.append(replace(it, token_ids=it.token_ids[start:start + count],
                                   want_logits=it.want_logits and last))
            hidden = self._run(StepBatch(sub), hidden_only=True)
            if out is None:
                out = hidden.new_empty(first[-1], hidden.shape[1])
            r = 0
            for (i, _, _), it in zip(pieces, sub):
                k = it.rows_wanted
                if k:
                    out[first[i] + done[i]:first[i] + done[i] + k] = hidden[r:r + k]
                    done[i] += k
                    r += k
        return self.model.logits(out)

    def _run(self, batch: StepBatch, hidden_only: bool = False) -> torch.Tensor:
        cache = self.cache
        ids, pos, slots, logits_rows = [], [], [], []
        row, max_pos = 0, -1
        for it in batch.items:
            toks, own = it.token_ids, it.own
            n = len(toks)
            if n == 0:
                raise ValueError("StepItem with no new tokens")
            start = own.base + own.length
            slots += cache.append_slots(own, n)
            if n == 1:  # (a decode step's item)
                ids.append(toks[0])
                pos.append(start)
            else:
                ids += toks
                pos += range(start, start + n)
            if start + n - 1 > max_pos:
                max_pos = start + n - 1
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
                          max_position=max_pos, hidden_only=hidden_only)
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
            self._views, self._flat = views, (indptr, vseg, vshift, set(vseg))
            # Reuse by identity only while every view is kept alive (and so its id unique).
            self._batch_key = key if len(views) == len(items) else None
        indptr, vseg, vshift, used = self._flat
        own = array("i", [it.own.id for it in items])
        num_new = array("i", [len(it.token_ids) for it in items])
        lens, page_indptr, pages = segment_table(self.cache.segments, used.union(own))
        i32 = self._i32
        return self._plan_arrays(i32(indptr), i32(vseg), i32(vshift), i32(own), i32(num_new), i32(lens),
                                 i32(page_indptr), i32(pages))
