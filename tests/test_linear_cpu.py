"""Loom's packed-panel GEMM (torch.ops.loom.linear_packed) against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine.linear_ops  # noqa: F401  registers torch.ops.loom.* and their fakes
from _cpu_isa import GEMM_ISAS, ISAS, isa  # noqa: F401  (isa: the fixture)
from conftest import torch_threads


@pytest.mark.parametrize("isa", GEMM_ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 17, 300])
@pytest.mark.parametrize("N,K", [(32, 16), (37, 99), (1000, 77), (96, 512), (5, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_packed_matches_f_linear(M, N, K, bias, isa):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    wp = torch.ops.loom.pack_linear_weight(w)
    y = torch.ops.loom.linear_packed(x, wp, b, N)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=2e-5 * K ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 8, 9, 16, 17, 33, 300])
@pytest.mark.parametrize("N,K", [(37, 99), (1000, 77), (5, 3), (33, 64), (100, 512)])
def test_linear_packed_bfloat16_is_float32_math_rounded(M, N, K, isa):
    """bfloat16 weights and activations, float32 accumulation, output rounded once. (On
    the amx build, K a multiple of 32 runs on tiles from one row: partial row blocks,
    partial and odd last panels; an odd K pads the packed k pairs.)"""
    g = torch.Generator().manual_seed(M + N + K)
    w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), b, N)
    assert y.dtype == torch.bfloat16
    want = F.linear(x.float(), w.float(), b.float())
    # at most one bfloat16 rounding step apart (summation order differs in float32)
    torch.testing.assert_close(y.float(), want, atol=1e-4 * K ** 0.5, rtol=2 ** -8)


@pytest.mark.parametrize("isa", GEMM_ISAS, indirect=True)
@pytest.mark.parametrize("M", [1, 3, 5, 8, 33, 300])
@pytest.mark.parametrize("N,K", [(17, 64), (100, 30), (1536, 512), (37, 99)])
def test_linear_packed_bfloat16_is_the_float32_kernel_rounded(M, N, K, isa):
    """The FMA kernels read bfloat16 activations and round bfloat16 outputs in place (even
    K; odd K through float32 copies): bitwise the float32 kernel on the widened values,
    rounded by torch's .to() (the same products in the same order)."""
    g = torch.Generator().manual_seed(M + N + K)
    w, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g)
    y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), b, N)
    ref = torch.ops.loom.linear_packed(x.float(), torch.ops.loom.pack_linear_weight(w.float()), b, N)
    assert torch.equal(y, ref.bfloat16())


def test_linear_packed_batched_shape_and_errors():
    w = torch.randn(40, 24)
    wp = torch.ops.loom.pack_linear_weight(w)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(torch.ops.loom.linear_packed(x, wp, None, 40), F.linear(x, w))
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.loom.linear_packed(torch.randn(2, 23), wp, None, 40)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.loom.pack_linear_weight(w.double())
    with pytest.raises(RuntimeError, match="but the packed weight is"):
        torch.ops.loom.linear_packed(torch.randn(2, 24).bfloat16(), wp, None, 40)
    with pytest.raises(RuntimeError, match="n_out"):
        torch.ops.loom.linear_packed(torch.randn(2, 24), wp, None, 70)
    # a packed weight that is not contiguous: refused (an expanded one used to crash, a strided
    # one to give wrong outputs)
    for bad in (wp.expand(2, *wp.shape)[0].as_strided(wp.shape, (0, 16, 1)),
                wp.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(RuntimeError, match="must be contiguous"):
            torch.ops.loom.linear_packed(torch.randn(2, 24), bad, None, 40)


def test_bfloat16_odd_k_padding_is_not_a_feature():
    """bfloat16 packs k pairs, an odd K padded with zeros: x one feature short of an even-K
    weight is refused, not multiplied against all but the last column."""
    w = torch.randn(40, 24).bfloat16()
    with pytest.raises(RuntimeError, match="features, weight expects 24"):
        torch.ops.loom.linear_packed(torch.randn(3, 23).bfloat16(), torch.ops.loom.pack_linear_weight(w), None, 40)
    w = torch.randn(40, 23).bfloat16()
    x = torch.randn(3, 23).bfloat16()
    y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), None, 40)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=1e-4 * 23 ** 0.5, rtol=2 ** -8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_input_features_is_a_clear_error(dtype):
    """K = 0 (was a division by zero on the bfloat16 tile path, an ambiguous reshape else)."""
    with pytest.raises(RuntimeError, match="no input features"):
        torch.ops.loom.pack_linear_weight(torch.randn(40, 0).to(dtype))


