"""Triton kernels against the PyTorch reference (engine/attention/reference.py).

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported); with one they are
compiled and run on the GPU. Interpreted programs cost ~1 ms each, so the cases are
small but cover every axis: odd sizes, page sizes 1 and 16, GQA 1/3/4, head dims
64/80/128, float32/float16 (bfloat16 only on a GPU: the interpreter's tl.dot gets
it wrong, see test_bfloat16_interpreter_upcast), positive and negative shifts,
causal limits, several segments per view, empty segments, rows with no keys,
forced and automatic split-K/V.
"""
from __future__ import annotations

import math
import os
import random
import sys
import types

import pytest
import torch

import _triton_env  # noqa: E402,F401  (TRITON_INTERPRET=1 without CUDA, before triton is imported)

import triton_kernels as tk  # noqa: E402
from triton_kernels import segment as S, work as W  # noqa: E402
from engine.attention.plan import ThreadStep, build_plan_py  # noqa: E402
from engine.attention import reference as R  # noqa: E402
from conftest import i32  # noqa: E402

DEVICE = torch.device("cpu" if tk.INTERPRET else "cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or tk.INTERPRET,
                               reason="needs a CUDA device (real Triton compilation)")
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def inv_freq_of(D: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def random_case(seed: int, Hq: int, Hkv: int, D: int, ps: int, dtype, shifts: bool = True,
                threads: int = 3, prompt: int | None = None, new: tuple = (1, 1, 3, 5)):
    """A step of ``threads`` threads over a random segment tree: a shared prompt, a shared
    middle segment for some, optional empty segment, own segments with 1..5 new rows;
    views with random positive/negative shifts. Pages are shuffled over a pool."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    seg_len = {0: prompt if prompt is not None else rnd.randint(17, 45), 1: rnd.randint(3, 19), 2: 0}
    views, steps = [], []
    for t in range(threads):
        own = 10 + t
        n = rnd.choice(new)
        seg_len[own] = n + rnd.randint(0, 9)
        sh = (lambda: rnd.choice([0, rnd.randint(-40, -1), rnd.randint(1, 300)])) if shifts else (lambda: 0)
        view = [(0, sh())]
        if rnd.random() < 0.6:
            view.append((1, sh()))
        if rnd.random() < 0.3:
            view.append((2, 0))  # an empty segment: contributes nothing
        view.append((own, sh() if rnd.random() < 0.3 else 0))
        rnd.shuffle(view)  # view order must not matter
        steps.append(ThreadStep(view, own, n))
    npages = {s: -(-L // ps) for s, L in seg_len.items()}
    total = sum(npages.values()) + 3
    perm = torch.randperm(total, generator=g).tolist()
    seg_pages, at = {}, 0
    for s in seg_len:
        seg_pages[s] = perm[at:at + npages[s]]
        at += npages[s]
    plan = build_plan_py(steps, seg_len, seg_pages)
    k_pool = torch.randn(total, ps, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(total, ps, Hkv, D, generator=g).to(dtype)
    q = torch.randn(plan.num_rows, Hq, D, generator=g).to(dtype)
    return q, k_pool, v_pool, plan


def check_attention(q, k_pool, v_pool, plan, D, scale=None, **kw):
    scale = scale if scale is not None else D ** -0.5
    inv = inv_freq_of(D)
    ref = R.segment_attention_torch(q, k_pool, v_pool, plan, inv, scale)
    dev = DEVICE
    out = tk.segment_attention(q.to(dev), k_pool.to(dev), v_pool.to(dev), plan.to(dev),
                               inv.to(dev), scale, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=tol, rtol=tol)
    return out


# ---- segment attention -------------------------------------------------------------------------

CASES = [  # seed, Hq, Hkv, D, page_size, dtype
    (0, 4, 4, 64, 16, torch.float32),    # GQA 1
    (1, 8, 2, 64, 1, torch.float32),     # GQA 4, page size 1
    (2, 6, 2, 80, 16, torch.float32),    # GQA 3, head dim 80 padded to 2 x 64
    (3, 4, 1, 128, 16, torch.float32),   # MQA-like GQA 4, head dim 128
    (4, 4, 4, 128, 1, torch.float16),
    (5, 8, 2, 64, 16, torch.float16),
    (6, 2, 2, 16, 16, torch.float32),    # head dim 16: halves of 8 padded to 16
]


@pytest.mark.parametrize("seed,Hq,Hkv,D,ps,dtype", CASES)
def test_segment_attention_matches_reference(seed, Hq, Hkv, D, ps, dtype):
    q, k_pool, v_pool, plan = random_case(seed, Hq, Hkv, D, ps, dtype)
    check_attention(q, k_pool, v_pool, plan, D)


@pytest.mark.parametrize("seed,Hq,Hkv,D,ps,dtype,chunk", [
    (10, 4, 2, 64, 16, torch.float32, 16),
    (11, 8, 2, 128, 1, torch.float16, 7),   # chunk not a multiple of the page or BLOCK_N
])
def test_forced_split_kv(seed, Hq, Hkv, D, ps, dtype, chunk):
    q, k_pool, v_pool, plan = random_case(seed, Hq, Hkv, D, ps, dtype, prompt=70)
    work = W.build_work(plan, Hkv, Hq // Hkv, 64, target_programs=1, kv_chunk=chunk)
    assert int(work.nsplit.max()) == -(-70 // chunk) and not work.direct
    check_attention(q, k_pool, v_pool, plan, D, kv_chunk=chunk)


def test_decode_long_prompt_auto_split(monkeypatch):
    """Decode rows (one per thread) reading one long shared prompt: too few programs for
    the device (2 x SMs on a GPU; pretend 64 here), so the heuristic splits the prompt."""
    Hq, Hkv, D, ps, P = 4, 2, 64, 16, 600
    q, k_pool, v_pool, plan = random_case(20, Hq, Hkv, D, ps, torch.float32, shifts=False,
                                          threads=4, prompt=P, new=(1,))
    work = W.build_work(plan, Hkv, Hq // Hkv, 32, target_programs=64)
    assert plan.kv_len[0] == P
    assert int(work.nsplit.max()) == -(-P // W.MIN_CHUNK), "the 600-token prompt should be split"
    monkeypatch.setattr(S, "_target_programs", lambda device: 64)
    check_attention(q, k_pool, v_pool, plan, D)


def test_prefill_causal_direct_and_tile_boundaries():
    """One thread prefilling 37 tokens (more than one 32-entry tile of GQA 2): the plain
    causal case, written directly without a merge."""
    Hq, Hkv, D, ps, n = 4, 2, 64, 16, 37
    g = torch.Generator().manual_seed(3)
    plan = build_plan_py([ThreadStep([(0, 0)], 0, n)], {0: n}, {0: [2, 0, 1]})
    work = W.build_work(plan, Hkv, Hq // Hkv, 32, target_programs=1)
    assert work.direct and not work.has_shift
    q = torch.randn(n, Hq, D, generator=g)
    k_pool, v_pool = torch.randn(2, 3, ps, Hkv, D, generator=g)
    check_attention(q, k_pool, v_pool, plan, D)


def test_rows_without_keys_and_empty_jobs():
    """A thread whose view is empty gets zeros; a job over an empty segment is skipped."""
    Hq, Hkv, D, ps = 4, 2, 64, 16
    g = torch.Generator().manual_seed(4)
    steps = [ThreadStep([], 5, 2), ThreadStep([(1, 0), (0, 3)], 0, 1), ThreadStep([(1, 0)], 1, 0)]
    plan = build_plan_py(steps, {0: 5, 1: 0, 5: 2}, {0: [1], 1: [], 5: [0]})
    q = torch.randn(plan.num_rows, Hq, D, generator=g)
    k_pool, v_pool = torch.randn(2, 2, ps, Hkv, D, generator=g)
    out = check_attention(q, k_pool, v_pool, plan, D)
    assert bool((out[:2] == 0).all())


def test_scale_and_large_shift_float32():
    q, k_pool, v_pool, plan = random_case(30, 4, 2, 64, 16, torch.float32)
    plan.shift = torch.where(plan.shift != 0, plan.shift * 37, plan.shift)  # shifts up to ~1e4
    plan.has_shift = True
    check_attention(q * 3, k_pool, v_pool, plan, 64, scale=0.3)


def test_bfloat16_interpreter_upcast():
    """bfloat16 inputs: compiled kernels use bf16 tl.dot; the interpreter's bf16 dot is
    wrong, so the launcher upcasts to float32 there. Either way: matches the oracle."""
    q, k_pool, v_pool, plan = random_case(40, 4, 2, 64, 16, torch.bfloat16)
    check_attention(q, k_pool, v_pool, plan, 64)


def test_plan_is_reused_across_layers():
    q, k_pool, v_pool, plan = random_case(41, 4, 2, 64, 16, torch.float32)
    plan = plan.to(DEVICE)
    inv = inv_freq_of(64).to(DEVICE)
    a = tk.segment_attention(q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan, inv, 0.125)
    assert len(plan.__dict__["_triton_work"]) == 1
    b = tk.segment_attention((2 * q).to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan, inv, 0.125)
    assert len(plan.__dict__["_triton_work"]) == 1  # one host sync per plan, not per layer
    assert not torch.equal(a, b)


def test_plan_checks_run_once_per_plan(monkeypatch):
    """What is the same for every layer of a step (the plan's index tensors against q's rows
    and device, inv_freq) is checked on the plan's first call, not on every layer's; q with
    other rows, another inv_freq or a plan tensor replaced since is checked again."""
    from triton_kernels import _common as Cm
    checked = []
    real = Cm.check_index
    monkeypatch.setattr(Cm, "check_index", lambda name, *a, **kw: (checked.append(name), real(name, *a, **kw)))
    q, k_pool, v_pool, plan = random_case(87, 4, 2, 64, 16, torch.float32, threads=2)
    q, k_pool, v_pool, plan = q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan.to(DEVICE)
    inv = inv_freq_of(64).to(DEVICE)
    a = tk.segment_attention(q, k_pool, v_pool, plan, inv, 0.125)
    assert len(checked) == 9
    b = tk.segment_attention(q, k_pool.clone(), v_pool.clone(), plan, inv, 0.125)  # the next layer
    assert len(checked) == 9 and torch.equal(a, b)
    with pytest.raises(ValueError, match="rows"):
        tk.segment_attention(q[:-1], k_pool, v_pool, plan, inv, 0.125)
    with pytest.raises(ValueError, match="inv_freq"):
        tk.segment_attention(q, k_pool, v_pool, plan, inv[:5], 0.125)
    plan.q_rows = plan.q_rows.long()
    with pytest.raises(ValueError, match="q_rows"):
        tk.segment_attention(q, k_pool, v_pool, plan, inv, 0.125)
    with pytest.raises(ValueError, match="support CUDA"):
        Cm.check_device("x", torch.empty(1, device="meta"))


# ---- work decomposition (host side) -------------------------------------------------------------

def test_build_work_items_cover_every_entry_once():
    _, _, _, plan = random_case(50, 8, 2, 64, 16, torch.float32, threads=5, prompt=1000)
    for target, chunk in ((1, None), (10_000, None), (1, 100)):
        work = W.build_work(plan, 2, 4, 32, target_programs=target, kv_chunk=chunk)
        covered = torch.zeros(plan.num_entries, dtype=torch.int64)
        for wc in work.classes:
            it = wc.items.long()
            assert bool((it[:, 2] - it[:, 1] <= wc.epb).all()) and wc.block_q >= 16
            for job, e0, e1, lo, hi, s in it.tolist():
                assert plan.q_indptr[job] <= e0 < e1 <= plan.q_indptr[job + 1]
                assert 0 <= lo < hi <= plan.kv_len[job]
                covered[e0:e1] += hi - lo
        live = (plan.kv_len > 0).long()
        per_entry = torch.repeat_interleave(plan.kv_len.long() * live,
                                            (plan.q_indptr[1:] - plan.q_indptr[:-1]).long())
        assert torch.equal(covered, per_entry)  # every key of every entry, exactly once
        if target == 10_000:
            assert int(work.nsplit.max()) == -(-1000 // W.MIN_CHUNK)
            for wc in work.classes:  # prompt chunks (job 0) but the last: multiples of CHUNK_ALIGN
                it = wc.items[(plan.kv_len[wc.items[:, 0].long()] == 1000) & (wc.items[:, 4] < 1000)]
                assert bool(((it[:, 4] - it[:, 3]) % W.CHUNK_ALIGN == 0).all())


def test_work_and_flash_layout_read_the_host_plan():
    """On a GPU the step's plan is copied to the device; the work split and the flash
    layout are host decisions and read the plan it was copied from (reading the device
    copy back cost a copy and a wait for the step's queued work, every step). 'meta'
    stands in for the GPU: its tensors cannot be read back at all."""
    _, _, _, plan = random_case(52, 8, 2, 64, 16, torch.float32, threads=3, prompt=100)
    dev = plan.to("meta")
    assert dev.host() is plan and plan.host() is plan
    want = W.build_work(plan, 2, 4, 32, target_programs=4)
    got = W.build_work(dev, 2, 4, 32, target_programs=4)
    assert [(c.block_q, tuple(c.items.shape)) for c in got.classes] == \
        [(c.block_q, tuple(c.items.shape)) for c in want.classes]
    assert got.classes[0].items.device.type == "meta" and got.num_states == want.num_states
    tk.prefill_layout(dev, 16)  # (None here: not a plain prefill; it must not read the device)
    import copy
    assert dev.to("meta").host() is plan            # (carried over device-to-device copies)
    dup = copy.copy(dev)                             # (a copy may get other tensors: no caches)
    assert "_host_plan" not in dup.__dict__ and "_triton_work" not in dup.__dict__


def test_block_q_sizes_are_dot_friendly():
    for group in (1, 2, 3, 4, 7, 8, 16, 32):
        for half_pad in (16, 32, 64, 128):
            for fp32 in (False, True):
                small, large = W.block_q_sizes(group, half_pad, fp32)
                assert small >= 16 and large >= small and small // group >= 1
                assert small & (small - 1) == 0 and large & (large - 1) == 0
                assert large == small or not (fp32 and half_pad >= 128)  # (T4's shared memory)


# ---- merge ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,D", [(3, 64), (8, 80)])
def test_merge_states_matches_reference(H, D):
    g = torch.Generator().manual_seed(H)
    E, T = 11, 6
    o = torch.randn(E, H, D, generator=g)
    lse = torch.randn(E, H, generator=g) * 4
    lse[2] = -math.inf          # a state that saw nothing
    o[2] = float("nan")         # ... whose o must never be read
    counts = [3, 0, 1, 4, 2, 1]  # row 1 merges nothing -> zeros
    perm = torch.randperm(E, generator=g)
    indptr = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    entries = perm.to(torch.int32)
    ref = R.merge_states(o.nan_to_num(0.0), lse, indptr, entries, T)
    out = tk.merge_states(o.to(DEVICE), lse.to(DEVICE), indptr.to(DEVICE), entries.to(DEVICE), T)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    assert bool((out[1] == 0).all())


# ---- K/V append -----------------------------------------------------------------------------------

@pytest.mark.parametrize("D,ps,dtype,mode", [
    (64, 16, torch.float32, "table"), (80, 1, torch.float16, "freq"),
    (128, 16, torch.float16, "table"), (64, 1, torch.float32, "freq"),
])
def test_rope_append(D, ps, dtype, mode):
    g = torch.Generator().manual_seed(D + ps)
    H, T, N = 3, 9, 16
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    slots = torch.randperm(N * ps, generator=g)[:T]
    slots[4] = -1  # padding: skipped
    positions = torch.randint(0, 500, (T,), generator=g)
    inv = inv_freq_of(D)
    k_pool = torch.zeros(N, ps, H, D, dtype=dtype)
    v_pool = torch.zeros(N, ps, H, D, dtype=dtype)
    kr = R.rotate_by(k, positions, inv).to(dtype)  # float32 angles, as the engine's tables
    ref_k, ref_v = k_pool.clone().view(-1, H, D), v_pool.clone().view(-1, H, D)
    keep = slots >= 0
    ref_k[slots[keep]] = kr[keep]
    ref_v[slots[keep]] = v[keep]
    kp, vp = k_pool.to(DEVICE), v_pool.to(DEVICE)
    if mode == "table":
        ang = torch.outer(torch.arange(512, dtype=torch.float32), inv)
        tk.rope_append(kp, vp, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), positions.to(DEVICE),
                       cos=ang.cos().to(DEVICE), sin=ang.sin().to(DEVICE))
    else:
        tk.rope_append(kp, vp, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), positions.to(DEVICE),
                       inv_freq=inv.to(DEVICE))
    tol = TOL[dtype] if dtype != torch.float32 else 2e-5
    torch.testing.assert_close(kp.cpu().view(-1, H, D).float(), ref_k.float(), atol=tol, rtol=tol)
    assert torch.equal(vp.cpu().view(-1, H, D), ref_v)


def test_append_kv_matches_torch_append():
    from engine.attention import _append_kv_torch
    g = torch.Generator().manual_seed(7)
    H, D, ps, N, T = 2, 64, 16, 4, 21
    k, v = torch.randn(2, T, H, D, generator=g)
    slots = torch.randperm(N * ps, generator=g)[:T]
    ref_k, ref_v = torch.zeros(N, ps, H, D), torch.zeros(N, ps, H, D)
    _append_kv_torch(ref_k, ref_v, k, v, slots)
    kp, vp = torch.zeros(N, ps, H, D, device=DEVICE), torch.zeros(N, ps, H, D, device=DEVICE)
    # k as the model passes it: a strided view into the fused qkv output
    qkv = torch.cat([torch.zeros(T, 1, D), k], dim=1).to(DEVICE)
    tk.append_kv(kp, vp, qkv[:, 1:], v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(kp.cpu(), ref_k) and torch.equal(vp.cpu(), ref_v)


def test_append_never_writes_or_reads_outside_its_tensors():
    """A slot past the pool or a position outside the cos/sin tables: an error for host
    tensors; in the kernel itself (what a device launch runs: the host cannot check device
    tensors without a sync) the slot is skipped and the position clamped into the tables."""
    import importlib
    RA = importlib.import_module("triton_kernels.rope_append")  # (the package's rope_append is the function)
    H, D, ps, N, T = 2, 16, 4, 3, 3
    k, v = torch.randn(2, T, H, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    # one allocation: the pools' slots, then a guard row that must stay untouched
    kbuf, vbuf = torch.zeros(N * ps + 1, H, D, device=DEVICE), torch.zeros(N * ps + 1, H, D, device=DEVICE)
    kp, vp = kbuf[:-1].view(N, ps, H, D), vbuf[:-1].view(N, ps, H, D)
    slots = torch.tensor([0, N * ps, 5], device=DEVICE)
    positions = torch.tensor([1, -1, 2], device=DEVICE)
    ang = torch.outer(torch.arange(8, dtype=torch.float32), inv_freq_of(D)).to(DEVICE)
    if DEVICE.type == "cpu":  # (the launchers check host tensors only: on a GPU, the kernel below)
        with pytest.raises(ValueError, match=f"slot {N * ps} is outside the pool's {N * ps} slots"):
            tk.append_kv(kp, vp, k, v, slots)
        with pytest.raises(ValueError, match=r"positions -1 .. 2 are outside the cos/sin tables \(8 positions\)"):
            tk.rope_append(kp, vp, k, v, slots.clamp(max=N * ps - 1), positions, cos=ang.cos(), sin=ang.sin())
    RA._launch(kp, vp, k, v, slots, None, None, None, None, RA._NO_ROPE)  # (past the host checks)
    assert bool((kbuf[-1] == 0).all() and (vbuf[-1] == 0).all())
    assert torch.equal(kbuf[[0, 5]].cpu(), k[[0, 2]].cpu()) and torch.equal(vbuf[[0, 5]].cpu(), v[[0, 2]].cpu())
    kbuf.zero_()
    RA._launch(kp, vp, k, v, torch.tensor([0, 1, 2], device=DEVICE), torch.tensor([-5, 99, 3], device=DEVICE),
               ang.cos(), ang.sin(), None, RA._ROPE_TABLE)
    want = R.rotate_by(k.cpu(), torch.tensor([0, 7, 3]), inv_freq_of(D))  # clamped: 0 and 7
    torch.testing.assert_close(kbuf[:3].cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not tk.INTERPRET or sys.platform != "linux",
                    reason="CPU pools mapped from a sparse file (Linux), run by the Triton interpreter")
def test_pools_past_2_31_elements_are_addressed_in_int64(tmp_path):
    """Page and slot offsets are int64 in every kernel: a layer's pool passes 2^31 elements at
    2^31 / (Hkv x D) tokens (2.1M tokens for 8 kv heads of 128; 524k for 32), where int32
    offsets wrap. No small pool shows it: here the pools are mapped from a sparse file
    (nothing stored but the pages written), with pages past element 2^31 and 2^31 zeros
    before the pools, where wrapped offsets land. K/V written there by append_kv (int32
    slots) and read back by segment_attention (direct, and split then merged) must be the
    tokens themselves. (Test only: the kernels already widen; with any of the three int64
    casts removed this test fails.)"""
    H, D, ps, Hq, T = 1, 16, 4, 2, 10
    page = ps * H * D
    far = 2**31 // page + 5                 # pages from here on start past element 2^31
    N, pad = far + 3, 2**31
    path = tmp_path / "pools"
    with open(path, "wb") as f:
        f.truncate((pad + 2 * N * page) * 4)
    flat = torch.from_file(str(path), shared=True, size=pad + 2 * N * page, dtype=torch.float32)
    path.unlink()  # (the mapping stays; no ~24 GB sparse file is left behind)
    k_pool, v_pool = flat[pad:].view(2, N, ps, H, D)
    g = torch.Generator().manual_seed(90)
    k, v = torch.randn(2, T, H, D, generator=g)
    pages = [far + 2, 1, far]
    slots = torch.tensor([pages[i // ps] * ps + i % ps for i in range(T)], dtype=torch.int32)
    tk.append_kv(k_pool, v_pool, k, v, slots)
    at = slots.long()
    assert torch.equal(k_pool.view(-1, H, D)[at], k) and torch.equal(v_pool.view(-1, H, D)[at], v)
    q = torch.randn(3, Hq, D, generator=g)
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 3)], {0: T}, {0: pages})
    small_k, small_v = torch.zeros(2, 3 * ps, H, D)
    small_k[:T], small_v[:T] = k, v
    ref = R.segment_attention_torch(q, small_k.view(3, ps, H, D), small_v.view(3, ps, H, D),
                                    build_plan_py([ThreadStep([(0, 0)], 0, 3)], {0: T}, {0: [0, 1, 2]}),
                                    inv_freq_of(D), 0.25)
    for chunk in (None, 4):
        out = tk.segment_attention(q, k_pool, v_pool, plan, inv_freq_of(D), 0.25, kv_chunk=chunk)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- launcher checks ------------------------------------------------------------------------------

def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors' one: each launcher
    enters ``device_guard`` of its tensors' device (on ``cuda:1`` a bare launch ran in
    cuda:0's context). Recorded here through the guard itself."""
    from triton_kernels import _common as Cm
    seen = []
    real = Cm.device_guard

    def record(device):
        seen.append(torch.device(device))
        return real(device)
    monkeypatch.setattr(Cm, "device_guard", record)
    q, k_pool, v_pool, plan = random_case(61, 4, 2, 64, 16, torch.float32, threads=2)
    q, k_pool, v_pool, plan = q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan.to(DEVICE)
    tk.segment_attention(q, k_pool, v_pool, plan, inv_freq_of(64).to(DEVICE), 0.125, kv_chunk=16)
    assert len(seen) == 2 and set(seen) == {q.device}           # attention, then its merge
    seen.clear()
    k = torch.randn(3, 2, 64, device=DEVICE)
    tk.append_kv(k_pool, v_pool, k, k.clone(), torch.tensor([0, 5, 9], device=DEVICE))
    assert seen == [k_pool.device]
    guard = real(torch.device("cuda", 1))            # (made without a GPU: entered only on one)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1



def test_launchers_raise_clear_errors():
    q, k_pool, v_pool, plan = random_case(60, 4, 2, 64, 16, torch.float32)
    q, k_pool, v_pool, plan = q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan.to(DEVICE)
    inv = inv_freq_of(64).to(DEVICE)
    bad = [
        ((q.half(), k_pool, v_pool, plan, inv, 0.1), "dtype"),
        ((q.int(), k_pool.int(), v_pool.int(), plan, inv, 0.1), "dtype"),
        ((q[:, :3], k_pool, v_pool, plan, inv, 0.1), "multiple"),
        ((q[..., :32], k_pool, v_pool, plan, inv, 0.1), "head_dim"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k_pool, v_pool, plan, inv, 0.1), "contiguous"),
        ((q[:-1], k_pool, v_pool, plan, inv, 0.1), "rows"),
        ((q, k_pool, v_pool, plan, inv[:5], 0.1), "inv_freq"),
        ((q, k_pool, v_pool[:, :, :1], plan, inv, 0.1), "differ"),
        ((q, k_pool, v_pool, plan, inv, -1.0), "scale"),
    ]
    for args, word in bad:
        with pytest.raises(ValueError, match=word):
            tk.segment_attention(*args)
    p64 = plan.to(DEVICE)
    p64.q_rows = p64.q_rows.long()
    with pytest.raises(ValueError, match="q_rows"):
        tk.segment_attention(q, k_pool, v_pool, p64, inv, 0.1)
    k = torch.zeros(3, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="slots"):
        tk.append_kv(k_pool, v_pool, k, k, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, 2, 64\]"):
        tk.append_kv(k_pool, v_pool, k[:, :1], k, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="cos"):
        tk.rope_append(k_pool, v_pool, k, k, torch.zeros(3, dtype=torch.int64, device=DEVICE),
                       torch.zeros(3, dtype=torch.int64, device=DEVICE), cos=torch.zeros(4, 32))
    with pytest.raises(ValueError, match="lse"):
        tk.merge_states(torch.zeros(2, 2, 8), torch.zeros(3, 2), torch.zeros(2, dtype=torch.int32),
                        torch.zeros(2, dtype=torch.int32), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    from triton_kernels import _common
    monkeypatch.setattr(_common, "INTERPRET", False)
    q, k_pool, v_pool, plan = random_case(61, 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.segment_attention(q, k_pool, v_pool, plan, inv_freq_of(64), 0.1)


# ---- flash-attn glue (the kernel itself needs a GPU; the layout and call are checked here) -------

def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract, in PyTorch (GQA by repeating kv heads)."""
    assert causal and torch.equal(cu_q, cu_k)
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=softmax_scale).transpose(0, 1)
    return out


def test_flash_prefill_layout_and_glue():
    g = torch.Generator().manual_seed(70)
    Hq, Hkv, D, ps = 4, 2, 64, 16
    # two fresh threads prefilling their own segments (20 and 7 tokens): plain causal prefill
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 20), ThreadStep([(1, 0)], 1, 7)],
                         {0: 20, 1: 7}, {0: [3, 1], 1: [0]})
    lay = tk.prefill_layout(plan, ps)
    assert lay is not None and lay.rows is None and lay.cu_seqlens.tolist() == [0, 20, 27]
    q = torch.randn(27, Hq, D, generator=g)
    k_pool, v_pool = torch.randn(2, 4, ps, Hkv, D, generator=g)
    ref = R.segment_attention_torch(q, k_pool, v_pool, plan, inv_freq_of(D), 0.125)
    out = tk.flash_prefill(q, k_pool, v_pool, lay, 0.125, _fake_flash_varlen)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # anything else is not plain prefill: a shared prompt, decode, a shift
    for steps, lens in (([ThreadStep([(0, 0), (1, 0)], 1, 3)], {0: 5, 1: 3}),
                        ([ThreadStep([(0, 0)], 0, 1)], {0: 5, 1: 3}),
                        ([ThreadStep([(0, 2)], 0, 5)], {0: 5, 1: 3})):
        assert tk.prefill_layout(build_plan_py(steps, lens, {0: [0], 1: [1]}), ps) is None


def test_attention_entry_point_falls_back_without_flash(monkeypatch):
    """tk.attention: flash only for CUDA half precision with flash-attn installed; here it must
    run the Triton kernel (and never import flash_attn for CPU tensors)."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # broken install
    q, k_pool, v_pool, plan = random_case(71, 4, 2, 64, 16, torch.float32)
    ref = R.segment_attention_torch(q, k_pool, v_pool, plan, inv_freq_of(64), 0.125)
    out = tk.attention(q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan.to(DEVICE),
                       inv_freq_of(64).to(DEVICE), 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_flash_only_on_the_gpus_it_supports(monkeypatch):
    """flash-attn 2 raises on every call on pre-Ampere (T4, V100) and Blackwell GPUs: the
    entry point asks the device's compute capability first (faked here: no GPU)."""
    from triton_kernels import flash as F
    caps = {0: (7, 5), 1: (8, 0), 2: (8, 9), 3: (9, 0), 4: (10, 0), 5: (12, 0), 6: (7, 0)}
    monkeypatch.setattr(F, "_FLASH_GPUS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    got = {i: F.flash_supported(torch.device("cuda", i)) for i in caps}
    assert got == {0: False, 1: True, 2: True, 3: True, 4: False, 5: False, 6: False}


# ---- GPU only ------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (12, 2, 80), (8, 8, 64)])
def test_gpu_compiled_matches_reference(dtype, Hq, Hkv, D):
    for seed in range(3):
        q, k_pool, v_pool, plan = random_case(100 + seed, Hq, Hkv, D, 16, dtype, threads=6, prompt=700)
        check_attention(q, k_pool, v_pool, plan, D)
        check_attention(q, k_pool, v_pool, plan, D, kv_chunk=128)


# ---- real compilation without a GPU ---------------------------------------------------------------

def _aot_check(*args: str) -> str:
    """``python -m triton_kernels.aot_check ARGS`` in a subprocess without TRITON_INTERPRET
    (real compilation, Triton's bundled ptxas); its output, after asserting success."""
    import subprocess
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (bundled ptxas) is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "triton_kernels.aot_check", *args],
                         capture_output=True, text=True, cwd=root, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def test_kernels_compile_for_gpu_targets():
    """The interpreter accepts what the compiler rejects: compile representative
    specialisations of every kernel to cubin for sm_80 and sm_90 (Triton's bundled
    ptxas; no GPU needed), in a subprocess without TRITON_INTERPRET. The full set:
    ``python -m triton_kernels.aot_check``."""
    out = _aot_check("--smoke", "--arch", "80", "90")
    assert "compiled 4/4" in out


def test_smallest_tuning_config_fits_every_gpu():
    """Every autotune config of the float32, head-dim-256 prefill tile needed more shared
    memory than RTX 30/40, A10, L4 and L40 GPUs (sm_86/89: 99 KB per block) have: the
    autotuner drops such configs, and with none left the first prefill failed; then the
    32-row tile's smallest config than a T4 (sm_75: 64 KB). The smallest config is first in
    the list; compiled for sm_75 and sm_89 as a launch specialises it (no GPU needed)."""
    out = _aot_check("--fit", "--arch", "75", "89")
    assert out.count("B shared (limit 101376)") >= 1 and out.count("B shared (limit 65536)") >= 1, out


# ---- behaviour found unchecked by mutation testing of triton_kernels/ ----------------------------

def _poison_empty(monkeypatch):
    """torch.empty returns NaN-filled (float) / -7-filled (int) memory: an output that
    relies on uninitialised memory being zero shows up."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)
    monkeypatch.setattr(torch, "empty", empty)


def _manual_plan(kv_indptr, pages, kv_len, q_indptr, q_rows, shift, limit, merge_indptr, merge_entries):
    from engine.attention.plan import AttentionPlan
    return AttentionPlan(i32(kv_indptr), i32(pages), i32(kv_len), i32(q_indptr), i32(q_rows), i32(shift), i32(limit),
                         i32(merge_indptr), i32(merge_entries), num_rows=len(merge_indptr) - 1,
                         has_shift=any(shift))


def test_direct_rows_seeing_no_key_get_zeros(monkeypatch):
    """Direct writes (one entry per row, no split): an entry with causal_limit 0 in a live
    job (beside rows that do see keys), and a row whose only entry reads an empty segment,
    both get zeros, not NaN from 0/0 or an unwritten output."""
    _poison_empty(monkeypatch)
    Hq, Hkv, D, ps = 4, 2, 16, 4
    g = torch.Generator().manual_seed(80)
    # job 0: 7 tokens on pages [2, 0], rows 0..2 with limits 0, 5, 0; job 1: empty, read by row 3
    plan = _manual_plan([0, 2, 2], [2, 0], [7, 0], [0, 3, 4], [0, 1, 2, 3], [0, 0, 0, 0],
                        [0, 5, 0, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3])
    assert W.build_work(plan, Hkv, Hq // Hkv, 16, target_programs=4).direct
    q = torch.randn(4, Hq, D, generator=g)
    k_pool, v_pool = torch.randn(2, 3, ps, Hkv, D, generator=g)
    out = check_attention(q, k_pool, v_pool, plan, D)
    assert bool((out[[0, 2, 3]] == 0).all()) and bool((out[1] != 0).any())


def test_forced_split_of_a_plain_prefill_is_merged():
    """Each row one entry (otherwise a direct write) but its segment split into chunks:
    the chunks' partial states must be merged, not written over each other."""
    Hq, Hkv, D, ps, n = 4, 2, 16, 4, 11
    g = torch.Generator().manual_seed(81)
    plan = build_plan_py([ThreadStep([(0, 0)], 0, n)], {0: n}, {0: [2, 0, 1]})
    work = W.build_work(plan, Hkv, Hq // Hkv, 16, target_programs=1, kv_chunk=4)
    assert not work.direct and int(work.nsplit.max()) == 3
    q = torch.randn(n, Hq, D, generator=g)
    k_pool, v_pool = torch.randn(2, 3, ps, Hkv, D, generator=g)
    check_attention(q, k_pool, v_pool, plan, D, kv_chunk=4)


def test_merge_with_no_entries_and_many_heads(monkeypatch):
    """merge_states: no entry at all -> zeros (never the uninitialised output); more heads
    than one program's block (4096 // D_PAD heads) -> every head block merged."""
    _poison_empty(monkeypatch)
    out = tk.merge_states(torch.zeros(0, 3, 8, device=DEVICE), torch.zeros(0, 3, device=DEVICE),
                          torch.zeros(3, dtype=torch.int32, device=DEVICE),
                          torch.zeros(0, dtype=torch.int32, device=DEVICE), 2)
    assert out.shape == (2, 3, 8) and bool((out == 0).all())
    g = torch.Generator().manual_seed(82)
    E, H, D = 3, 40, 128  # block of 32 heads: 2 programs per row
    o, lse = torch.randn(E, H, D, generator=g), torch.randn(E, H, generator=g)
    indptr, entries = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)
    ref = R.merge_states(o, lse, indptr, entries, 2)
    out = tk.merge_states(o.to(DEVICE), lse.to(DEVICE), indptr.to(DEVICE), entries.to(DEVICE), 2)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_rope_append_many_heads_and_last_table_position():
    """More kv heads than one program's block (2048 // HALF_PAD heads) are all written; a
    position equal to the table length is refused, the last one is used."""
    g = torch.Generator().manual_seed(83)
    H, D, ps, N, T = 33, 128, 2, 2, 2
    k, v = torch.randn(2, T, H, D, generator=g)
    inv = inv_freq_of(D)
    ang = torch.outer(torch.arange(6, dtype=torch.float32), inv)
    kp, vp = torch.zeros(N, ps, H, D, device=DEVICE), torch.zeros(N, ps, H, D, device=DEVICE)
    slots, pos = torch.tensor([3, 0]), torch.tensor([5, 2])
    tk.rope_append(kp, vp, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), pos.to(DEVICE),
                   cos=ang.cos().to(DEVICE), sin=ang.sin().to(DEVICE))
    want = R.rotate_by(k, pos, inv)
    torch.testing.assert_close(kp.cpu().view(-1, H, D)[slots], want, atol=2e-5, rtol=2e-5)
    assert torch.equal(vp.cpu().view(-1, H, D)[slots], v)
    if DEVICE.type == "cpu":  # (positions on a GPU are not checked on the host: the kernel clamps them)
        with pytest.raises(ValueError, match=r"positions 3 .. 6 are outside the cos/sin tables"):
            tk.rope_append(kp, vp, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), (pos + 1).to(DEVICE),
                           cos=ang.cos().to(DEVICE), sin=ang.sin().to(DEVICE))


def test_work_items_tile_boundaries_and_chunk_alignment():
    """Host-side work split: a job whose entries fill whole tiles gets no empty item; a job
    whose rows exactly fill the small tile goes to the small class; an automatic split
    longer than MIN_CHUNK is still a multiple of CHUNK_ALIGN (every BLOCK_N divides it)."""
    # GQA 4: small tile 16 rows = 4 entries, large 64 rows = 16 entries
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 4), ThreadStep([(1, 0)], 1, 32)], {0: 9, 1: 40},
                         {0: [0], 1: [1, 2, 3]})
    work = W.build_work(plan, 2, 4, 32, target_programs=1)
    by_q = {wc.block_q: wc.items.long() for wc in work.classes}
    assert sorted(by_q) == [16, 64]
    assert by_q[16][:, :3].tolist() == [[0, 0, 4]]
    assert sorted(by_q[64][:, 1:3].tolist()) == [[4, 20], [20, 36]]
    # a 1000-token prompt read by 3 decode rows (one item) beside 4 short jobs: 2072 keys
    # x heads over 8 programs = 259 per program -> chunks of 384, not 259
    _, _, _, plan = random_case(84, 8, 2, 64, 16, torch.float32, shifts=False, threads=3,
                                prompt=1000, new=(1,))
    work = W.build_work(plan, 2, 4, 32, target_programs=8)
    it = torch.cat([wc.items.long() for wc in work.classes])
    it = it[plan.kv_len[it[:, 0]].long() == 1000]
    assert sorted((it[:, 4] - it[:, 3]).tolist()) == [232, 384, 384]


