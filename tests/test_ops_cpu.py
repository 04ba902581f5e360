"""The C++ ops (torch.ops.loom.*) against the torch reference backend.

Plans come from ``build_plan_py`` over random segments whose pages are a random
permutation of a larger pool (so pages are never in order), with partly filled last
pages, an occasional empty extra page, shifts of both signs and causal own segments.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch

from engine.attention.plan import AttentionPlan, ThreadStep, build_plan_py
from engine.attention.reference import merge_states as merge_states_ref
from engine.attention.reference import segment_attention_torch

_ops = pytest.importorskip("engine._ops", reason="engine._C is not built (pip install -e .)")
from _cpu_isa import ISAS, isa  # noqa: E402,F401  (isa: the fixture)
from conftest import i32, torch_threads  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def inv_freq_of(D: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def make_pool(seg_len: dict[int, int], page_size: int, rng: random.Random, extra_pages: int = 3):
    """Pages for each segment, drawn from a shuffled pool; sometimes one unused page more."""
    need = {s: -(-n // page_size) + (1 if rng.random() < 0.3 else 0) for s, n in seg_len.items()}
    total = sum(need.values()) + extra_pages
    ids = list(range(total))
    rng.shuffle(ids)
    seg_pages, i = {}, 0
    for s, n in need.items():
        seg_pages[s] = ids[i:i + n]
        i += n
    return seg_pages, total


def random_case(seed: int, *, lens=(1, 15, 16, 17, 100), n_threads=3, page_size=16, num_new=(1, 3),
                shifts=True, view_size=None, n_seg=None):
    rng = random.Random(seed)
    n_seg = n_seg or max(len(lens), n_threads)
    seg_len = {s: lens[s % len(lens)] for s in range(n_seg)}
    threads = []
    owns = rng.sample(range(n_seg), n_threads)
    for own in owns:
        others = [s for s in range(n_seg) if s != own]
        k = rng.randint(0, len(others)) if view_size is None else min(view_size - 1, len(others))
        view = [(s, rng.randint(-300, 300) if shifts else 0) for s in rng.sample(others, k)]
        view.insert(rng.randint(0, len(view)), (own, 0))
        n = min(rng.choice(num_new), seg_len[own])
        threads.append(ThreadStep(view, own, n))
    seg_pages, num_pages = make_pool(seg_len, page_size, rng)
    return build_plan_py(threads, seg_len, seg_pages), num_pages


def make_tensors(plan: AttentionPlan, num_pages: int, page_size: int, Hq: int, Hkv: int, D: int, dtype,
                 seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(plan.num_rows, Hq, D, generator=g).to(dtype)
    k_pool = torch.randn(num_pages, page_size, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(num_pages, page_size, Hkv, D, generator=g).to(dtype)
    return q, k_pool, v_pool


def check(plan, q, k_pool, v_pool, inv_freq=None, scale=None):
    D = q.shape[-1]
    inv_freq = inv_freq_of(D) if inv_freq is None else inv_freq
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ref = segment_attention_torch(q, k_pool, v_pool, plan, inv_freq, scale)
    out = _ops.segment_attention_cpu(q, k_pool, v_pool, plan, inv_freq, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return out


# ---------------------------------------------------------------------------------------------
# segment attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,page_size", [(4, 4, 64, 1), (8, 4, 80, 16), (8, 2, 128, 64), (7, 1, 64, 16)])
def test_random_plans(isa, dtype, Hq, Hkv, D, page_size):
    for seed in range(2):
        plan, num_pages = random_case(seed, page_size=page_size)
        check(plan, *make_tensors(plan, num_pages, page_size, Hq, Hkv, D, dtype, seed))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 40), (6, 2, 72), (3, 1, 100)])
def test_head_dims_off_the_vector_width(isa, Hq, Hkv, D):
    """Head dims with a remainder past the vector width (16 / 8 / 4 floats per build):
    the kernels' scalar tails, on the few-query and the many-query path."""
    for seed in range(2):
        plan, num_pages = random_case(seed, page_size=16, num_new=(1, 2, 9))
        check(plan, *make_tensors(plan, num_pages, 16, Hq, Hkv, D, torch.float32, seed))


@pytest.mark.parametrize("L", [1, 15, 16, 17, 100, 1000])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_segment_lengths_and_rows(L, rows):
    """One prompt of L tokens shared by `rows` decode rows plus their own causal segments."""
    rng = random.Random(L * 31 + rows)
    seg_len = {0: L}
    threads = []
    for i in range(rows):
        seg_len[i + 1] = rng.randint(1, 20)
        threads.append(ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1))
    seg_pages, num_pages = make_pool(seg_len, 16, rng)
    plan = build_plan_py(threads, seg_len, seg_pages)
    check(plan, *make_tensors(plan, num_pages, 16, 8, 4, 64, torch.float32, L + rows))


@pytest.mark.parametrize("n_new", [1, 7, 17, 100])
def test_prefill_causal(n_new):
    """Many rows of one thread in its own segment: per-row causal limits inside tiles
    (7 rows x a GQA group of 2: the many-query path's 32-key tiles for <= 16 queries)."""
    seg_len = {0: 40, 1: 37 + n_new}
    rng = random.Random(n_new)
    seg_pages, num_pages = make_pool(seg_len, 16, rng)
    plan = build_plan_py([ThreadStep([(0, 0), (1, 0)], 1, n_new)], seg_len, seg_pages)
    check(plan, *make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32, n_new))


def test_long_prefill_many_rows():
    """Rows beyond one block of queries and keys beyond one chunk (1k x 1k causal)."""
    seg_len = {0: 1030}
    rng = random.Random(5)
    seg_pages, num_pages = make_pool(seg_len, 16, rng)
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 1030)], seg_len, seg_pages)
    check(plan, *make_tensors(plan, num_pages, 16, 2, 2, 64, torch.float32, 5))


