"""Fused layer ops (csrc/fused_cpu.cpp) against the ATen code they replace, and the
fused model forward against the unfused one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine.linear_ops  # noqa: F401  registers torch.ops.loom.* and their fakes
from engine.model import rms_norm as rms_norm_ref
from engine.rope import Rotary, apply_rotary
from conftest import torch_threads

ops = torch.ops.loom


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DTYPES = [torch.float32, torch.bfloat16]


def _close(got, want):
    """float32: 1e-5; bfloat16: the same ATen rounding points, so equal up to one
    bfloat16 step where float32 sums or contractions land on the other side of a tie."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -7)
        assert (got != want).float().mean() < 0.02, "bfloat16 results differ from ATen's too often"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 96), (300, 64), (2, 1000)])
def test_rms_norm(shape, dtype):
    g = _g(sum(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    x, w = x.to(dtype), w.to(dtype)
    _close(ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (9, 96), (257, 33)])
def test_add_rms_norm_updates_residual_in_place(rows, d, dtype):
    g = _g(rows * d)
    h, r, w = (torch.randn(n, generator=g).to(dtype) for n in ((rows, d), (rows, d), (d,)))
    want_h = h + r
    want = rms_norm_ref(want_h, w, 1e-5)
    y = ops.add_rms_norm(h, r, w, 1e-5)
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)
    _close(y, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 16), (6, 2, 64), (7, 1, 80), (8, 4, 128)])
@pytest.mark.parametrize("norm", [False, True])
def test_qkv_prep_matches_norm_and_rotary(T, hq, hk, d, norm, dtype):
    g = _g(T * 100 + hq * 10 + d + norm)
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype)
    qn, kn = (torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)) if norm \
        else (None, None)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rot = Rotary(inv_freq, 64, "cpu", dtype)
    pos = torch.randint(0, 500, (T,), generator=g)  # past the table: covering() extends it
    cos_all, sin_all = rot.covering(pos)
    q, k, v = ops.qkv_prep(qkv, qn, kn, cos_all, sin_all, pos, hq, hk, d, 1e-6)
    q_ref = qkv[:, :hq * d].view(T, hq, d)
    k_ref = qkv[:, hq * d:(hq + hk) * d].view(T, hk, d)
    if norm:
        q_ref, k_ref = rms_norm_ref(q_ref, qn, 1e-6), rms_norm_ref(k_ref, kn, 1e-6)
    cos, sin = rot.tables(pos)
    _close(q, apply_rotary(q_ref, cos, sin))
    _close(k, apply_rotary(k_ref, cos, sin))
    torch.testing.assert_close(v, qkv[:, (hq + hk) * d:].view(T, hk, d), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 3072), (2, 3, 70)])
def test_silu_mul(shape, dtype):
    x = (torch.randn(*shape, generator=_g(shape[-1])) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    _close(ops.silu_mul(x), F.silu(gate) * up)


def test_silu_mul_extreme_gates():
    gate = torch.tensor([[-1e4, -100.0, -88.5, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.5, 100.0, 1e4]])
    x = torch.cat([gate, torch.full_like(gate, 1.5)], dim=-1)
    want = F.silu(gate) * 1.5
    got = ops.silu_mul(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # blown-up activations as torch has them: silu(-1e38) = -0 (was -0.42), silu(-inf) = NaN
    gate = torch.tensor([[-1e38, float("-inf"), 1e38]])
    got = ops.silu_mul(torch.cat([gate, torch.ones_like(gate)], dim=-1))
    torch.testing.assert_close(got, F.silu(gate), equal_nan=True)


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="expected"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="features"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="differ"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6)
    cos = sin = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="outside the rotary tables"):
        ops.qkv_prep(torch.randn(1, 48), None, None, cos, sin, torch.tensor([10]), 1, 1, 16, 1e-6)
    with pytest.raises(RuntimeError, match=r"qkv must be \[T"):
        ops.qkv_prep(torch.randn(1, 47), None, None, cos, sin, torch.tensor([0]), 1, 1, 16, 1e-6)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(torch.randn(2, 7))
    # zero heads: an error (it divided by the row width: SIGFPE)
    with pytest.raises(RuntimeError, match=r"num_heads \(0\) must be a positive multiple"):
        ops.qkv_prep(torch.zeros(3, 0), None, None, cos, sin, torch.tensor([0, 1, 2]), 0, 0, 8, 1e-6)
    with pytest.raises(RuntimeError, match=r"num_heads \(3\) must be a positive multiple of num_kv_heads \(2\)"):
        ops.qkv_prep(torch.zeros(1, 56), None, None, cos, sin, torch.tensor([0]), 3, 2, 8, 1e-6)
    # rows of no features: nothing to do, no crash
    for op in (lambda x: ops.rms_norm(x, torch.zeros(0), 1e-6), ops.silu_mul):
        assert op(torch.zeros(5, 0)).shape == (5, 0)


