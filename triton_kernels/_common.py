"""Shared launcher helpers: interpreter detection, autotuning, input checks.

Every launcher validates its inputs here and raises ``ValueError`` naming the
argument and what is wrong, before any kernel sees a pointer.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

# Fixed when this package is imported, as ``triton.jit`` decides interpreter vs compiler
# at decoration time: kernels below were built for whichever mode this says.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch grid (``triton.cdiv`` is a ``ConstexprFunction``: several
    microseconds a call from the host, on every launch)."""
    return -(-a // b)


def maybe_autotune(configs: list, key: list[str]):
    """``triton.autotune`` on real GPUs, its choices kept in Triton's on-disk cache (each
    process tuned every key again, compiling every config in the middle of a forward); a
    no-op under the interpreter (where timing is meaningless and each config would run the
    slow interpreted kernel again)."""
    def deco(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=configs, key=key, cache_results=True)(fn)
    return deco


def autotuned() -> bool:
    return not INTERPRET


def device_guard(device: torch.device):
    """The context every launch runs in: Triton launches on the *current* CUDA device,
    not on its tensors' one, so with tensors on ``cuda:1`` a bare launch would run in
    cuda:0's context with cuda:1's pointers. CPU tensors (the interpreter) need none."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_device(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    # (t.is_cuda / t.is_cpu, not t.device.type: ~1 us a read, and these checks run on every launch)
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; "
                         "move every input to one device.")
    if t.is_cuda:
        return
    if not t.is_cpu:
        raise ValueError(f"{name} is on {t.device}; Triton kernels support CUDA (and CPU under "
                         "TRITON_INTERPRET=1).")
    if not INTERPRET:
        raise ValueError(f"{name} is a CPU tensor: Triton kernels run on CUDA tensors, or on the "
                         "CPU only under the Triton interpreter (set TRITON_INTERPRET=1 before "
                         "Python imports triton).")


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (all attention inputs "
                         "share one dtype).")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32.")


def check_index(name: str, t: torch.Tensor, dtypes=(torch.int32,), device=None) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected "
                         f"{' or '.join(str(d) for d in dtypes)}.")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}.")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}; move the plan "
                         "to the data's device (AttentionPlan.to).")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride()[-1] != 1:  # (t.stride(-1) parses its argument: twice the time)
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                         f"{t.stride()}; call .contiguous() first.")


def check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None = None) -> None:
    """Both K/V pools: [num_pages, page_size, Hkv, D], on ``device``, float (``dtype`` if
    given), unit stride in the last dimension, the same shape."""
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_pages, page_size, Hkv, D], got shape {tuple(t.shape)}.")
        check_device(name, t, device)
        check_float(name, t, dtype)
        check_last_dim_contiguous(name, t)
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ in shape.")


def check_inv_freq(inv_freq: torch.Tensor, head_dim: int, device) -> torch.Tensor:
    """inv_freq [D/2], returned as contiguous float32 on ``device``."""
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.numel() != head_dim // 2:
        shape = tuple(inv_freq.shape) if isinstance(inv_freq, torch.Tensor) else type(inv_freq).__name__
        raise ValueError(f"inv_freq must be a 1-D tensor of head_dim/2 = {head_dim // 2} "
                         f"frequencies, got {shape}.")
    if not inv_freq.is_floating_point():
        raise ValueError(f"inv_freq has dtype {inv_freq.dtype}; it must be floating point.")
    return inv_freq.to(device=device, dtype=torch.float32).contiguous()