@pytest.mark.parametrize("G", [1, 2, 4, 7])
def test_gqa_ratios(G):
    plan, num_pages = random_case(G, lens=(17, 100, 33), n_threads=4, num_new=(1, 2, 5))
    check(plan, *make_tensors(plan, num_pages, 16, 2 * G, 2, 64, torch.float32, G))


@pytest.mark.parametrize("shift", [-5000, -7, 3, 100000])
def test_shifts(shift):
    """Queries rotated by -shift * inv_freq before attending a shifted segment."""
    seg_len = {0: 50, 1: 9}
    rng = random.Random(abs(shift))
    seg_pages, num_pages = make_pool(seg_len, 16, rng)
    threads = [ThreadStep([(0, shift), (1, 0)], 1, 3), ThreadStep([(0, -shift)], 0, 1)]
    plan = build_plan_py(threads, seg_len, seg_pages)
    assert plan.has_shift
    D = 128
    check(plan, *make_tensors(plan, num_pages, 16, 4, 2, D, torch.float32, 1), inv_freq=inv_freq_of(D, 1e6))


def test_view_of_40_segments():
    plan, num_pages = random_case(40, lens=(1, 5, 16, 17, 33, 64, 2), n_threads=6, view_size=40,
                                  num_new=(1, 2), n_seg=45)
    assert plan.num_jobs >= 40
    check(plan, *make_tensors(plan, num_pages, 16, 8, 2, 64, torch.float32, 40))
    check(plan, *make_tensors(plan, num_pages, 16, 8, 2, 64, torch.bfloat16, 41))


def test_empty_segment_and_rows_without_keys():
    """A zero-length segment (no key) and a row that sees no key at all give zeros."""
    seg_len = {0: 0, 1: 5, 2: 0}
    seg_pages = {0: [], 1: [3], 2: [1]}  # segment 2: an allocated but empty page
    threads = [ThreadStep([(0, 0), (1, 0)], 1, 1), ThreadStep([(2, 0)], 2, 0)]
    plan = build_plan_py(threads, seg_len, seg_pages)
    check(plan, *make_tensors(plan, 4, 16, 4, 2, 64, torch.float32))
    # a row whose only entry is an empty segment
    lonely = AttentionPlan(*[t.clone() for t in plan.tensors()], num_rows=1)
    assert plan.q_rows.tolist() == [0, 0] and plan.kv_len[0] == 0
    lonely.merge_indptr = torch.tensor([0, 1], dtype=torch.int32)  # row 0 merges entry 0 only
    q, k, v = make_tensors(plan, 4, 16, 4, 2, 64, torch.float32)
    out = _ops.segment_attention_cpu(q, k, v, lonely, None, 0.125)
    assert torch.equal(out, torch.zeros_like(out))


def check_with_threads(threads: int, plan, *tensors):
    with torch_threads(threads):
        check(plan, *tensors)


def _plan_with(plan: AttentionPlan, name: str, value) -> AttentionPlan:
    """A copy of plan with tensor `name` replaced by value, or (index, x): element index set to x."""
    bad = AttentionPlan(*[t.clone() for t in plan.tensors()], num_rows=plan.num_rows)
    if isinstance(value, tuple):
        getattr(bad, name)[value[0]] = value[1]
    else:
        setattr(bad, name, value)
    return bad


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads):
    """Chunking depends on the thread count; results must not (beyond rounding)."""
    plan, num_pages = random_case(9, lens=(700, 1000, 3), n_threads=3, num_new=(1, 4))
    tensors = make_tensors(plan, num_pages, 16, 8, 4, 64, torch.float32, 9)
    check_with_threads(threads, plan, *tensors)


def shared_prompt_plan(shared: int, seed: int, n: int = 8):
    """n decode threads, each viewing one shared segment of `shared` keys and its own."""
    seg_len = {0: shared, **{t + 1: 5 + t for t in range(n)}}
    seg_pages, num_pages = make_pool(seg_len, 16, random.Random(seed))
    plan = build_plan_py([ThreadStep([(0, 0), (t + 1, 0)], t + 1, 1) for t in range(n)], seg_len, seg_pages)
    return plan, num_pages


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shared", [100, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompt_decode(threads, shared, dtype):
    """8 decode threads over one shared segment (16 queries per kv head: the large path).
    2,000 keys: chunked into enough items that each takes every kv head in turn; 100 keys:
    one chunk, so the schedule splits it into one item per kv head to use both threads."""
    plan, num_pages = shared_prompt_plan(shared, seed=shared)
    tensors = make_tensors(plan, num_pages, 16, 8, 4, 64, dtype, shared)
    check_with_threads(threads, plan, *tensors)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_float32_queries_over_16bit_cache(isa, kv_dtype):
    """A float32 model with a bfloat16 / float16 KV cache: q stays float32 (not rounded to
    the cache's dtype), the output is float32, both paths (few and many queries)."""
    for seed in range(2):
        plan, num_pages = random_case(seed, page_size=16, num_new=(1, 2, 9))
        q, k, v = make_tensors(plan, num_pages, 16, 8, 2, 64, torch.float32, seed)
        check(plan, q, k.to(kv_dtype), v.to(kv_dtype))
    plan, num_pages = shared_prompt_plan(300, seed=1)
    q, k, v = make_tensors(plan, num_pages, 16, 8, 4, 64, torch.float32, 1)
    check(plan, q, k.to(kv_dtype), v.to(kv_dtype))