def test_opcheck():
    g = _g(0)
    torch.library.opcheck(ops.rms_norm, (torch.randn(3, 16, generator=g), torch.randn(16, generator=g), 1e-6))
    torch.library.opcheck(ops.add_rms_norm, (torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g),
                                             torch.randn(16, generator=g), 1e-6))
    cos, sin = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    torch.library.opcheck(ops.qkv_prep, (torch.randn(3, 64, generator=g), torch.randn(16, generator=g),
                                         torch.randn(16, generator=g), cos, sin, torch.tensor([0, 5, 19]),
                                         2, 1, 16, 1e-6))
    torch.library.opcheck(ops.silu_mul, (torch.randn(3, 10, generator=g),))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama3_rope"])
def test_fused_forward_matches_aten_forward(name, dtype, make_llm):
    llm = make_llm(name, dtype=dtype)
    assert llm.model.fused, f"{dtype} on the CPU with engine._C built should take the fused path"
    ids = list(range(3, 40))
    fused = llm.score(ids)[0]
    llm.model.fused = False
    try:
        aten = llm.score(ids)[0]
    finally:
        llm.model.fused = True
    if dtype == "float32":
        torch.testing.assert_close(fused, aten, atol=1e-4, rtol=1e-4)
    else:  # same rounding points; only rare one-step bfloat16 differences may propagate
        assert (fused.argmax(-1) == aten.argmax(-1)).float().mean() >= 0.95
        assert (fused - aten).abs().max() < 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["qwen3", "llama_bias"])
def test_one_call_per_layer_matches_per_op_forward(name, dtype, make_llm):
    """engine._C.decoder_layer runs the fused forward's per-layer ops in one call: same
    kernels in the same order, so the logits and the sampled tokens are identical."""
    from engine import SamplingParams

    llm = make_llm(name, dtype=dtype)
    step = llm.model.layer_step
    assert step is not None, "the 'cpu' backend with engine._C built should take the one-call-per-layer path"
    ids = list(range(3, 40))
    try:
        got = [llm.score(ids)[0]]
        got.append([c.token_ids for c in llm.generate(
            [ids], SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=5))[0].outputs])
        llm.model.layer_step = None
        want = [llm.score(ids)[0]]
        want.append([c.token_ids for c in llm.generate(
            [ids], SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=5))[0].outputs])
    finally:
        llm.model.layer_step = step
    assert torch.equal(got[0], want[0])
    assert got[1] == want[1]


def test_the_torch_backend_attends_through_its_own_function_in_the_fused_forward(make_llm):
    """engine._C.decoder_layer runs the 'cpu' backend's attention: with attention_backend='torch'
    (the reference the tests compare with) the fused forward goes op by op and every layer
    attends through segment_attention_torch."""
    from engine.attention import segment_attention_torch

    llm = make_llm("qwen3", attention_backend="torch")
    model = llm.model
    assert model.fused and model.layer_step is None
    assert model.attention is segment_attention_torch
    calls = []

    def attention(*args):
        calls.append(1)
        return segment_attention_torch(*args)
    model.attention = attention
    try:
        llm.score(list(range(3, 20)))
    finally:
        model.attention = segment_attention_torch
    assert len(calls) == llm.config.num_layers


def test_decoder_layer_rejects_bad_arguments():
    from engine import _C

    h = torch.zeros(2, 8)
    with pytest.raises(TypeError, match="takes"):
        _C.decoder_layer(h, h)
    with pytest.raises(TypeError, match="layer must be a tuple of 15"):
        _C.decoder_layer(h, h, (), (), h, h, None)
    with pytest.raises(TypeError, match="x must be a tensor"):
        _C.decoder_layer(h, "x", (), (), h, h, None)
    layer = (h, None, 2 ** 70) + (None,) * 12
    with pytest.raises(TypeError, match="qkv_n must be an int"):
        _C.decoder_layer(h, h, layer, (h,) * 14 + (1.0, 1, 1, 8, 1e-6), h, h, None)


def test_decoder_layer_kernel_errors_are_runtime_errors(make_llm):
    """A check failing inside the layer (here: x has the wrong width for the qkv weight)
    comes back as one RuntimeError naming it, and the engine stays usable."""
    from engine import _C

    llm = make_llm("qwen3")
    t = torch.zeros(1)
    step = (t,) * 14 + (1.0, 1, 1, 16, 1e-6)
    with pytest.raises(RuntimeError, match="features"):
        _C.decoder_layer(torch.zeros(2, 7), torch.zeros(2, 7), llm.model.layer_args[0], step, t, t, None)
    assert llm.score(list(range(3, 12)))[0].isfinite().all()


