"""Write new K/V into their pages, optionally applying RoPE to K on the way.

``slots[t] = page * page_size + offset`` (int64) says where token t goes; a
negative slot skips the token (padding), and so does one past the pool (the kernel
never writes outside it; the host cannot check device slots without a sync). With RoPE, K is rotated at its home
position ``positions[t]`` (rotate-half convention, pairs (i, i + D/2)), with the
angles either looked up in cos/sin tables ``[max_pos, D/2]`` (as ``engine.rope.Rotary``
keeps them) or computed from ``inv_freq [D/2]`` in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

_NO_ROPE, _ROPE_TABLE, _ROPE_FREQ = 0, 1, 2


@triton.jit
def _rope_append_kernel(
    k_ptr, v_ptr, kp_ptr, vp_ptr, slots_ptr, pos_ptr, cos_ptr, sin_ptr, inv_freq_ptr,
    H, page_size, num_slots, max_pos,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
    stride_cos, stride_sin,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, ROPE: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF_PAD)
    slot = tl.load(slots_ptr + t).to(tl.int64)  # int64 addressing: pools can pass 2^31 elements
    # (slot compared as a block: the interpreter mis-types scalar-bool & block-bool)
    slot_b = tl.zeros([BLOCK_H], tl.int64) + slot
    keep = (slot_b >= 0) & (slot_b < num_slots)
    mask = ((h < H) & keep)[:, None] & (d < HALF)[None, :]
    slot = tl.maximum(slot, 0)
    page = slot // page_size
    off = slot % page_size
    src_k = t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst_k = page * stride_kpp + off * stride_kps + h[:, None] * stride_kph + d[None, :]
    dst_v = page * stride_vpp + off * stride_vps + h[:, None] * stride_vph + d[None, :]
    k1 = tl.load(k_ptr + src_k, mask=mask, other=0.0)
    k2 = tl.load(k_ptr + src_k + HALF, mask=mask, other=0.0)
    if ROPE != 0:
        dm = d < HALF
        if ROPE == 1:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)  # (never read outside the tables)
            c = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + pos * stride_sin + d, mask=dm, other=0.0).to(tl.float32)
        else:
            pos = tl.load(pos_ptr + t).to(tl.float32)
            ang = pos * tl.load(inv_freq_ptr + d, mask=dm, other=0.0)
            c = tl.cos(ang)
            s = tl.sin(ang)
        k1f = k1.to(tl.float32)
        k2f = k2.to(tl.float32)
        k1 = k1f * c[None, :] - k2f * s[None, :]
        k2 = k2f * c[None, :] + k1f * s[None, :]
    ty = kp_ptr.dtype.element_ty
    tl.store(kp_ptr + dst_k, k1.to(ty), mask=mask)
    tl.store(kp_ptr + dst_k + HALF, k2.to(ty), mask=mask)
    v1 = tl.load(v_ptr + src_v, mask=mask, other=0.0)
    v2 = tl.load(v_ptr + src_v + HALF, mask=mask, other=0.0)
    tl.store(vp_ptr + dst_v, v1.to(vp_ptr.dtype.element_ty), mask=mask)
    tl.store(vp_ptr + dst_v + HALF, v2.to(vp_ptr.dtype.element_ty), mask=mask)


def _check(k_pool, v_pool, k, v, slots):
    dev = k_pool.device
    C.check_pools(k_pool, v_pool, dev, k_pool.dtype)
    _, _, H, D = k_pool.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (H, D):
            raise ValueError(f"{name} must be [T, {H}, {D}] to match the pool, got {tuple(t.shape)}.")
        C.check_device(name, t, dev)
        C.check_float(name, t)
        C.check_last_dim_contiguous(name, t)
    T = k.shape[0]
    if T != v.shape[0]:
        raise ValueError(f"k has {T} tokens but v has {v.shape[0]}.")
    C.check_index("slots", slots, dtypes=(torch.int64, torch.int32), device=dev)
    if slots.numel() != T:
        raise ValueError(f"slots has {slots.numel()} entries for {T} tokens.")
    num_slots = k_pool.shape[0] * k_pool.shape[1]
    if T and slots.is_cpu and int(slots.max()) >= num_slots:
        # (host tensors only: a device check would sync; there the kernel skips such slots)
        raise ValueError(f"slot {int(slots.max())} is outside the pool's {num_slots} slots.")
    if D % 2:
        raise ValueError(f"head_dim={D} must be even.")
    return T, H, D


def _launch(k_pool, v_pool, k, v, slots, positions, cos, sin, inv_freq, rope: int):
    T, H, D = k.shape
    if T == 0:
        return
    half = D // 2
    half_pad = C.next_pow2(half)
    block_h = min(C.next_pow2(H), max(1, 2048 // half_pad))
    dummy = slots
    ks, vs, kps, vps = k.stride(), v.stride(), k_pool.stride(), v_pool.stride()  # (stride(i): ~2x the time)
    with C.device_guard(k_pool.device):
        _rope_append_kernel[(T, C.cdiv(H, block_h))](
            k, v, k_pool, v_pool, slots,
            positions if positions is not None else dummy,
            cos if cos is not None else dummy, sin if sin is not None else dummy,
            inv_freq if inv_freq is not None else dummy,
            H, k_pool.shape[1], k_pool.shape[0] * k_pool.shape[1], cos.shape[0] if cos is not None else 1,
            ks[0], ks[1], vs[0], vs[1],
            kps[0], kps[1], kps[2],
            vps[0], vps[1], vps[2],
            cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
            HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h, ROPE=rope, num_warps=4)


def append_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] (already rotated) into the pools [N, page_size, Hkv, D] at
    ``slots [T]`` — the model's ``append_kv`` signature."""
    _check(k_pool, v_pool, k, v, slots)
    _launch(k_pool, v_pool, k, v, slots, None, None, None, None, _NO_ROPE)


def rope_append(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None) -> None:
    """Rotate k [T, Hkv, D] at ``positions [T]`` and write k, v into their pages.

    Give either ``cos``/``sin`` tables [max_pos, D/2] (any float dtype; indexed by
    position) or ``inv_freq [D/2]``.
    """
    T, H, D = _check(k_pool, v_pool, k, v, slots)
    C.check_index("positions", positions, dtypes=(torch.int64, torch.int32), device=k_pool.device)
    if positions.numel() != T:
        raise ValueError(f"positions has {positions.numel()} entries for {T} tokens.")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin tables, or neither (and inv_freq).")
    if cos is not None:
        if inv_freq is not None:
            raise ValueError("pass cos/sin tables or inv_freq, not both.")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 2 or t.shape[1] != D // 2:
                raise ValueError(f"{name} must be a table [max_pos, D/2 = {D // 2}], got {tuple(t.shape)}.")
            C.check_device(name, t, k_pool.device)
            C.check_float(name, t)
            C.check_last_dim_contiguous(name, t)
        # (checked on the host only: on a GPU this would sync every layer; there the
        # kernel clamps positions into the tables)
        if T and positions.device.type == "cpu":
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= cos.shape[0]:
                raise ValueError(f"positions {lo} .. {hi} are outside the cos/sin tables "
                                 f"({cos.shape[0]} positions); extend the tables.")
        _launch(k_pool, v_pool, k, v, slots, positions, cos, sin, None, _ROPE_TABLE)
    else:
        if inv_freq is None:
            raise ValueError("rope_append needs cos/sin tables or inv_freq.")
        inv_freq = C.check_inv_freq(inv_freq, D, k_pool.device)
        _launch(k_pool, v_pool, k, v, slots, positions, None, None, inv_freq, _ROPE_FREQ)