# The many-query path on AMX tiles (the "amx" build, bfloat16 caches; ISAS has it where the
# CPU and the OS allow the tiles): tiles of 16 queries / keys / dims with partial ones,
# key rows read in place (pages of whole 16-key blocks) or gathered (other page sizes),
# head dims that are (or are not: the FMA path) multiples of 32.
MANY_QUERY_CASES = [  # (shared keys, rows, G, D, page size)
    (1, 3, 2, 64, 16), (15, 17, 2, 64, 16), (16, 3, 7, 128, 16), (17, 40, 2, 64, 64),
    (100, 17, 4, 128, 1), (1000, 40, 2, 128, 16), (300, 9, 7, 256, 16), (200, 17, 2, 32, 64),
    (130, 17, 2, 80, 16),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("L,rows,G,D,page_size", MANY_QUERY_CASES)
def test_many_queries_16bit_cache(isa, q_dtype, L, rows, G, D, page_size):
    """rows decode rows over one shared segment of L keys plus 40 causal rows of one
    thread's own prefill: bfloat16 K/V; queries bfloat16 (a bfloat16 model) or float32 (a
    float32 model over a bfloat16 cache, held to float32's tolerance)."""
    rng = random.Random(L * 7 + rows + D)
    seg_len = {0: L, **{i + 1: rng.randint(1, 20) for i in range(rows)}, rows + 1: 45}
    threads = [ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1) for i in range(rows)]
    threads.append(ThreadStep([(0, 0), (rows + 1, 0)], rows + 1, 40))
    seg_pages, num_pages = make_pool(seg_len, page_size, rng)
    plan = build_plan_py(threads, seg_len, seg_pages)
    q, k, v = make_tensors(plan, num_pages, page_size, 2 * G, 2, D, torch.float32, L + rows)
    check(plan, q.to(q_dtype), k.bfloat16(), v.bfloat16())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("trend", ["rising", "falling"])
