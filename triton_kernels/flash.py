"""Optional flash-attn fast path for plain causal prefill (imported lazily).

A plan is *plain causal prefill* when every row has exactly one entry, no shift,
and each job's rows are exactly its segment's tokens read causally (the job's
``kv_len`` equals its entry count and entry ``i`` sees ``i + 1`` keys): ordinary
varlen causal attention, which ``flash_attn_varlen_func`` does best. Its K/V are
gathered from the pages into one packed tensor (any page size works; flash-attn's
own paged path wants pages of 256 tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.plan import AttentionPlan

_FLASH = None  # cached: the function, or False when flash-attn is not importable


def flash_varlen_fn():
    """``flash_attn.flash_attn_varlen_func``, or None when flash-attn is not installed."""
    global _FLASH
    if _FLASH is None:
        try:
            from flash_attn import flash_attn_varlen_func
            _FLASH = flash_attn_varlen_func
        except Exception:  # ImportError, or a build that fails to load its CUDA library
            _FLASH = False
    return _FLASH or None


_FLASH_GPUS: dict = {}  # device index -> whether flash-attn 2 runs there


def flash_supported(device: torch.device) -> bool:
    """flash-attn 2 runs on Ampere / Ada (sm_8x) and Hopper (sm_90) only: on a T4, a V100
    or a Blackwell GPU its kernels raise on every call, so those use the Triton kernel."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLASH_GPUS:
        major, minor = torch.cuda.get_device_capability(idx)
        _FLASH_GPUS[idx] = major == 8 or (major, minor) == (9, 0)
    return _FLASH_GPUS[idx]


@dataclass
class PrefillLayout:
    cu_seqlens: torch.Tensor   # [B+1] int32: rows (= keys) of each prefilled segment
    max_len: int
    rows: torch.Tensor | None  # [T] int64: q row of each packed position (None: identity)
    slots: torch.Tensor        # [T] int64: pool slot of each packed key


def prefill_layout(plan: AttentionPlan, page_size: int) -> PrefillLayout | None:
    """The packed varlen layout of ``plan`` if it is plain causal prefill, else None."""
    hp = plan.host()  # (the plan as built on the CPU: no copy back from the GPU)
    h = {f: getattr(hp, f).detach().to("cpu", torch.int64)
         for f in ("q_indptr", "kv_len", "q_rows", "causal_limit", "shift", "merge_indptr",
                   "kv_indptr", "kv_page_ids")}
    T = h["merge_indptr"].numel() - 1
    E = h["q_rows"].numel()
    if E != T or T == 0 or bool((h["shift"] != 0).any()):
        return None
    if not bool(((h["merge_indptr"][1:] - h["merge_indptr"][:-1]) == 1).all()):
        return None
    n = h["q_indptr"][1:] - h["q_indptr"][:-1]
    if not bool((h["kv_len"][n > 0] == n[n > 0]).all()):
        return None
    job = torch.repeat_interleave(torch.arange(n.numel()), n)
    i = torch.arange(E) - h["q_indptr"][job]
    if not bool((h["causal_limit"] == i + 1).all()):
        return None
    pages = h["kv_page_ids"][h["kv_indptr"][job] + i // page_size]
    slots = pages * page_size + i % page_size
    rows = h["q_rows"]
    if bool((rows == torch.arange(T)).all()):
        rows = None
    lens = n[n > 0]
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    dev = plan.q_rows.device
    return PrefillLayout(cu.to(dev), int(lens.max()), None if rows is None else rows.to(dev),
                         slots.to(dev))


def flash_prefill(q, k_pool, v_pool, layout: PrefillLayout, scale: float, fn) -> torch.Tensor:
    """Causal varlen attention of ``layout`` with ``fn`` (flash_attn_varlen_func's signature)."""
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    k = k_pool.reshape(-1, Hkv, D)[layout.slots]  # [T, Hkv, D] packed by segment
    v = v_pool.reshape(-1, Hkv, D)[layout.slots]
    qp = q if layout.rows is None else q[layout.rows]
    o = fn(qp, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_len, layout.max_len,
           softmax_scale=scale, causal=True)
    if layout.rows is None:
        return o
    return torch.empty_like(o).index_copy_(0, layout.rows, o)
