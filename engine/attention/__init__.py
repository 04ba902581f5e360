"""Segment attention behind one dispatch.

Backends share the semantics in ``plan.py``: ``torch`` (the reference, the oracle
for every test), ``cpu`` (C++/OpenMP, ``torch.ops.loom.segment_attention``).
``auto`` picks ``cpu`` for CPU tensors; ``triton`` (Triton kernels, GPU; CPU only
under ``TRITON_INTERPRET=1``) for CUDA tensors.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .plan import AttentionPlan, ThreadStep, build_plan_py
from .reference import segment_attention_torch

BACKENDS = ("auto", "torch", "cpu", "triton")


def _ops():
    from .. import _ops
    return _ops


def ops_available() -> bool:
    return _ops_load_error() is None


def _ops_load_error() -> str | None:
    """None when engine._C is loaded, else why not (engine._ops' error: the cause and how to rebuild)."""
    try:
        _ops()
        return None
    except ImportError as e:
        return str(e)


def triton_available() -> bool:
    """Is triton installed? (checked without importing it: importing it fixes the
    interpreter mode, TRITON_INTERPRET, for the whole process)"""
    return importlib.util.find_spec("triton") is not None


def _triton_kernels(device: torch.device, what: str):
    """The ``triton_kernels`` package, imported on first use; CPU tensors only under the
    Triton interpreter."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on",
                                                                                                 "yes"):
        raise ValueError(f"{what}='triton' on device=cpu needs the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before Python imports triton, or use device='cuda'.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}='triton' supports CUDA devices (and CPU under "
                         f"TRITON_INTERPRET=1), not device={device}.")
    if not triton_available():
        raise ValueError(f"{what}='triton' needs the triton package: `pip install triton`.")
    import triton_kernels
    return triton_kernels


def get_backend(name: str, device: torch.device):
    """(resolved name, fn(q, k_pool, v_pool, plan, inv_freq, scale) -> o)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not available; choose one of "
                         f"{', '.join(BACKENDS)}.")
    if name == "auto":
        if device.type == "cuda" and triton_available():
            name = "triton"
        elif device.type == "cpu" and ops_available():
            name = "cpu"
        else:
            if device.type == "cpu":
                warnings.warn(f"using the slow 'torch' attention backend: {_ops_load_error()}")
            name = "torch"
    if name == "torch":
        return name, segment_attention_torch
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend='cpu' runs on CPU tensors, but device={device}.")
        if not ops_available():
            raise ValueError(f"attention_backend='cpu' needs the C++ extension engine._C: {_ops_load_error()}")
        return name, _ops().segment_attention_cpu
    if name == "triton":
        return name, _triton_kernels(device, "attention_backend").attention
    raise AssertionError(name)


def _append_kv_torch(k_pool, v_pool, k, v, slots):
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, Hkv, D).index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.view(-1, Hkv, D).index_copy_(0, slots, v.to(v_pool.dtype))


def get_append_kv(device: torch.device):
    if device.type == "cuda" and triton_available():
        return _triton_kernels(device, "append_kv").append_kv
    if device.type == "cpu" and ops_available():
        return _ops().append_kv
    return _append_kv_torch


def get_plan_builder():
    """fn(threads: list[ThreadStep], seg_len: dict, seg_pages: dict) -> AttentionPlan."""
    if ops_available() and hasattr(_ops(), "build_plan_cpp"):
        return _ops().build_plan_cpp
    return build_plan_py


__all__ = ["AttentionPlan", "ThreadStep", "build_plan_py", "segment_attention_torch",
           "get_backend", "get_append_kv", "get_plan_builder", "BACKENDS"]