def test_running_max_that_moves(isa, q_dtype, trend):
    """Scores that rise (or fall) from ~15 to ~130 along 2,000 keys: the amx path's lazy
    running max (moved only when a tile's max passes it by 8) is moved, and the
    accumulators rescaled, over a dozen times, or never."""
    L, rows = 2000, 12
    seg_len = {0: L, **{i + 1: 3 for i in range(rows)}}
    seg_pages, num_pages = make_pool(seg_len, 16, random.Random(3))
    plan = build_plan_py([ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1) for i in range(rows)], seg_len, seg_pages)
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32, 11)
    q = q.abs() * 3  # positive queries: scores follow the keys' common offset
    ramp = torch.linspace(0, 6, L) if trend == "rising" else torch.linspace(6, 0, L)
    keys = k.view(-1, 2, 64)
    for i, page in enumerate(seg_pages[0]):  # segment 0's key t: + ramp[t] in every dim
        n = min(16, L - 16 * i)
        keys[page * 16: page * 16 + n] += ramp[16 * i: 16 * i + n, None, None]
    q, k, v = q.to(q_dtype), k.bfloat16(), v.bfloat16()
    ref = segment_attention_torch(q, k, v, plan, inv_freq_of(64), 0.125)
    out = _ops.segment_attention_cpu(q, k, v, plan, inv_freq_of(64), 0.125)
    # Scores reach ~130 here: float32 rounds them to ~1e-5 absolute, so even two float32
    # kernels differ by more than the usual 1e-5.
    tol = 1e-4 if q_dtype == torch.float32 else TOL[q_dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _errors_against_float64(rows, G, H, N, kv_dtype, D=64, PS=16):
    """`rows` float32 causal queries (x4: a peaked softmax, scores up to ~20) at the end of
    one segment of N random keys and values (+0.5: a common offset, the sums grow with N),
    K/V in kv_dtype: Loom's output, and its mean relative error against float64 with torch's
    float32 attention's over the same K/V: (out, loom's error, torch float32's error)."""
    g = torch.Generator().manual_seed(rows)
    k = torch.randn(N, H, D, generator=g).to(kv_dtype)
    v = (torch.randn(N, H, D, generator=g) + 0.5).to(kv_dtype)
    q = torch.randn(rows, H * G, D, generator=g) * 4
    plan = build_plan_py([ThreadStep([(0, 0)], 0, rows)], {0: N}, {0: list(range(N // PS))})
    out = _ops.segment_attention_cpu(q, k.view(-1, PS, H, D), v.view(-1, PS, H, D), plan, inv_freq_of(D), D ** -0.5)
    causal = torch.arange(N)[None] <= torch.arange(N - rows, N)[:, None]

    def attend(dt):
        o = []
        for hq in range(H * G):
            s = (q[:, hq].to(dt) @ k[:, hq // G].to(dt).T) * D ** -0.5
            o.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, hq // G].to(dt))
        return torch.stack(o, 1).double()
    want = attend(torch.float64)

    def err(o):
        return ((o.double() - want).abs().amax(-1) / want.abs().amax(-1)).mean().item()
    return out, err(out), err(attend(torch.float32))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("rows,G,H", [(1, 1, 2), (2, 4, 2), (2048, 1, 1)])
def test_long_segment_accuracy_as_a_matmul(isa, rows, G, H):
    """float32 over 8,192 keys of one segment (a long prompt's prefill pass, or a decode step
    over it): the error against float64 is no more than twice torch's float32 matmul /
    softmax. Each key tile's values are summed from zero and then added to O (they were
    summed into O key after key: 4.6x a matmul's error for 2,048 rows over 8,192 keys, 6.8x
    over 16,384; 1.5e-4 on a model's log-probs at 15k tokens)."""
    _, loom, torch32 = _errors_against_float64(rows, G, H, 8192, torch.float32)
    assert loom <= 2 * torch32 + 1e-7, (loom, torch32)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values", ["normal", "subnormal"])
def test_16bit_outputs_round_to_nearest_even(isa, dtype, values):
    """16-bit outputs are rounded by the kernel's merge as torch's .to() rounds: q = 0 makes
    both keys' weights 1/2, so each output is the exact mean of two V values that are one
    unit apart, a tie half of the time, which must go to the even neighbour. Normal values,
    or subnormal ones (float16's below 2^-14 take their own rounding branch: rounded, not
    flushed to zero; head dim 72, a tail past the last whole vector)."""
    seg_len = {0: 2}
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 1)], seg_len, {0: [0]})
    Hq, Hkv, D = 4, 2, 64 if values == "normal" else 72
    g = torch.Generator().manual_seed(5 if values == "normal" else 6)
    q = torch.zeros(1, Hq, D, dtype=dtype)
    k_pool = torch.randn(1, 16, Hkv, D, generator=g).to(dtype)
    # both signs; the second key's V one unit above the first's
    if values == "normal":
        bits = torch.randint(0x3000, 0x4800, (Hkv, D), generator=g, dtype=torch.int16)
    else:  # (up to the largest subnormal's bits)
        bits = torch.randint(1, 0x03ff if dtype == torch.float16 else 0x007f, (Hkv, D), generator=g, dtype=torch.int16)
    bits |= torch.randint(0, 2, (Hkv, D), generator=g, dtype=torch.int16) << 15
    v_pool = torch.zeros(1, 16, Hkv, D, dtype=dtype)
    v_pool[0, 0] = bits.view(dtype)
    v_pool[0, 1] = (bits + 1).view(dtype)
    out = _ops.segment_attention_cpu(q, k_pool, v_pool, plan, inv_freq_of(D), 1.0)
    mean = (v_pool[0, 0].float() + v_pool[0, 1].float()) / 2  # exact in float32
    want = mean.repeat_interleave(Hq // Hkv, dim=0)[None].to(dtype)
    assert out.dtype == dtype and (want != 0).all()
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_cpu_isa_names():
    """The build in use is one of the four; a bad name is refused with the choices, and
    leaves the build as it was."""
    assert _ops.cpu_isa() in ("amx", "avx512", "avx2", "base")
    before = _ops.cpu_isa()
    with pytest.raises(ValueError, match="'amx', 'avx512', 'avx2', 'base'"):
        _ops.cpu_isa("avx1024")
    assert _ops.cpu_isa() == before


@pytest.mark.parametrize("value,ok", [("base", True), ("avx1024", False)])
def test_cpu_isa_environment(value, ok):
    """LOOM_CPU_ISA caps the build for a whole process; a bad value stops the import with
    a message naming the variable."""
    env = {**os.environ, "LOOM_CPU_ISA": value}
    r = subprocess.run([sys.executable, "-c", "from engine import _ops; print(_ops.cpu_isa())"], env=env,
                       capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-1] == "base"
    else:
        assert r.returncode != 0
        assert "LOOM_CPU_ISA='avx1024' is not a CPU kernel build" in r.stderr


def test_strided_q():
    """q may be a view (e.g. split from a fused qkv projection): last dim contiguous."""
    plan, num_pages = random_case(3)
    _, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    qkv = torch.randn(plan.num_rows, 8, 64)
    check(plan, qkv[:, :4], k, v)


_IDLE_THREADS_SCRIPT = r"""
import threading, torch
import engine._ops
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
T, Hq, Hkv, D, ps = 2500, 32, 8, 128, 16  # (partial states: T x Hq x D floats, 41 MB: mmapped by malloc)
i32 = lambda v: torch.tensor(v, dtype=torch.int32)
k, v = torch.randn(1, ps, Hkv, D), torch.randn(1, ps, Hkv, D)
plan = [i32([0, 1]), i32([0]), i32([1]), i32([0, T]), i32(list(range(T))), i32([0] * T), i32([1] * T),
        i32(list(range(T + 1))), i32(list(range(T)))]
def call():
    torch.ops.loom.segment_attention(torch.ones(T, Hq, D), k, v, *plan, torch.ones(D // 2), 0.1)
call()
before = rss()
go = [threading.Event() for _ in range(5)]
release = threading.Event()
def worker(i):
    go[i].wait(); call(); go[i + 1].set(); release.wait()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in ts:
    t.start()
go[0].set(); go[4].wait()
print((rss() - before) / (T * Hq * D * 4))
release.set()
for t in ts:
    t.join()
"""


def test_idle_threads_keep_no_scratch():
    """Python threads that each ran a call and then wait (a server's workers) do not each
    keep the call's buffer of partial states: the process keeps one (each thread kept its
    own, the size of the largest call it had made, for as long as it lived)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _IDLE_THREADS_SCRIPT], capture_output=True, text=True,
                       timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    grown = float(r.stdout.split()[-1])  # resident memory gained, in buffers
    assert grown < 1.0, f"4 idle threads hold {grown:.1f} buffers of partial states"


def test_calls_at_once_from_two_threads():
    """Two Python threads in the op at once (two LLMs): each call has its own partial states."""
    import threading
    plan, num_pages = random_case(5)
    cases = [make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32, seed=i) for i in range(2)]
    freq = inv_freq_of(64)
    want = [_ops.segment_attention_cpu(q, k, v, plan, freq, 0.1) for q, k, v in cases]
    bad = []

    def run(i):
        q, k, v = cases[i]
        for _ in range(200):
            if not torch.equal(_ops.segment_attention_cpu(q, k, v, plan, freq, 0.1), want[i]):
                bad.append(i)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_errors_are_actionable():
    plan, num_pages = random_case(1)
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        _ops.segment_attention_cpu(q.half(), k, v, plan, None, 0.1)
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        _ops.segment_attention_cpu(q.bfloat16(), k.half(), v.half(), plan, None, 0.1)
    with pytest.raises(RuntimeError, match="v_pool dtype"):
        _ops.segment_attention_cpu(q, k.half(), v, plan, None, 0.1)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        _ops.segment_attention_cpu(q[:, :3], k, v, plan, None, 0.1)
    with pytest.raises(RuntimeError, match="kv_page_ids"):
        _ops.segment_attention_cpu(q, k, v, _plan_with(plan, "kv_page_ids", (0, num_pages)), None, 0.1)
    with pytest.raises(RuntimeError, match="q_rows must be int32"):
        _ops.segment_attention_cpu(q, k, v, _plan_with(plan, "q_rows", plan.q_rows.long()), None, 0.1)
    with pytest.raises(RuntimeError, match=r"query heads \(0\)"):  # (divided by zero: SIGFPE)
        _ops.segment_attention_cpu(q[:, :0], k, v, plan, None, 0.1)
    with pytest.raises(RuntimeError, match="different devices"):  # (ran the fake kernel: garbage out)
        torch.ops.loom.segment_attention(q, k, v, *plan.tensors()[:4], plan.q_rows.to("meta"), *plan.tensors()[5:],
                                         inv_freq_of(64), 0.1)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["key", "query", "scale", "inf_key", "-inf_key"])
def test_nan_inputs_give_nan_as_the_reference(isa, dtype, where):
    """A NaN in a key, a query or the scale makes NaN outputs (as the torch reference), in the
    rows that read it; it used to drop the segment's state (a plausible wrong answer) or give
    zeros. An infinite key element gives infinite scores of both signs over the query heads:
    NaN where a +inf score meets the softmax, as the reference, and exact elsewhere."""
    plan, num_pages = random_case(5, lens=(40, 300, 17), n_threads=3, num_new=(1, 20))
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, dtype, 5)
    scale = 0.125
    if where == "key":
        k[plan.kv_page_ids[0], 0, 1, 3] = float("nan")
    elif where == "query":
        q[0, 1, 5] = float("nan")
    elif where.endswith("inf_key"):
        k[plan.kv_page_ids[0], 0, 1, 3] = float(where[:-4])
    else:
        scale = float("nan")
    ref = segment_attention_torch(q, k, v, plan, inv_freq_of(64), scale)
    out = _ops.segment_attention_cpu(q, k, v, plan, inv_freq_of(64), scale)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    ok = ~ref.isnan()
    torch.testing.assert_close(out[ok].float(), ref[ok].float(), atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------------------------------------
# append_kv and merge_states
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_append_kv(dtype, slot_dtype):
    g = torch.Generator().manual_seed(0)
    k_pool = torch.randn(7, 16, 2, 80, generator=g).to(dtype)
    v_pool = torch.randn(7, 16, 2, 80, generator=g).to(dtype)
    T = 37
    slots = torch.randperm(7 * 16, generator=g)[:T].to(slot_dtype)
    k = torch.randn(T, 2, 80, generator=g).to(dtype)
    v = torch.randn(T, 2, 80, generator=g).to(dtype)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    k_ref.view(-1, 2, 80).index_copy_(0, slots.long(), k)
    v_ref.view(-1, 2, 80).index_copy_(0, slots.long(), v)
    _ops.append_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool, k_ref) and torch.equal(v_pool, v_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_append_kv_float32_into_16bit_pool(dtype):
    """A float32 model's K/V into a 16-bit cache: rounded as Tensor.to rounds."""
    g = torch.Generator().manual_seed(1)
    k_pool, v_pool = torch.zeros(5, 4, 2, 24, dtype=dtype), torch.zeros(5, 4, 2, 24, dtype=dtype)
    k, v = torch.randn(6, 2, 24, generator=g), torch.randn(6, 2, 24, generator=g)
    slots = torch.tensor([19, 0, 7, 8, 3, 12])
    _ops.append_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool.view(-1, 2, 24)[slots], k.to(dtype))
    assert torch.equal(v_pool.view(-1, 2, 24)[slots], v.to(dtype))


def test_append_kv_strided_and_errors():
    k_pool = torch.zeros(2, 4, 2, 8)
    v_pool = torch.zeros(2, 4, 2, 8)
    kv = torch.randn(3, 2, 2, 8)  # [T, 2, Hkv, D]: k and v interleaved, non-contiguous views
    torch.ops.loom.append_kv(k_pool, v_pool, kv[:, 0], kv[:, 1], torch.tensor([7, 0, 3]))
    assert torch.equal(k_pool.view(-1, 2, 8)[[7, 0, 3]], kv[:, 0])
    assert torch.equal(v_pool.view(-1, 2, 8)[[7, 0, 3]], kv[:, 1])
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.loom.append_kv(k_pool, v_pool, kv[:, 0], kv[:, 1], torch.tensor([8, 0, 3]))
    with pytest.raises(RuntimeError, match="pool's dtype"):
        torch.ops.loom.append_kv(k_pool, v_pool, kv[:, 0].double(), kv[:, 1].double(), torch.tensor([1, 0, 3]))
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.loom.append_kv(k_pool, v_pool, kv[:, 0, :1], kv[:, 1, :1], torch.tensor([1, 0, 3]))
    with pytest.raises(RuntimeError, match="pools must be float32, bfloat16 or float16"):
        torch.ops.loom.append_kv(k_pool.long(), v_pool.long(), kv[:, 0], kv[:, 1], torch.tensor([1, 0, 3]))
    for shape in ((4, 2, 2, 0), (4, 2, 0, 8)):  # rows of no bytes (it divided by the row size: SIGFPE)
        e = torch.zeros(shape)
        with pytest.raises(RuntimeError, match="kv heads and head_dim must be >= 1"):
            torch.ops.loom.append_kv(e, e.clone(), torch.zeros(3, *shape[2:]), torch.zeros(3, *shape[2:]),
                                     torch.tensor([0, 1, 2]))


def test_merge_states():
    g = torch.Generator().manual_seed(3)
    E, H, D, rows = 23, 3, 20, 9
    o = torch.randn(E, H, D, generator=g)
    lse = torch.randn(E, H, generator=g) * 5
    lse[4] = -math.inf  # an empty state
    lse[7, 1] = -math.inf
    counts = [3, 0, 1, 5, 2, 4, 0, 6, 2]  # row 1 and row 6 merge nothing
    perm = torch.randperm(E, generator=g).to(torch.int32)
    indptr = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    ref = merge_states_ref(o, lse, indptr, perm, rows)
    out = _ops.merge_states(o, lse, indptr, perm, rows)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[1], torch.zeros(H, D)) and torch.equal(out[6], torch.zeros(H, D))
    lse[perm[indptr[3]], 2] = float("nan")  # row 3, head 2 merges a NaN state: NaN (was skipped)
    ref = merge_states_ref(o, lse, indptr, perm, rows)
    out = _ops.merge_states(o, lse, indptr, perm, rows)
    assert out[3, 2].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[~ref.isnan()], ref[~ref.isnan()], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck: schemas, fake kernels, aliasing
# ---------------------------------------------------------------------------------------------

def test_opcheck_segment_attention():
    plan, num_pages = random_case(2)
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    args = (q, k, v, *plan.tensors(), inv_freq_of(64), 0.125)
    torch.library.opcheck(torch.ops.loom.segment_attention.default, args)


def test_opcheck_append_kv():
    k_pool, v_pool = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    args = (k_pool, v_pool, torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.tensor([0, 5, 6, 11, 2]))
    torch.library.opcheck(torch.ops.loom.append_kv.default, args)


def test_opcheck_merge_states():
    o, lse = torch.randn(6, 2, 8), torch.randn(6, 2)
    args = (o, lse, torch.tensor([0, 2, 2, 6], dtype=torch.int32),
            torch.tensor([5, 0, 1, 2, 3, 4], dtype=torch.int32), 3)
    torch.library.opcheck(torch.ops.loom.merge_states.default, args)


def test_opcheck_build_plan():
    args = (i32([0, 2, 3]), i32([0, 1, 0]), i32([0, 0, 4]), i32([1, 2]), i32([2, 1]), i32([10, 4, 3]),
            i32([0, 1, 2, 3]), i32([5, 6, 7]))
    torch.library.opcheck(torch.ops.loom.build_plan.default, args)


def test_segment_attention_fake_keeps_q_dtype():
    """The fake must return q's dtype (bfloat16 here), as the kernel does."""
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 3)], {0: 3}, {0: [1]})
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g).bfloat16()
    k, v = (torch.randn(2, 4, 2, 16, generator=g).bfloat16() for _ in range(2))
    torch.library.opcheck(torch.ops.loom.segment_attention.default, (q, k, v, *plan.tensors(), torch.empty(0), 0.25))


