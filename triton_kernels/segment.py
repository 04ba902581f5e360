"""Segment attention over a paged KV cache, in Triton (semantics: engine/attention/plan.py).

Kernel: one program per (work item, kv head). A work item is a block of entries of
one job and one chunk of the job's segment (``work.py``). The program loads the
queries of every entry in the block and every query head of its kv head as one
tile of rows ``i -> (entry e0 + i // GROUP, head kvh * GROUP + i % GROUP)``, so each
K/V tile is read once for all of them, and runs an online softmax over the chunk
with ``tl.dot``. Head dims are handled as two halves (the RoPE pairs (i, i + D/2)),
each padded to a power of two >= 16 with masks (D = 80 -> 2 x 64): a row's query is
rotated by ``-shift * inv_freq`` in registers before the loop when the plan has
shifts. Causal limits are per row; the loop stops at the block's largest limit.

Each program writes the normalised partial state (o, lse) of its rows, which
``merge.py`` combines per row; when every row has exactly one entry and no split,
it writes the final output directly instead.
"""
from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from engine.attention.plan import AttentionPlan

from . import _common as C
from .merge import launch_merge
from .work import WorkPlan, build_work, cached_work

_LOG2E = 1.0 / math.log(2.0)


def _configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 1), (32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2),
                             (128, 4, 3))]


