"""Fake (meta) kernels for the packed-GEMM ops of csrc/linear_cpu.cpp, so that
``torch.compile`` can trace a model that uses them. Importing loads engine._C."""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  registers torch.ops.loom.* (raises ImportError if not built)

_NB = 32  # outputs per panel, as kNB in csrc/linear_cpu.cpp


@torch.library.register_fake("loom::pack_linear_weight")
def _pack_fake(w):
    n, k = w.shape
    return w.new_empty(((n + _NB - 1) // _NB, k, _NB))


@torch.library.register_fake("loom::linear_packed")
def _linear_packed_fake(x, wp, bias, n_out):
    return x.new_empty((*x.shape[:-1], n_out))
