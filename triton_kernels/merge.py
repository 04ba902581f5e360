"""Log-sum-exp merge of partial attention states, in Triton.

Row t's output combines the partial states of the entries listed in
``merge_entries[merge_indptr[t]:merge_indptr[t+1]]`` (each entry may own several
consecutive states when its segment was split, see ``work.py``):
``lse = log(sum_s e^lse_s)``, ``o = sum_s o_s e^(lse_s - lse)``, with the running
maximum subtracted first. States with lse = -inf (no visible key) weigh nothing;
a row with none gets zeros. lse is the natural log throughout, as the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _merge_kernel(
    o_ptr, lse_ptr, out_ptr, merge_indptr_ptr, merge_entries_ptr, state_off_ptr, nsplit_ptr,
    H,
    stride_os, stride_oh, stride_ls, stride_lh, stride_ot, stride_oh2,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SPLIT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    d = tl.arange(0, D_PAD)
    dmask = d < D
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    i0 = tl.load(merge_indptr_ptr + t)
    i1 = tl.load(merge_indptr_ptr + t + 1)
    for i in range(i0, i1):
        e = tl.load(merge_entries_ptr + i)
        if HAS_SPLIT:
            s0 = tl.load(state_off_ptr + e)
            ns = tl.load(nsplit_ptr + e)
        else:
            s0 = e
            ns = 1
        for k in range(0, ns):
            s64 = s0.to(tl.int64) + k
            lse = tl.load(lse_ptr + s64 * stride_ls + h * stride_lh, mask=hmask, other=float("-inf"))
            live = lse > float("-inf")
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m - m_safe)
            w = tl.exp(lse - m_safe)
            # never read a dead state's o: the buffer may hold garbage there
            o = tl.load(o_ptr + s64 * stride_os + h[:, None] * stride_oh + d[None, :],
                        mask=(hmask & live)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc = acc * a[:, None] + o * w[:, None]
            den = den * a + w
            m = m_new
    res = tl.where(den[:, None] > 0.0, acc / tl.where(den > 0.0, den, 1.0)[:, None], 0.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h[:, None] * stride_oh2 + d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])


def launch_merge(o: torch.Tensor, lse: torch.Tensor, merge_indptr: torch.Tensor,
                 merge_entries: torch.Tensor, out: torch.Tensor,
                 state_off: torch.Tensor | None = None, nsplit: torch.Tensor | None = None) -> None:
    """Unchecked launcher: merge states o [S, H, D], lse [S, H] into out [T, H, D]."""
    T, H, D = out.shape
    if T == 0:
        return
    if merge_entries.numel() == 0:  # nothing to merge (and no valid pointer to pass on CUDA)
        out.zero_()
        return
    d_pad = C.next_pow2(D)
    block_h = min(C.next_pow2(H), max(1, 4096 // d_pad))
    has_split = state_off is not None
    if not has_split:
        state_off = nsplit = merge_entries  # unused
    with C.device_guard(out.device):
        _merge_kernel[(T, C.cdiv(H, block_h))](
            o, lse, out, merge_indptr, merge_entries, state_off, nsplit, H,
            *o.stride()[:2], *lse.stride()[:2], *out.stride()[:2],  # (stride(i): ~2x the time)
            D=D, D_PAD=d_pad, BLOCK_H=block_h, HAS_SPLIT=has_split, num_warps=4)


def merge_states(o: torch.Tensor, lse: torch.Tensor, merge_indptr: torch.Tensor,
                 merge_entries: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Partial states ``o [E, H, D]``, ``lse [E, H]`` (natural log) -> ``[num_rows, H, D]``
    float32, as ``engine.attention.reference.merge_states``."""
    if o.dim() != 3 or lse.dim() != 2 or tuple(lse.shape) != tuple(o.shape[:2]):
        raise ValueError(f"o must be [E, H, D] and lse [E, H]; got {tuple(o.shape)} and "
                         f"{tuple(lse.shape)}.")
    C.check_device("o", o)
    C.check_device("lse", lse, o.device)
    C.check_float("o", o)
    if lse.dtype != torch.float32:
        raise ValueError(f"lse has dtype {lse.dtype}; it must be float32.")
    C.check_last_dim_contiguous("o", o)
    C.check_index("merge_indptr", merge_indptr, device=o.device)
    C.check_index("merge_entries", merge_entries, device=o.device)
    if not isinstance(num_rows, int) or num_rows < 0 or merge_indptr.numel() != num_rows + 1:
        raise ValueError(f"merge_indptr has {merge_indptr.numel()} entries; expected num_rows + 1 "
                         f"= {num_rows + 1 if isinstance(num_rows, int) else num_rows}.")
    out = torch.empty(num_rows, o.shape[1], o.shape[2], dtype=torch.float32, device=o.device)
    launch_merge(o, lse, merge_indptr, merge_entries, out)
    return out
