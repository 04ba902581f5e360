"""ModelRunner: StepBatch -> (append slots, AttentionPlan) -> one forward -> logits."""
from __future__ import annotations

import torch

from . import attention
from .attention.plan import ThreadStep
from .cache import KVCache
from .model import CausalLM, ForwardBatch
from .step import StepBatch


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, backend: str):
        self.model, self.cache = model, cache
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

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Append every item's tokens, attend, and return logits [R, V] (float32) for the
        wanted rows in item order (all rows of an ``all_logits`` item, else its last)."""
        cache = self.cache
        ids, pos, slots, logits_rows, threads = [], [], [], [], []
        row = 0
        for it in batch.items:
            n = len(it.token_ids)
            if n == 0:
                raise ValueError("StepItem with no new tokens")
            start = it.own.base + it.own.length
            slots.extend(cache.append_slots(it.own, n))
            ids.extend(it.token_ids)
            pos.extend(range(start, start + n))
            if it.all_logits:
                logits_rows.extend(range(row, row + n))
            elif it.want_logits:
                logits_rows.append(row + n - 1)
            threads.append(ThreadStep([(s.id, sh) for s, sh in it.view], it.own.id, n))
            row += n
        segs = {s.id: s for it in batch.items for s, _ in it.view}
        plan = self._build_plan(threads, {i: s.length for i, s in segs.items()},
                                {i: s.pages for i, s in segs.items()})
        dev = self.device
        fb = ForwardBatch(plan=plan.to(dev) if dev.type != "cpu" else plan,
                          slots=torch.tensor(slots, dtype=torch.int64, device=dev),
                          logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev))
        return self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                  torch.tensor(pos, dtype=torch.int64, device=dev),
                                  fb, cache.k, cache.v)