def test_launchers_reject_more_bad_arguments():
    q, k_pool, v_pool, plan = random_case(85, 4, 2, 64, 16, torch.float32, threads=2)
    q, k_pool, v_pool, plan = q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), plan.to(DEVICE)
    inv = inv_freq_of(64).to(DEVICE)
    for scale in (0.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            tk.segment_attention(q, k_pool, v_pool, plan, inv, scale)
    with pytest.raises(ValueError, match="kv_chunk"):
        tk.segment_attention(q, k_pool, v_pool, plan, inv, 0.1, kv_chunk=0)
    with pytest.raises(ValueError, match="even"):
        tk.segment_attention(q[..., :63].contiguous(), k_pool[..., :63].contiguous(),
                             v_pool[..., :63].contiguous(), plan, inv[:31], 0.1)
    o, lse = torch.zeros(2, 2, 8, device=DEVICE), torch.zeros(2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        tk.merge_states(o, lse.double(), i32([0, 1, 2], DEVICE), i32([0, 1], DEVICE), 2)
    with pytest.raises(ValueError, match="num_rows"):
        tk.merge_states(o, lse, i32([0, 1, 2], DEVICE), i32([0, 1], DEVICE), 3)
    k = torch.zeros(3, 2, 64, device=DEVICE)
    sl = torch.tensor([0, 1, 2], device=DEVICE)
    tab = torch.zeros(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="positions"):
        tk.rope_append(k_pool, v_pool, k, k, sl, torch.zeros(2, dtype=torch.int64, device=DEVICE), inv_freq=inv)
    with pytest.raises(ValueError, match="not both"):
        tk.rope_append(k_pool, v_pool, k, k, sl, sl, cos=tab, sin=tab, inv_freq=inv)
    with pytest.raises(ValueError, match="k has 3 tokens but v has 2"):
        tk.append_kv(k_pool, v_pool, k, k[:2], sl)
    kp5 = torch.zeros(2, 4, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        tk.append_kv(kp5, kp5.clone(), torch.zeros(1, 2, 5, device=DEVICE), torch.zeros(1, 2, 5, device=DEVICE),
                     sl[:1])


def test_plan_index_checks_and_flash_rows_out_of_order():
    """Plan tensors must be contiguous and on q's device; inv_freq floating point. A plain
    prefill whose jobs are not in row order: the flash layout carries the rows."""
    q, k_pool, v_pool, plan = random_case(86, 4, 2, 64, 16, torch.float32, threads=2)
    q, k_pool, v_pool = q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE)
    inv = inv_freq_of(64).to(DEVICE)
    bad = plan.to(DEVICE)
    bad.q_rows = torch.stack([bad.q_rows, bad.q_rows], 1)[:, 0]  # 1-D, stride 2
    with pytest.raises(ValueError, match="contiguous 1-D"):
        tk.segment_attention(q, k_pool, v_pool, bad, inv, 0.1)
    with pytest.raises(ValueError, match="AttentionPlan.to"):
        tk.segment_attention(q, k_pool, v_pool, plan.to("meta"), inv, 0.1)
    with pytest.raises(ValueError, match="floating point"):
        tk.segment_attention(q, k_pool, v_pool, plan.to(DEVICE), torch.arange(32, device=DEVICE), 0.1)
    # thread B's 3 rows (rows 2..4) are job 0, thread A's 2 rows (rows 0..1) job 1
    plan = _manual_plan([0, 1, 2], [1, 0], [3, 2], [0, 3, 5], [2, 3, 4, 0, 1], [0] * 5, [1, 2, 3, 1, 2],
                        [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2])
    lay = tk.prefill_layout(plan, 4)
    assert lay is not None and lay.rows.tolist() == [2, 3, 4, 0, 1]
    g = torch.Generator().manual_seed(86)
    q = torch.randn(5, 4, 16, generator=g)
    k_pool, v_pool = torch.randn(2, 2, 4, 2, 16, generator=g)
    ref = R.segment_attention_torch(q, k_pool, v_pool, plan, inv_freq_of(16), 0.25)
    torch.testing.assert_close(tk.flash_prefill(q, k_pool, v_pool, lay, 0.25, _fake_flash_varlen), ref,
                               atol=1e-5, rtol=1e-5)
    # not plain causal prefill although each job's kv_len is its entry count: full (not causal)
    # limits; or one row merging two entries while another merges none
    for lim, mi, me in (([3, 3, 3, 2, 2], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2]),
                        ([1, 2, 3, 1, 2], [0, 2, 2, 3, 4, 5], [3, 4, 0, 1, 2])):
        assert tk.prefill_layout(_manual_plan([0, 1, 2], [1, 0], [3, 2], [0, 3, 5], [2, 3, 4, 0, 1], [0] * 5,
                                              lim, mi, me), 4) is None