@C.maybe_autotune(_configs(), key=["HALF_PAD", "GROUP", "BLOCK_Q", "IS_FP32", "DIRECT"])
@triton.jit
def _segment_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, o_part_ptr, lse_part_ptr,
    items_ptr, kv_indptr_ptr, kv_pages_ptr, q_rows_ptr, shift_ptr, limit_ptr, state_off_ptr,
    inv_freq_ptr,
    qk_scale,                       # softmax scale * log2(e): the loop works in base 2
    page_size,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_pt, stride_ph,           # o_part [S, Hq, D]
    stride_lt, stride_lh,           # lse_part [S, Hq]
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SHIFT: tl.constexpr, DIRECT: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
):
    wid = tl.program_id(0)
    kvh = tl.program_id(1)
    item = items_ptr + wid * 6
    job = tl.load(item)
    e0 = tl.load(item + 1)
    e1 = tl.load(item + 2)
    kv_lo = tl.load(item + 3)
    kv_hi = tl.load(item + 4)
    split = tl.load(item + 5)

    # rows of the tile: (entry, query head) pairs of this kv head
    i = tl.arange(0, BLOCK_Q)
    ent = e0 + i // GROUP
    valid = ent < e1
    head = kvh * GROUP + i % GROUP
    row = tl.load(q_rows_ptr + ent, mask=valid, other=0)
    limit = tl.load(limit_ptr + ent, mask=valid, other=0)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    qmask = valid[:, None] & dmask[None, :]

    # q halves: [BLOCK_Q, HALF_PAD]
    q_off = row.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF, mask=qmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        # the query at home position p, used at p - shift: rotate by -shift * inv_freq
        sh = tl.load(shift_ptr + ent, mask=valid, other=0).to(tl.float32)
        freq = tl.load(inv_freq_ptr + d, mask=dmask, other=0.0)
        ang = (-sh)[:, None] * freq[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
        q1, q2 = q1 * c - q2 * s, q2 * c + q1 * s
    if UPCAST:
        dot_ty = tl.float32
    else:
        dot_ty = k_ptr.dtype.element_ty
    q1 = q1.to(dot_ty)
    q2 = q2.to(dot_ty)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc1 = tl.zeros([BLOCK_Q, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_Q, HALF_PAD], tl.float32)
    page_base = tl.load(kv_indptr_ptr + job)
    hi = tl.minimum(kv_hi, tl.max(limit, axis=0))
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, hi, BLOCK_N):
        n = start + offs_n
        nmask = n < hi
        page = tl.load(kv_pages_ptr + page_base + n // page_size, mask=nmask, other=0)
        slot = n % page_size
        k_tok = page.to(tl.int64) * stride_kp + slot * stride_ks + kvh * stride_kh   # [BLOCK_N]
        v_tok = page.to(tl.int64) * stride_vp + slot * stride_vs + kvh * stride_vh
        kmask = dmask[:, None] & nmask[None, :]
        # K^T halves: [HALF_PAD, BLOCK_N]
        kt1 = tl.load(k_ptr + k_tok[None, :] + d[:, None], mask=kmask, other=0.0).to(dot_ty)
        kt2 = tl.load(k_ptr + k_tok[None, :] + HALF + d[:, None], mask=kmask, other=0.0).to(dot_ty)
        if IS_FP32:
            sc = tl.dot(q1, kt1, input_precision="ieee")
            sc = tl.dot(q2, kt2, sc, input_precision="ieee")
        else:
            sc = tl.dot(q1, kt1)
            sc = tl.dot(q2, kt2, sc)
        sc = sc * qk_scale
        see = (n[None, :] < limit[:, None]) & nmask[None, :]
        sc = tl.where(see, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        # rows that have seen no key yet keep m = -inf; exponentiate against 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vmask = nmask[:, None] & dmask[None, :]
        # V halves: [BLOCK_N, HALF_PAD]
        v1 = tl.load(v_ptr + v_tok[:, None] + d[None, :], mask=vmask, other=0.0).to(dot_ty)
        v2 = tl.load(v_ptr + v_tok[:, None] + HALF + d[None, :], mask=vmask, other=0.0).to(dot_ty)
        pv = p.to(dot_ty)
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        if IS_FP32:
            acc1 = tl.dot(pv, v1, acc1, input_precision="ieee")
            acc2 = tl.dot(pv, v2, acc2, input_precision="ieee")
        else:
            acc1 = tl.dot(pv, v1, acc1)
            acc2 = tl.dot(pv, v2, acc2)
        m_i = m_new

    seen = l_i > 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    o1 = acc1 * inv_l[:, None]
    o2 = acc2 * inv_l[:, None]
    if DIRECT:
        o_off = row.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, o1.to(out_ptr.dtype.element_ty), mask=qmask)
        tl.store(out_ptr + o_off + HALF, o2.to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        st = (tl.load(state_off_ptr + ent, mask=valid, other=0) + split).to(tl.int64)
        p_off = st[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(o_part_ptr + p_off, o1, mask=qmask)
        tl.store(o_part_ptr + p_off + HALF, o2, mask=qmask)
        tl.store(lse_part_ptr + st * stride_lt + head * stride_lh, lse, mask=valid)


_PLAN_INDEX = ("kv_indptr", "kv_page_ids", "kv_len", "q_indptr", "q_rows", "shift", "causal_limit",
               "merge_indptr", "merge_entries")
_plan_index = operator.attrgetter(*_PLAN_INDEX)


def _check_layer(q, k_pool, v_pool):
    """What each layer brings (q, its pools): metadata only, checked on every call."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}.")
    C.check_pools(k_pool, v_pool, q.device, q.dtype)
    C.check_device("q", q)
    C.check_float("q", q)
    C.check_last_dim_contiguous("q", q)
    T, Hq, D = q.shape
    Hkv = k_pool.shape[2]
    if k_pool.shape[3] != D:
        raise ValueError(f"head_dim of q ({D}) and of the KV pool ({k_pool.shape[3]}) differ.")
    if D % 2:
        raise ValueError(f"head_dim={D} must be even (RoPE pairs dims i and i + D/2).")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads.")
    return T, Hq, D, Hkv


def _check_step(plan: AttentionPlan, inv_freq, T: int, D: int, device: torch.device) -> torch.Tensor:
    """What is the same for every layer of a step: the plan's index tensors (against q's
    rows and device) and inv_freq, returned as the kernel reads it. Checked once per plan
    (rows, head dim, device, inv_freq) and remembered on the plan, as its work split is; a
    plan whose tensors were replaced since is checked again."""
    tensors = _plan_index(plan)
    seen = plan.__dict__.get("_triton_checked")
    if seen is not None and seen[0] == (T, D, device) and seen[1] is inv_freq \
            and all(map(operator.is_, seen[2], tensors)):
        return seen[3]
    for f, t in zip(_PLAN_INDEX, tensors):
        C.check_index(f"plan.{f}", t, device=device)
    if plan.merge_indptr.numel() != T + 1:
        raise ValueError(f"plan.merge_indptr has {plan.merge_indptr.numel()} entries but q has "
                         f"{T} rows (expected T + 1); was the plan built for this step?")
    inv = C.check_inv_freq(inv_freq, D, device)
    if inv is inv_freq:  # (a converted copy is not kept: inv_freq could change in place)
        plan.__dict__["_triton_checked"] = ((T, D, device), inv_freq, tensors, inv)
    return inv


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: enough to exercise the split path on long segments


def segment_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      plan: AttentionPlan, inv_freq: torch.Tensor, scale: float,
                      kv_chunk: int | None = None) -> torch.Tensor:
    """q [T, Hq, D] (rotated at home positions); k_pool, v_pool [N, page_size, Hkv, D]
    -> o [T, Hq, D] in q's dtype. ``kv_chunk`` forces split-K/V chunks of that many
    tokens (default: segments longer than a fair share of the step's work per program
    are split, see ``work.build_work``)."""
    T, Hq, D, Hkv = _check_layer(q, k_pool, v_pool)
    inv_freq = _check_step(plan, inv_freq, T, D, q.device)
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale={scale!r} must be a positive float.")
    group, half = Hq // Hkv, D // 2
    half_pad = max(16, C.next_pow2(half))
    fp32 = q.dtype == torch.float32
    work: WorkPlan = cached_work(
        plan, (Hkv, group, half_pad, kv_chunk, q.device, fp32),
        lambda: build_work(plan, Hkv, group, half_pad, _target_programs(q.device), kv_chunk, fp32))
    out = (torch.zeros if work.direct else torch.empty)(T, Hq, D, dtype=q.dtype, device=q.device)
    if work.direct:
        o_part, lse_part = out, out.new_empty(1, Hq, dtype=torch.float32)  # unused
    else:
        o_part = torch.empty(max(work.num_states, 1), Hq, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(max(work.num_states, 1), Hq, dtype=torch.float32, device=q.device)
    # (whole stride tuples: a stride(i) call parses its argument, ~2x the time)
    sq, sk, sv, so, sp, sl = (t.stride() for t in (q, k_pool, v_pool, out, o_part, lse_part))
    with C.device_guard(q.device):
        for wc in work.classes:
            extra = {} if C.autotuned() else {"BLOCK_N": 32, "num_warps": 4}
            _segment_attn_kernel[(wc.num_items, Hkv)](
                q, k_pool, v_pool, out, o_part, lse_part,
                wc.items, plan.kv_indptr, plan.kv_page_ids, plan.q_rows, plan.shift, plan.causal_limit,
                work.state_off, inv_freq,
                float(scale) * _LOG2E, k_pool.shape[1],
                sq[0], sq[1],
                sk[0], sk[1], sk[2],
                sv[0], sv[1], sv[2],
                so[0], so[1],
                sp[0], sp[1],
                sl[0], sl[1],
                HALF=half, HALF_PAD=half_pad, GROUP=group, BLOCK_Q=wc.block_q,
                HAS_SHIFT=work.has_shift, DIRECT=work.direct, IS_FP32=q.dtype == torch.float32,
                UPCAST=C.INTERPRET and q.dtype == torch.bfloat16, **extra)
    if work.direct:
        return out
    launch_merge(o_part, lse_part, plan.merge_indptr, plan.merge_entries, out,
                 work.state_off, work.nsplit)
    return out