def test_linear_packed_opcheck():
    w = torch.randn(40, 24)
    torch.library.opcheck(torch.ops.loom.pack_linear_weight, (w,))
    wp = torch.ops.loom.pack_linear_weight(w)
    torch.library.opcheck(torch.ops.loom.linear_packed, (torch.randn(5, 24), wp, torch.randn(40), 40))
    wb = torch.ops.loom.pack_linear_weight(w.bfloat16())
    torch.library.opcheck(torch.ops.loom.linear_packed, (torch.randn(5, 24).bfloat16(), wb, None, 40))
    w_odd = torch.randn(40, 25).bfloat16()  # (k pairs: the fake's shape pads K too)
    torch.library.opcheck(torch.ops.loom.pack_linear_weight, (w_odd,))
    wo = torch.ops.loom.pack_linear_weight(w_odd)
    torch.library.opcheck(torch.ops.loom.linear_packed, (torch.randn(3, 25).bfloat16(), wo, None, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(1, 1), (17, 3), (33, 64), (100, 7), (16, 16)])
def test_packed_weight_is_the_documented_layout(dtype, N, K):
    """pack_linear_weight's panels, element for element: float32 [N/16, K, 16], bfloat16
    [N/16, K/2, 16 x 2] (k, k + 1 of an output side by side), N and an odd K padded with
    zeros (bfloat16 is packed as 32-bit words: the same layout, moved faster)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 100 + K)).to(dtype)
    Np = -(-N // 16) * 16
    wp = torch.ops.loom.pack_linear_weight(w)
    if dtype == torch.float32:
        ref = F.pad(w, (0, 0, 0, Np - N)).view(Np // 16, 16, K).transpose(1, 2)
    else:
        Kp = K + K % 2
        ref = F.pad(w, (0, Kp - K, 0, Np - N)).view(Np // 16, 16, Kp // 2, 2).permute(0, 2, 1, 3)
        ref = ref.reshape(Np // 16, Kp // 2, 32)
    assert wp.dtype == dtype and wp.is_contiguous() and torch.equal(wp, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(1, 1), (17, 3), (33, 64), (100, 7), (16, 16)])
def test_rows_read_from_the_packed_panels(dtype, N, K):
    """Linear.rows (a tied model's token lookup in its packed head) gives W[ids] exactly,
    for any N and K the packing pads, as a new contiguous tensor."""
    from engine.model import Linear
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 100 + K)).to(dtype)
    lin = Linear(w, pack=True)
    assert lin.packed
    ids = torch.tensor([0, N - 1, N // 2, 0, N - 1])
    r = lin.rows(ids)
    assert r.dtype == dtype and r.shape == (5, K) and r.is_contiguous() and torch.equal(r, w[ids])


def test_a_tied_model_keeps_one_copy_of_its_table(make_llm):
    """Tied embeddings with a packed head: no separate table (the lookup reads the head)."""
    for name, tied in [("qwen2", True), ("llama", False)]:
        m = make_llm(name).model
        assert m.lm_head.packed and (m.embed is None) == tied
        ids = torch.tensor([3, 1, 4, 1, 5])
        assert m.embed_tokens(ids).shape == (5, m.cfg.hidden_size)


@pytest.mark.parametrize("tied", [True, False])
def test_unpacked_head_is_not_held_while_the_layers_load(tmp_path, monkeypatch, tied):
    """A packed head's unpacked weight (a tied model's table) is dropped once packed: in
    another dtype than the checkpoint's it is a copy, which was held until every layer had
    loaded (0.6 GB of a 0.6B model's peak, float32 from bfloat16)."""
    import weakref
    from engine import LLM, model as M
    from engine.demo import make_random_model
    d = make_random_model(str(tmp_path / "m"), hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                          intermediate=128, tie_word_embeddings=tied)  # (a float32 checkpoint)
    refs, alive = {}, []
    take = M.CausalLM._take

    def spy(self, w, name, *args, **kwargs):
        if name == "model.layers.0.self_attn.q_proj.weight":
            alive.extend(n for n, r in refs.items() if r() is not None)
        t = take(self, w, name, *args, **kwargs)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and t is not None:
            refs[name] = weakref.ref(t)
        return t
    monkeypatch.setattr(M.CausalLM, "_take", spy)
    m = LLM(d, dtype="bfloat16", kv_cache_tokens=64).model
    assert m.lm_head.packed and len(refs) == (1 if tied else 2)
    assert alive == ([] if tied else ["model.embed_tokens.weight"])  # (an untied table is the model's)


def test_linear_packed_refuses_mixed_devices():
    wp = torch.ops.loom.pack_linear_weight(torch.randn(40, 24))
    with pytest.raises(RuntimeError, match="different devices"):
        torch.ops.loom.linear_packed(torch.randn(5, 24), wp.to("meta"), None, 40)


def test_linear_packed_refuses_mismatched_arguments():
    """n_out must fall in the last panel (at most 15 outputs of padding), a bias has n_out
    elements, and a packed weight has lines of 16 outputs."""
    w = torch.randn(40, 24)
    wp, x = torch.ops.loom.pack_linear_weight(w), torch.randn(2, 24)
    for n_out in (32, 20, 49):  # 3 panels: 33..48 outputs
        with pytest.raises(RuntimeError, match=f"n_out={n_out} does not match"):
            torch.ops.loom.linear_packed(x, wp, None, n_out)
    with pytest.raises(RuntimeError, match="bias has 39 elements for 40 outputs"):
        torch.ops.loom.linear_packed(x, wp, torch.randn(39), 40)
    with pytest.raises(RuntimeError, match="weight is not packed"):
        torch.ops.loom.linear_packed(x, torch.randn(2, 24, 32), None, 40)  # 32 outputs per line


@pytest.mark.parametrize("isa", GEMM_ISAS, indirect=True)
@pytest.mark.parametrize("M,K", [(700, 99), (9, 8191)])
def test_linear_packed_bfloat16_many_values_odd_k(M, K, isa):
    """bfloat16 activations of more than 2^16 values are widened by at::to (fewer by a loop
    into a buffer): an odd K padded with a zero column there too."""
    g = torch.Generator().manual_seed(M + K)
    w, x = torch.randn(20, K, generator=g).bfloat16(), torch.randn(M, K, generator=g).bfloat16()
    y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), None, 20)
    ref = torch.ops.loom.linear_packed(x.float(), torch.ops.loom.pack_linear_weight(w.float()), None, 20)
    assert torch.equal(y, ref.bfloat16())


