"""Loom's C++ ops: ``engine._C`` (built from ``csrc/`` by ``pip install -e .``), loaded once.

Importing ``engine._C`` registers ``torch.ops.loom.{append_kv, segment_attention,
merge_states, build_plan}`` (CPU kernels); this module adds their fake (meta) kernels so
``torch.compile`` can trace them, and thin wrappers that speak ``AttentionPlan``.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence

import torch

from .attention.plan import AttentionPlan, ThreadStep

try:
    from . import _C
except ImportError as e:  # not built, or built against another torch
    raise ImportError(f"Loom's C++ extension engine._C could not be loaded ({e}). It runs only with the torch "
                      f"it was compiled against (this is torch {torch.__version__}): rebuild it with this torch, "
                      "`pip install -e .` (or `pip install .`) in Loom's source tree, or "
                      "`pip install --force-reinstall --no-deps <loom source archive>`.") from e

_ops = torch.ops.loom

# LOOM_CPU_ISA=amx|avx512|avx2|base caps the CPU kernel build (attention and packed GEMM)
# for the whole process, e.g. to compare builds or to avoid AMX tiles.
if os.environ.get("LOOM_CPU_ISA"):
    try:
        _C.cpu_isa(os.environ["LOOM_CPU_ISA"])
    except ValueError as e:
        raise ValueError(f"LOOM_CPU_ISA={os.environ['LOOM_CPU_ISA']!r} is not a CPU kernel build: {e} "
                         "Unset it for the best build this CPU has.") from None


def ops_available() -> bool:
    """True: importing this module succeeded, so ``torch.ops.loom.*`` are registered."""
    return True


def cpu_isa(name: str | None = None) -> str:
    """The CPU kernel build in use (attention and packed GEMM): "amx" (avx512 plus AMX tiles
    for bfloat16 attention and linears), "avx512", "avx2" or "base"; ``name`` lowers it, ""
    resets to the best the CPU has (not to ``LOOM_CPU_ISA``)."""
    return _C.cpu_isa(name)


# ---------------------------------------------------------------------------------------------
# fake kernels: output metadata only
# ---------------------------------------------------------------------------------------------

def _one_device(op: str, *args):
    """A meta tensor among CPU ones sends the call here: refuse it, as ATen ops do (it used to
    return uninitialised memory, or skip the op's writes)."""
    devs = {a.device for a in args if isinstance(a, torch.Tensor)}
    torch._check(len(devs) <= 1, lambda: f"loom::{op}: tensors on different devices "
                 f"({', '.join(sorted(map(str, devs)))}); put them on one device")


@torch.library.register_fake("loom::append_kv")
def _append_kv_fake(k_pool, v_pool, k, v, slots):
    _one_device("append_kv", k_pool, v_pool, k, v, slots)
    return None


@torch.library.register_fake("loom::segment_attention")
def _segment_attention_fake(q, k_pool, v_pool, kv_indptr, kv_page_ids, kv_len, q_indptr, q_rows, shift,
                            causal_limit, merge_indptr, merge_entries, inv_freq, scale):
    _one_device("segment_attention", q, k_pool, v_pool, kv_indptr, kv_page_ids, kv_len, q_indptr, q_rows, shift,
                causal_limit, merge_indptr, merge_entries, inv_freq)
    return q.new_empty(q.shape)


@torch.library.register_fake("loom::merge_states")
def _merge_states_fake(o, lse, merge_indptr, merge_entries, num_rows):
    _one_device("merge_states", o, lse, merge_indptr, merge_entries, num_rows)
    return o.new_empty((num_rows, o.shape[1], o.shape[2]), dtype=torch.float32)


@torch.library.register_fake("loom::build_plan")
def _build_plan_fake(thread_view_indptr, view_seg, view_shift, thread_own_seg, thread_num_new, seg_len,
                     seg_page_indptr, seg_page_ids):
    _one_device("build_plan", thread_view_indptr, view_seg, view_shift, thread_own_seg, thread_num_new, seg_len,
                seg_page_indptr, seg_page_ids)
    # Sizes depend on the data (jobs = distinct segments, entries = sum of rows x view).
    ctx = torch.library.get_ctx()
    jobs, pages, entries = (ctx.new_dynamic_size() for _ in range(3))
    rows_plus_1 = ctx.new_dynamic_size(min=1)  # its own symbol: rows appears nowhere else
    new = lambda n: view_seg.new_empty((n,), dtype=torch.int32)  # noqa: E731
    return [new(jobs + 1), new(pages), new(jobs), new(jobs + 1), new(entries), new(entries), new(entries),
            new(rows_plus_1), new(entries)]


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------

def append_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
    """Write k[t], v[t] ([T, Hkv, D]) into pool slot ``slots[t]`` (= page * page_size + offset)."""
    _ops.append_kv(k_pool, v_pool, k.to(k_pool.dtype), v.to(v_pool.dtype), slots)


_NO_FREQ = torch.empty(0, dtype=torch.float32)


def segment_attention_cpu(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan,
                          inv_freq: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The ``cpu`` backend: q [T, Hq, D] -> o [T, Hq, D] (q's dtype), semantics of plan.py."""
    return _ops.segment_attention(q, k_pool, v_pool, plan.kv_indptr, plan.kv_page_ids, plan.kv_len,
                                  plan.q_indptr, plan.q_rows, plan.shift, plan.causal_limit,
                                  plan.merge_indptr, plan.merge_entries,
                                  _NO_FREQ if inv_freq is None else inv_freq, float(scale))


def merge_states(o: torch.Tensor, lse: torch.Tensor, merge_indptr: torch.Tensor, merge_entries: torch.Tensor,
                 num_rows: int) -> torch.Tensor:
    """Log-sum-exp merge of float32 partial states o [E, H, D], lse [E, H] -> [num_rows, H, D]."""
    return _ops.merge_states(o, lse, merge_indptr, merge_entries, int(num_rows))


def build_plan_arrays(thread_view_indptr: torch.Tensor, view_seg: torch.Tensor, view_shift: torch.Tensor,
                      thread_own_seg: torch.Tensor, thread_num_new: torch.Tensor, seg_len: torch.Tensor,
                      seg_page_indptr: torch.Tensor, seg_page_ids: torch.Tensor) -> AttentionPlan:
    """The step plan from flat int32 arrays (the fast entry point).

    Thread ``i`` views ``view_seg / view_shift[thread_view_indptr[i]:thread_view_indptr[i+1]]``,
    owns segment ``thread_own_seg[i]`` and adds ``thread_num_new[i]`` rows. Segment ids index
    ``seg_len`` and ``seg_page_indptr``; a negative length marks an unknown segment.
    """
    try:
        t = _ops.build_plan(thread_view_indptr, view_seg, view_shift, thread_own_seg, thread_num_new, seg_len,
                            seg_page_indptr, seg_page_ids)
    except RuntimeError as e:  # an unknown segment is a KeyError, as in build_plan_py
        if "is not a known segment" in str(e):
            raise KeyError(str(e).splitlines()[0]) from None
        raise
    # numpy, not torch: a torch reduction here would wake the intra-op thread pool for a
    # few microseconds of work (milliseconds when the cores are busy).
    return AttentionPlan(*t, num_rows=t[7].numel() - 1, has_shift=bool(t[5].numpy().any()))


def i32_tensor(values) -> torch.Tensor:
    """int32 tensor of ``values`` (an ``array('i')`` is used without a copy)."""
    a = values if isinstance(values, array) and values.typecode == "i" else array("i", values)
    return torch.frombuffer(a, dtype=torch.int32) if len(a) else torch.empty(0, dtype=torch.int32)


def build_plan_cpp(threads: Sequence[ThreadStep], seg_len: Mapping[int, int],
                   seg_pages: Mapping[int, Sequence[int]]) -> AttentionPlan:
    """Same inputs and output as ``build_plan_py``, built in C++."""
    indptr, segs, shifts, own, num_new = [0], [], [], [], []
    for th in threads:
        if th.view:
            s, sh = zip(*th.view)
            segs.extend(s)
            shifts.extend(sh)
        indptr.append(len(segs))
        own.append(th.own)
        num_new.append(th.num_new)
    ids = list(seg_len)
    if ids and (min(ids) < 0 or max(ids) >= 4 * len(ids) + 1024):
        # Sparse ids: renumber densely (only equality of ids matters to the plan).
        dense = {sid: i for i, sid in enumerate(ids)}
        unknown = len(ids)
        segs = [dense.get(s, unknown) for s in segs]
        own = [dense.get(s, unknown) for s in own]
        ids_at = ids + [None]
    else:
        ids_at = list(range(max(ids) + 1 if ids else 0))  # the op rejects ids outside them
    lens, page_indptr, pages = [], [0], []
    for sid in ids_at:
        n = seg_len.get(sid, -1) if sid is not None else -1
        lens.append(n)
        if n >= 0:
            pages.extend(seg_pages[sid])
        page_indptr.append(len(pages))
    i32 = i32_tensor
    return build_plan_arrays(i32(indptr), i32(segs), i32(shifts), i32(own), i32(num_new), i32(lens),
                             i32(page_indptr), i32(pages))
