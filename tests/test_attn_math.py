"""csrc/include/loom/attn_math.h's scalar attention math (the online-softmax update, the
state merge, the rotations) against torch: the header is built here with the system C++
compiler into a small library (tests/csrc/attn_math_capi.cpp) and called through ctypes,
no torch involved on its side. (.ci/check_cuda.sh compiles the same functions as device
code: tests/csrc/attn_math_device.cu.)"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

from engine.attention.reference import merge_states, rotate_by

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = ctypes.POINTER(ctypes.c_float)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) to build the header's test library")
    so = str(tmp_path_factory.mktemp("attn_math") / "attn_math_capi.so")
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-I", os.path.join(ROOT, "csrc", "include"),
                    os.path.join(ROOT, "tests", "csrc", "attn_math_capi.cpp"), "-o", so], check=True)
    lib = ctypes.CDLL(so)
    i, f = ctypes.c_int, ctypes.c_float
    lib.loom_online_softmax.argtypes = [F, F, i, i, F, ctypes.POINTER(f)]
    lib.loom_merge_state.argtypes = [F, ctypes.POINTER(f), F, f, i]
    lib.loom_rope_rotate.argtypes = [F, F, i, f, F]
    lib.loom_rope_rotate_cs.argtypes = [F, F, i, F, F]
    for fn in (lib.loom_online_softmax, lib.loom_merge_state, lib.loom_rope_rotate, lib.loom_rope_rotate_cs):
        fn.restype = None
    return lib


def ptr(t: torch.Tensor):
    assert t.dtype == torch.float32 and t.is_contiguous()
    return ctypes.cast(t.data_ptr(), F)


def online(lib, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float]:
    K, D = v.shape
    o, lse = torch.empty(D), ctypes.c_float()
    lib.loom_online_softmax(ptr(s), ptr(v), K, D, ptr(o), ctypes.byref(lse))
    return o, lse.value


@pytest.mark.parametrize("K,D", [(1, 64), (3, 80), (17, 128), (100, 7), (1000, 64)])
def test_online_softmax_is_softmax_times_values(lib, K, D):
    g = torch.Generator().manual_seed(K * D)
    s = (torch.randn(K, generator=g) * 4).contiguous()
    v = torch.randn(K, D, generator=g)
    if K > 3:
        s[torch.randperm(K, generator=g)[: K // 3]] = -math.inf  # masked keys
    o, lse = online(lib, s, v)
    want = (s.double().softmax(0)[:, None] * v.double()).sum(0)
    assert torch.allclose(o.double(), want, rtol=1e-5, atol=1e-6)
    assert lse == pytest.approx(torch.logsumexp(s.double(), 0).item(), rel=1e-6, abs=1e-6)


def test_online_softmax_of_no_key_is_empty(lib):
    """Every score -inf (a fully masked row): o = 0, lse = -inf, no NaN."""
    o, lse = online(lib, torch.full((5,), -math.inf), torch.randn(5, 16))
    assert lse == -math.inf and torch.equal(o, torch.zeros(16))


@pytest.mark.parametrize("split", [1, 7, 99])
def test_merged_halves_equal_the_whole(lib, split):
    """Two partial states over a split of the keys merge into the state over all of them (the
    merge the kernels do per row), and agree with the torch backend's merge_states."""
    g = torch.Generator().manual_seed(split)
    K, D = 100, 80
    s, v = torch.randn(K, generator=g) * 3, torch.randn(K, D, generator=g)
    oa, la = online(lib, s[:split].contiguous(), v[:split].contiguous())
    ob, lb = online(lib, s[split:].contiguous(), v[split:].contiguous())
    la_c = ctypes.c_float(la)
    o_ref = merge_states(torch.stack([oa, ob])[:, None], torch.tensor([[la], [lb]]), torch.tensor([0, 2]),
                         torch.tensor([0, 1]), 1)[0, 0]
    lib.loom_merge_state(ptr(oa), ctypes.byref(la_c), ptr(ob), ctypes.c_float(lb), D)
    whole, lw = online(lib, s, v)
    assert torch.allclose(oa, whole, rtol=1e-5, atol=1e-6) and torch.allclose(oa, o_ref, rtol=1e-5, atol=1e-6)
    assert la_c.value == pytest.approx(lw, rel=1e-6)


def test_merge_with_an_empty_state(lib):
    """An empty state (-inf) merged in changes nothing; two empty ones stay empty."""
    D = 16
    o, lse = torch.randn(D), ctypes.c_float(0.25)
    keep = o.clone()
    lib.loom_merge_state(ptr(o), ctypes.byref(lse), ptr(torch.randn(D)), ctypes.c_float(-math.inf), D)
    assert torch.equal(o, keep) and lse.value == 0.25
    e, le = torch.zeros(D), ctypes.c_float(-math.inf)
    lib.loom_merge_state(ptr(e), ctypes.byref(le), ptr(torch.randn(D)), ctypes.c_float(-math.inf), D)
    assert le.value == -math.inf and torch.equal(e, torch.zeros(D))


@pytest.mark.parametrize("D", [2, 64, 80, 128])
@pytest.mark.parametrize("pos", [0.0, 1.0, 37.0, -513.0, 131071.0])
def test_rotations_are_the_reference_rope(lib, D, pos):
    """rope_rotate (angles from inv_freq) and rope_rotate_cs (from cos / sin tables) rotate as
    the torch backend's rotate_by, positive and negative positions (shifts)."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(D, generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    want = rotate_by(x[None, None], torch.tensor([pos]), inv)[0, 0]
    out = torch.empty(D)
    lib.loom_rope_rotate(ptr(x), ptr(out), D, ctypes.c_float(pos), ptr(inv))
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)
    ang = torch.tensor(pos, dtype=torch.float32) * inv
    cs, sn, out_cs = ang.cos(), ang.sin(), torch.empty(D)
    lib.loom_rope_rotate_cs(ptr(x), ptr(out_cs), D, ptr(cs), ptr(sn))
    assert torch.allclose(out_cs, want, rtol=1e-5, atol=1e-5)
    lib.loom_rope_rotate(ptr(x), ptr(x), D, ctypes.c_float(pos), ptr(inv))  # out may alias x
    assert torch.allclose(x, want, rtol=1e-5, atol=1e-5)