# random_case(1): 5 jobs over 13 pages (job 0: 2 pages for 15 keys), 11 entries, 5 rows, shifts.
# Where it can, each bad value is one the kernel would read harmlessly had its check been
# missing (an unused page, a page of the next job), so that the test fails rather than crashes.
BAD_PLANS = [  # (plan tensor, (index, value) or a new tensor, message)
    ("kv_indptr", (0, 1), "kv_indptr must start at 0"),
    ("q_indptr", (2, 3), "q_indptr decreases at index 2"),
    ("kv_indptr", (-1, 14), "kv_indptr ends at 14 past its 13 elements"),
    ("kv_page_ids", (1, -1), r"kv_page_ids\[1\] = -1 is outside"),
    ("q_indptr", (-1, 10), "q_indptr must end at num_entries"),
    ("kv_len", (0, 33), r"kv_len\[0\] = 33 does not fit the job's 2 pages"),
    ("kv_len", (3, -1), r"kv_len\[3\] = -1 does not fit"),
    ("merge_entries", (0, 11), r"merge_entries\[0\] = 11 is outside"),
    ("q_rows", (0, 5), r"q_rows\[0\] = 5 is outside"),
    ("causal_limit", torch.zeros(10, dtype=torch.int32), "must all have num_entries = 11"),
    ("merge_indptr", torch.tensor([0, 1, 2, 3, 7, 11, 11], dtype=torch.int32), r"merge_indptr must have T \+ 1 = 6"),
]


