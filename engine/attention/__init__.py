"""Segment attention behind one dispatch.

Backends share the semantics in ``plan.py``: ``torch`` (the reference, the oracle
for every test), ``cpu`` (C++/OpenMP, ``torch.ops.loom.segment_attention``).
``auto`` picks ``cpu`` for CPU tensors.
"""
from __future__ import annotations

import warnings

import torch

from .plan import AttentionPlan, ThreadStep, build_plan_py
from .reference import segment_attention_torch

BACKENDS = ("auto", "torch", "cpu")


def _ops():
    from .. import _ops
    return _ops


def ops_available() -> bool:
    try:
        return _ops().ops_available()
    except ImportError:
        return False


def get_backend(name: str, device: torch.device):
    """(resolved name, fn(q, k_pool, v_pool, plan, inv_freq, scale) -> o)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not available; choose one of "
                         f"{', '.join(BACKENDS)}.")
    if name == "auto":
        if device.type == "cpu" and ops_available():
            name = "cpu"
        else:
            if device.type == "cpu":
                warnings.warn("Loom's C++ extension engine._C is not built; using the slow 'torch' "
                              "attention backend. Reinstall with `pip install -e .` to build it.")
            name = "torch"
    if name == "torch":
        return name, segment_attention_torch
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend='cpu' runs on CPU tensors, but device={device}.")
        if not ops_available():
            raise ValueError("attention_backend='cpu' needs the C++ extension engine._C, which is not "
                             "built; reinstall with `pip install -e .`.")
        return name, _ops().segment_attention_cpu
    raise AssertionError(name)


def _append_kv_torch(k_pool, v_pool, k, v, slots):
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, Hkv, D).index_copy_(0, slots, k.to(k_pool.dtype))
    v_pool.view(-1, Hkv, D).index_copy_(0, slots, v.to(v_pool.dtype))


def get_append_kv(device: torch.device):
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