@pytest.mark.parametrize("isa", GEMM_ISAS, indirect=True)
def test_linear_packed_bfloat16_odd_k_pad_is_zero_after_a_larger_call(isa):
    """The widening buffer is reused between calls: an odd K's padded column is zero, not
    what an earlier call left there (an inf there made the output NaN)."""
    wp = torch.ops.loom.pack_linear_weight(torch.randn(20, 200).bfloat16())
    torch.ops.loom.linear_packed(torch.full((1, 200), float("inf")).bfloat16(), wp, None, 20)
    w = torch.randn(20, 99).bfloat16()
    x = torch.randn(2, 99).bfloat16()
    y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), None, 20)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), atol=1e-4 * 99 ** 0.5, rtol=2 ** -8)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [3, 300])
def test_linear_packed_on_two_threads(M, dtype, isa):
    """The panels (and, from 256 rows, the row chunks) are split between threads: each
    thread's share lands in its own output columns (on the amx build, bfloat16 with K a
    multiple of 32: the tiles' panel ranges)."""
    g = torch.Generator().manual_seed(M)
    w, x, b = torch.randn(1000, 64, generator=g), torch.randn(M, 64, generator=g), torch.randn(1000, generator=g)
    w, x = w.to(dtype), x.to(dtype)
    with torch_threads(2):
        y = torch.ops.loom.linear_packed(x, torch.ops.loom.pack_linear_weight(w), b, 1000)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b), atol=1e-4 * 64 ** 0.5,
                               rtol=1e-5 if dtype == torch.float32 else 2 ** -8)