@pytest.mark.parametrize("name,value,match", BAD_PLANS)
def test_segment_attention_refuses_bad_plans(name, value, match):
    """Each check of the plan in csrc/ops_attention.cpp refuses its bad input, by its message."""
    plan, num_pages = random_case(1)
    assert plan.kv_indptr.tolist()[:2] == [0, 2] and plan.kv_len[0] <= 16 and plan.has_shift
    assert (plan.kv_page_ids.numel(), plan.q_rows.numel(), plan.num_rows) == (13, 11, 5)
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        _ops.segment_attention_cpu(q, k, v, _plan_with(plan, name, value), inv_freq_of(64), 0.125)


@pytest.mark.parametrize("case", ["odd head_dim with shifts", "short inv_freq", "k_pool head_dim",
                                  "v_pool not contiguous", "page_size 0", "v_pool shape"])
def test_segment_attention_refuses_bad_tensors(case):
    """Each check of q, the pools and inv_freq in csrc/ops_attention.cpp, by its message."""
    plan, num_pages = random_case(1)
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    freq = inv_freq_of(64)
    if case == "odd head_dim with shifts":
        q, k, v, match = q[..., :63], k[..., :63].contiguous(), v[..., :63].contiguous(), "need an even head_dim"
    elif case == "short inv_freq":
        freq, match = freq[:10], "inv_freq must be a CPU tensor of head_dim / 2 = 32"
    elif case == "k_pool head_dim":
        k, v, match = torch.cat([k, k[..., :1]], -1), torch.cat([v, v[..., :1]], -1), r"q \(64\) and k_pool \(65\)"
    elif case == "v_pool not contiguous":
        v, match = v.transpose(0, 1).contiguous().transpose(0, 1), "k_pool and v_pool must be contiguous"
    elif case == "page_size 0":
        k, v, match = k[:, :0], v[:, :0], "page_size must be positive"
    else:
        v, match = torch.cat([v, v[:1]]), "v_pool shape"
    with pytest.raises(RuntimeError, match=match):
        _ops.segment_attention_cpu(q, k, v, plan, freq, 0.125)