def test_rms_norm_fake_non_contiguous_input():
    """The kernel returns a contiguous y for a strided x: the fake must say so too."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g).t()
    assert not x.is_contiguous()
    torch.library.opcheck(torch.ops.loom.rms_norm, (x, torch.randn(16, generator=g), 1e-6))


def test_add_rms_norm_fake_bfloat16():
    g = torch.Generator().manual_seed(2)
    h, r, w = (torch.randn(*s, generator=g).bfloat16() for s in ((3, 16), (3, 16), (16,)))
    torch.library.opcheck(torch.ops.loom.add_rms_norm, (h, r, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_add_eps_inside_the_root(dtype):
    """Rows of small values, where eps is most of mean(x^2): y = w * x / sqrt(mean(x^2) + eps)
    in rms_norm, add_rms_norm and qkv_prep's per-head norms."""
    g = _g(11)
    x, r, w = (torch.randn(*s, generator=g) for s in ((5, 96), (5, 96), (96,)))
    x, r, w = (x * 1e-3).to(dtype), (r * 1e-3).to(dtype), w.to(dtype)
    _close(ops.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    h = x.clone()
    _close(ops.add_rms_norm(h, r, w, 1e-5), rms_norm_ref(x + r, w, 1e-5))
    d, qkv = 16, (torch.randn(3, 3 * 16, generator=g) * 1e-3).to(dtype)
    qn, kn = torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    cos, sin = torch.ones(4, d // 2, dtype=dtype), torch.zeros(4, d // 2, dtype=dtype)  # position 0: no rotation
    q, k, _ = ops.qkv_prep(qkv, qn, kn, cos, sin, torch.tensor([0, 1, 3]), 1, 1, d, 1e-5)
    _close(q[:, 0], rms_norm_ref(qkv[:, :d], qn, 1e-5))
    _close(k[:, 0], rms_norm_ref(qkv[:, d:2 * d], kn, 1e-5))


def test_fused_ops_refuse_bad_arguments():
    """The argument checks not covered above, each an error rather than a read or write
    past a buffer: head_dim over the stack buffer's 1024, a norm row over 16384 features,
    a strided residual, one q/k norm weight of two, norm weights of the wrong size, a
    negative position, rotary tables of head_dim (not head_dim / 2) columns."""
    cos = sin = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="head_dim must be even and <= 1024, got 1026"):
        big = torch.randn(4, 513)
        ops.qkv_prep(torch.randn(1, 3 * 1026), None, None, big, big, torch.tensor([0]), 1, 1, 1026, 1e-6)
    with pytest.raises(RuntimeError, match="at most 16384 features, got 16385"):
        ops.rms_norm(torch.randn(1, 16385), torch.randn(16385), 1e-6)
    h = torch.randn(8, 4).t()
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        ops.add_rms_norm(h, torch.randn(4, 8), torch.randn(8), 1e-6)
    qkv = torch.randn(1, 48)
    with pytest.raises(RuntimeError, match="give both q_norm and k_norm or neither"):
        ops.qkv_prep(qkv, torch.randn(16), None, cos, sin, torch.tensor([0]), 1, 1, 16, 1e-6)
    with pytest.raises(RuntimeError, match="q/k norm weights must have head_dim=16 elements"):
        ops.qkv_prep(qkv, torch.randn(16), torch.randn(8), cos, sin, torch.tensor([0]), 1, 1, 16, 1e-6)
    with pytest.raises(RuntimeError, match="position -1 is outside the rotary tables"):
        ops.qkv_prep(qkv, None, None, cos, sin, torch.tensor([-1]), 1, 1, 16, 1e-6)
    wide = torch.randn(10, 16)
    with pytest.raises(RuntimeError, match="cos/sin tables must be"):
        ops.qkv_prep(qkv, None, None, wide, wide, torch.tensor([0]), 1, 1, 16, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_on_two_threads(dtype):
    """Many rows (prefill) are split between threads: each thread's rows are normed (and
    their residual added) once, in their own place."""
    g = _g(12)
    R, D = 1100, 64  # (a task takes at least 512 rows of 64)
    h, r, w = (torch.randn(*s, generator=g).to(dtype) for s in ((R, D), (R, D), (D,)))
    x = torch.randn(R, 2 * D, generator=g).to(dtype)
    hq, hk, d, T = 8, 4, 128, 40  # 2,048 values a row: 16 rows a task
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rot = Rotary(inv_freq, 64, "cpu", dtype)
    pos = torch.randint(0, 64, (T,), generator=g)
    cos_all, sin_all = rot.covering(pos)
    want_h = h + r
    with torch_threads(2):
        y = ops.add_rms_norm(h, r, w, 1e-6)
        s = ops.silu_mul(x)
        q, k, v = ops.qkv_prep(qkv, None, None, cos_all, sin_all, pos, hq, hk, d, 1e-6)
    torch.testing.assert_close(h, want_h, atol=0, rtol=0)
    _close(y, rms_norm_ref(want_h, w, 1e-6))
    _close(s, F.silu(x[:, :D]) * x[:, D:])
    cos, sin = rot.tables(pos)
    _close(q, apply_rotary(qkv[:, :hq * d].view(T, hq, d), cos, sin))
    _close(k, apply_rotary(qkv[:, hq * d:(hq + hk) * d].view(T, hk, d), cos, sin))
    torch.testing.assert_close(v, qkv[:, (hq + hk) * d:].view(T, hk, d), atol=0, rtol=0)


def test_decoder_layer_step_tuple_size():
    from engine import _C

    h = torch.zeros(2, 8)
    layer = (h, None, 8) + (None,) * 12
    with pytest.raises(TypeError, match="step must be a tuple of 19 items"):
        _C.decoder_layer(h, h, layer, (h,) * 14 + (1.0, 1, 1, 8), h, h, None)
