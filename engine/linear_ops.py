"""Fake (meta) kernels for the model-layer ops of csrc/linear_cpu.cpp (packed GEMM) and
csrc/fused_cpu.cpp (RMSNorm, residual + RMSNorm, q/k/v preparation with RoPE, SiLU-gate)
and csrc/sample_cpu.cpp (inverse-CDF picks, a row's largest logits),
so that ``torch.compile`` can trace a model that uses them. Importing loads engine._C."""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  registers torch.ops.loom.* (raises ImportError if not built)
from ._ops import _one_device


@torch.library.register_fake("loom::pack_linear_weight")
def _pack_fake(w):
    """As csrc/linear_cpu.cpp: panels of 16 outputs, a 64-byte line per k step (float32)
    or per k pair (bfloat16, K padded to even)."""
    _one_device("pack_linear_weight", w)
    n, k = w.shape
    if w.dtype == torch.bfloat16:
        return w.new_empty(((n + 15) // 16, (k + 1) // 2, 32))
    return w.new_empty(((n + 15) // 16, k, 16))


@torch.library.register_fake("loom::linear_packed")
def _linear_packed_fake(x, wp, bias, n_out):
    _one_device("linear_packed", x, wp, bias, n_out)
    return x.new_empty((*x.shape[:-1], n_out))


@torch.library.register_fake("loom::rms_norm")
def _rms_norm_fake(x, w, eps):
    _one_device("rms_norm", x, w, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("loom::add_rms_norm")
def _add_rms_norm_fake(h, r, w, eps):
    _one_device("add_rms_norm", h, r, w, eps)
    return torch.empty_like(h)


@torch.library.register_fake("loom::qkv_prep")
def _qkv_prep_fake(qkv, q_norm, k_norm, cos, sin, positions, num_heads, num_kv_heads, head_dim, eps):
    _one_device("qkv_prep", qkv, q_norm, k_norm, cos, sin, positions)
    t = qkv.shape[0]
    return (qkv.new_empty((t, num_heads, head_dim)), qkv.new_empty((t, num_kv_heads, head_dim)),
            qkv.new_empty((t, num_kv_heads, head_dim)))


@torch.library.register_fake("loom::silu_mul")
def _silu_mul_fake(gate_up):
    _one_device("silu_mul", gate_up)
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("loom::pick_from_probs")
def _pick_from_probs_fake(probs, u):
    _one_device("pick_from_probs", probs, u)
    return probs.new_empty((probs.shape[0],), dtype=torch.int64)


@torch.library.register_fake("loom::pick_from_logits")
def _pick_from_logits_fake(logits, temperature, u):
    _one_device("pick_from_logits", logits, temperature, u)
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.register_fake("loom::top_logits")
def _top_logits_fake(logits, k):
    _one_device("top_logits", logits)
    return logits.new_empty((logits.shape[0], k)), logits.new_empty((logits.shape[0], k), dtype=torch.int64)