@pytest.mark.parametrize("case", ["negative entry", "indptr past the entries", "lse rows", "indptr decreases"])
def test_merge_states_refuses_bad_arguments(case):
    """Each check of loom::merge_states' arguments refuses its bad input, by its message."""
    g = torch.Generator().manual_seed(4)
    o, lse = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, generator=g)
    indptr, entries = [0, 2, 2, 6], [5, 0, 1, 2, 3, 4]
    match = {"negative entry": r"merge_entries\[0\] = -1 is outside", "indptr past the entries": "ends at 7 past the 6",
             "lse rows": r"lse must be \[E, H\] = \[6, 2\], got shape \[7, 2\]", "indptr decreases": "decreases at index 2"}[case]
    if case == "negative entry":
        entries[0] = -1
    elif case == "indptr past the entries":
        indptr[-1] = 7
    elif case == "lse rows":
        lse = torch.randn(7, 2, generator=g)
    else:
        indptr[2] = 1
    with pytest.raises(RuntimeError, match=match):
        _ops.merge_states(o, lse, i32(indptr), i32(entries), 3)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("page_size", [5, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_sizes_off_the_tiles(isa, page_size, dtype):
    """Pages that do not hold whole tiles of keys (5), or whole 16-key blocks of the amx
    path (24: a multiple of 8, not of 16): key tiles start and 16-key blocks cross pages
    mid-page. 9 decode rows (18 queries per kv head) and 30 prefill rows over 150 shared
    keys: the many-query paths (on tiles for bfloat16 with the amx build)."""
    rng = random.Random(page_size)
    L, rows = 150, 9
    seg_len = {0: L, **{i + 1: rng.randint(1, 20) for i in range(rows)}, rows + 1: 70}
    threads = [ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1) for i in range(rows)]
    threads.append(ThreadStep([(0, 0), (rows + 1, 0)], rows + 1, 30))
    seg_pages, num_pages = make_pool(seg_len, page_size, rng)
    plan = build_plan_py(threads, seg_len, seg_pages)
    check(plan, *make_tensors(plan, num_pages, page_size, 4, 2, 64, dtype, page_size))


def test_q_with_strided_last_dim():
    """q whose last dim is not contiguous (a transposed view) is read as the values it shows."""
    plan, num_pages = random_case(3)
    _, k, v = make_tensors(plan, num_pages, 16, 4, 2, 64, torch.float32)
    q = torch.randn(plan.num_rows, 64, 4, generator=torch.Generator().manual_seed(3)).transpose(1, 2)
    assert q.stride(2) != 1
    check(plan, q, k, v)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("jump", ["after the first tile", "at one of the last keys"])
def test_scores_that_jump_far_above_the_running_max(isa, q_dtype, rows, jump):
    """Scores 0, then far higher: 79 from key 64 on (past the first tile), or 100 at key 193
    alone (in the last tile of 3 keys, an odd position in it) of 195. The running max must
    reach the new score before the weights e^(s - max) are formed: e^79 ~ 2e34 or e^100 as
    weights, with V ~ 1000, overflow float32. rows 1 (2 queries per kv head: the few-query
    path) or 8 (16: the many-query path; on tiles with a lazy max for bfloat16 on amx)."""
    L, Hkv, G, D = 195, 2, 2, 64
    seg_len = {0: L, **{i + 1: 1 for i in range(rows)}}
    first = -(-L // 16)
    seg_pages = {0: list(range(first)), **{i + 1: [first + i] for i in range(rows)}}
    plan = build_plan_py([ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1) for i in range(rows)], seg_len, seg_pages)
    num_pages = first + rows
    q = torch.ones(plan.num_rows, Hkv * G, D)
    k = torch.zeros(num_pages, 16, Hkv, D)
    if jump == "after the first tile":
        k.view(-1, Hkv, D)[64:L] = 79 / 64  # q . k = 79 with scale 1 (exact in bfloat16)
    else:
        k.view(-1, Hkv, D)[193] = 100 / 64
    v = torch.randn(num_pages, 16, Hkv, D, generator=torch.Generator().manual_seed(0)) * 1000
    q, k, v = q.to(q_dtype), k.bfloat16(), v.bfloat16()
    ref = segment_attention_torch(q, k, v, plan, inv_freq_of(D), 1.0)
    out = _ops.segment_attention_cpu(q, k, v, plan, inv_freq_of(D), 1.0)
    assert out.isfinite().all()
    # (float32 sums of ~130 values ~1000 in another order: ~1e-3 apart)
    torch.testing.assert_close(out.float(), ref.float(), atol=1000 * TOL[q_dtype], rtol=TOL[q_dtype])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("rows,G,H", [(64, 1, 1), (16, 2, 2)])
def test_float32_queries_over_bfloat16_cache_accuracy(isa, rows, G, H):
    """float32 queries over a bfloat16 cache (a float32 model's), many queries: as accurate
    as torch's float32 attention over the same bfloat16 K/V (within 4x its error against
    float64; the amx path splits q into three bfloat16 parts and P into two to get there,
    measured 1.5-2.6x). Queries x4: scores up to ~20, where a q rounded to 16 mantissa bits
    would be off by ~1e-4."""
    out, loom, torch32 = _errors_against_float64(rows, G, H, 1024, torch.bfloat16)
    assert out.dtype == torch.float32
    assert loom <= 4 * torch32 + 1e-7, (loom, torch32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_split_into_key_chunks(dtype):
    """600 causal rows after 32 cached tokens of their segment, one query per kv head, two
    threads: the schedule cuts the 632 keys into two chunks (Flash-Decoding), and a block
    of 64 rows has causal limits on both sides of the second chunk's first key (320): its
    rows up to there see none of that chunk's keys, an empty partial state in a work item
    that has keys (not a NaN from exp(-inf - -inf))."""
    seg_len = {0: 632}
    seg_pages, num_pages = make_pool(seg_len, 16, random.Random(6))
    plan = build_plan_py([ThreadStep([(0, 0)], 0, 600)], seg_len, seg_pages)
    check_with_threads(2, plan, *make_tensors(plan, num_pages, 16, 2, 2, 64, dtype, 6))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8])
