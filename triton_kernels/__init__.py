"""Loom's Triton kernels (GPU; on the CPU only under ``TRITON_INTERPRET=1``).

* ``segment_attention(q, k_pool, v_pool, plan, inv_freq, scale) -> o``: the attention
  operator of ``engine/attention/plan.py`` (extend with ``tl.dot`` tiles, split-K/V
  for few rows reading long segments, in-kernel query rotation for shifts).
* ``merge_states(o, lse, merge_indptr, merge_entries, num_rows)``: log-sum-exp merge.
* ``rope_append(...)`` / ``append_kv(k_pool, v_pool, k, v, slots)``: write new K/V
  into their pages (rotating K at its home position for the former).
* ``attention(...)``: what the engine's ``triton`` backend calls: flash-attn for
  plain causal prefill when it is installed on a GPU, else ``segment_attention``.

Importing this package imports triton, which reads ``TRITON_INTERPRET`` when the
kernels are defined: set it before the first import to run on CPU tensors.
"""
from __future__ import annotations

import torch

from ._common import INTERPRET
from .segment import segment_attention
from .flash import flash_prefill, flash_supported, flash_varlen_fn, prefill_layout
from .merge import merge_states
from .rope_append import append_kv, rope_append
from .work import cached_work


def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan, inv_freq,
              scale: float) -> torch.Tensor:
    """The engine backend: flash-attn's varlen kernel for plain causal prefill (CUDA
    sm_8x / sm_90, fp16/bf16, flash-attn installed), the Triton segment attention otherwise."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 \
            and q.shape[-1] % 8 == 0 and flash_supported(q.device):
        fn = flash_varlen_fn()
        if fn is not None:
            layout = cached_work(plan, ("flash", k_pool.shape[1]),
                                 lambda: prefill_layout(plan, k_pool.shape[1]))
            if layout is not None:
                return flash_prefill(q, k_pool, v_pool, layout, scale, fn)
    return segment_attention(q, k_pool, v_pool, plan, inv_freq, scale)


__all__ = ["segment_attention", "merge_states", "rope_append", "append_kv", "attention",
           "INTERPRET"]
