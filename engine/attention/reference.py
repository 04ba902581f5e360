"""The ``torch`` backend: a plain PyTorch segment attention, the oracle for
every other backend (see ``plan.py`` for the semantics)."""
from __future__ import annotations

import math

import torch

from .plan import AttentionPlan


def rotate_by(x: torch.Tensor, angle_pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [R, H, D]`` (rotate-half RoPE) by positions ``angle_pos [R]``."""
    # freqs: [R, D/2]
    freqs = angle_pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def merge_states(o: torch.Tensor, lse: torch.Tensor, merge_indptr: torch.Tensor,
                 merge_entries: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Log-sum-exp merge of partial states ``o [E, H, D]``, ``lse [E, H]`` (natural
    log) into ``[num_rows, H, D]``; rows with no finite state get zeros."""
    E, H, D = o.shape
    out = torch.zeros(num_rows, H, D, dtype=torch.float32, device=o.device)
    if E == 0:
        return out
    counts = (merge_indptr[1:] - merge_indptr[:-1]).long()
    row_of_slot = torch.repeat_interleave(torch.arange(num_rows, device=o.device), counts)
    ent = merge_entries.long()
    o_e, lse_e = o[ent], lse[ent]  # gathered in merge order
    m = torch.full((num_rows, H), -math.inf, device=o.device)
    m = m.scatter_reduce(0, row_of_slot[:, None].expand(-1, H), lse_e, reduce="amax")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_e - m_safe[row_of_slot])  # [E, H]; exp(-inf) = 0
    denom = torch.zeros(num_rows, H, device=o.device).index_add_(0, row_of_slot, w)
    out.index_add_(0, row_of_slot, o_e * w[..., None])
    return torch.where(denom[..., None] > 0, out / denom.clamp_min(1e-30)[..., None], out)


def partial_states(q, k_pool, v_pool, plan: AttentionPlan, inv_freq, scale: float):
    """Per-entry partial states: o [E, Hq, D] float32 and lse [E, Hq] float32."""
    T, Hq, D = q.shape
    Hkv = k_pool.shape[2]
    group = Hq // Hkv
    E = plan.num_entries
    o = torch.zeros(E, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((E, Hq), -math.inf, dtype=torch.float32, device=q.device)
    kv_indptr = plan.kv_indptr.tolist()
    q_indptr = plan.q_indptr.tolist()
    kv_len = plan.kv_len.tolist()
    for j in range(plan.num_jobs):
        e0, e1 = q_indptr[j], q_indptr[j + 1]
        L = kv_len[j]
        if e1 == e0 or L == 0:
            continue
        pages = plan.kv_page_ids[kv_indptr[j]:kv_indptr[j + 1]].long()
        k = k_pool[pages].reshape(-1, Hkv, D)[:L].float()  # [L, Hkv, D]
        v = v_pool[pages].reshape(-1, Hkv, D)[:L].float()
        rows = plan.q_rows[e0:e1].long()
        qj = q[rows].float()  # [R, Hq, D]
        shift = plan.shift[e0:e1]
        if bool((shift != 0).any()):
            qj = rotate_by(qj, -shift, inv_freq)
        # scores: [Hkv, R*group, L]
        qg = qj.reshape(-1, Hkv, group, D).permute(1, 0, 2, 3).reshape(Hkv, -1, D)
        s = torch.matmul(qg, k.permute(1, 2, 0)) * scale
        lim = plan.causal_limit[e0:e1].long()
        mask = torch.arange(L, device=q.device)[None, :] >= lim[:, None]  # [R, L]
        mask = mask.repeat_interleave(group, dim=0)[None]  # [1, R*group, L]
        s = s.masked_fill(mask, -math.inf)
        l = torch.logsumexp(s, dim=-1)  # [Hkv, R*group]
        p = torch.exp(s - torch.where(torch.isfinite(l), l, torch.zeros_like(l))[..., None])
        oj = torch.matmul(p, v.permute(1, 0, 2))  # [Hkv, R*group, D]
        o[e0:e1] = oj.reshape(Hkv, -1, group, D).permute(1, 0, 2, 3).reshape(-1, Hq, D)
        lse[e0:e1] = l.reshape(Hkv, -1, group).permute(1, 0, 2).reshape(-1, Hq)
    return o, lse


def segment_attention_torch(q, k_pool, v_pool, plan: AttentionPlan, inv_freq,
                            scale: float) -> torch.Tensor:
    """q [T, Hq, D]; k_pool, v_pool [N, page_size, Hkv, D] -> o [T, Hq, D] (q's dtype)."""
    o, lse = partial_states(q, k_pool, v_pool, plan, inv_freq, scale)
    out = merge_states(o, lse, plan.merge_indptr, plan.merge_entries, q.shape[0])
    return out.to(q.dtype)