def test_scores_far_below_zero(isa, dtype, rows):
    """Every score near -100 (a common offset softmax ignores): the output is the weighted
    mean of V as for scores near 0. 33 keys, so that the last tile holds one key and, on
    the few-query path (rows 1), the rest of its score rows still hold the previous tile's
    probabilities (up to 1): taken for scores, they would make every weight e^-101 = 0."""
    L, Hkv, G, D = 33, 2, 2, 64
    seg_len = {0: L, **{i + 1: 1 for i in range(rows)}}
    seg_pages = {0: [0, 1, 2], **{i + 1: [3 + i] for i in range(rows)}}
    plan = build_plan_py([ThreadStep([(0, 0), (i + 1, 0)], i + 1, 1) for i in range(rows)], seg_len, seg_pages)
    g = torch.Generator().manual_seed(rows)
    q = -torch.ones(plan.num_rows, Hkv * G, D)
    k = 100 / 64 + 0.01 * torch.randn(3 + rows, 16, Hkv, D, generator=g)  # q . k = -100 +- 0.1
    v = torch.randn(3 + rows, 16, Hkv, D, generator=g)
    check(plan, q.to(dtype), k.to(dtype), v.to(dtype), scale=1.0)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("where", ["key", "inf_key", "-inf_key", "inf_value"])
def test_float16_nan_and_inf_inputs_as_the_reference(isa, where):
    """As test_nan_inputs_give_nan_as_the_reference for a float16 cache, the bad element in
    the tail of a head dim past the last whole vector (D = 76, element 74), which every
    build widens one half at a time (the baseline build all): an infinite half stays
    infinite."""
    plan, num_pages = random_case(5, lens=(40, 300, 17), n_threads=3, num_new=(1, 20))
    q, k, v = make_tensors(plan, num_pages, 16, 4, 2, 76, torch.float16, 5)
    if where == "key":
        k[plan.kv_page_ids[0], 0, 1, 74] = float("nan")
    elif where == "inf_value":
        v[plan.kv_page_ids[0], 0, 1, 74] = float("inf")
    else:
        k[plan.kv_page_ids[0], 0, 1, 74] = float(where[:-4])
    ref = segment_attention_torch(q, k, v, plan, inv_freq_of(76), 0.125)
    out = _ops.segment_attention_cpu(q, k, v, plan, inv_freq_of(76), 0.125)
    assert not ref.isfinite().all()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    ok = ref.isfinite()
    torch.testing.assert_close(out[ok].float(), ref[ok].float(), atol=TOL[torch.float16], rtol=TOL[torch.float16])


def test_append_kv_refuses_mismatched_arguments():
    """Each argument check of append_kv, and nothing written when one fails: a negative
    slot, v or slots not matching k, pools of two shapes, strided pools, a 16-bit k of
    the other 16-bit type (only float32 is rounded to the pool's dtype)."""
    k_pool, v_pool = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    k, v, slots = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([7, 0, 3])
    strided = torch.zeros(4, 2, 2, 8).transpose(0, 1)
    half = torch.zeros(2, 4, 2, 8, dtype=torch.float16)
    cases = [((k_pool, v_pool, k, v, torch.tensor([7, -1, 3])), r"slots\[1\] = -1 is outside"),
             ((k_pool, v_pool, k, v[:2], slots), "v shape"),
             ((k_pool, v_pool, k, v, slots[:2]), r"slots must be \[T\] with T = 3"),
             ((k_pool, torch.zeros(3, 4, 2, 8), k, v, slots), "v_pool shape"),
             ((strided, strided.clone(memory_format=torch.preserve_format), k, v, slots), "must be contiguous"),
             ((half, half.clone(), k.bfloat16(), v.bfloat16(), slots), "must have the pool's dtype")]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.loom.append_kv(*args)
        assert not args[0].any() and not args[1].any()


def test_append_kv_many_rows_on_two_threads():
    """A prefill's rows are split between threads: each thread's rows land in their slots."""
    g = torch.Generator().manual_seed(4)
    k_pool, v_pool = torch.zeros(40, 16, 2, 80), torch.zeros(40, 16, 2, 80)
    T = 600
    slots = torch.randperm(40 * 16, generator=g)[:T]
    k, v = torch.randn(T, 2, 80, generator=g), torch.randn(T, 2, 80, generator=g)
    with torch_threads(2):
        torch.ops.loom.append_kv(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool.view(-1, 2, 80)[slots], k) and torch.equal(v_pool.view(-1, 2, 80)[slots], v)
