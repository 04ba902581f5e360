"""Host-side work decomposition of an AttentionPlan for the Triton attention kernel.

One program handles one *work item* for one kv head: a job (segment), a block of at
most ``epb`` consecutive entries of that job (all query heads of the kv head, so a
K/V tile is loaded once for every row and head reading it), and one chunk
``[kv_lo, kv_hi)`` of the segment. A job is cut into several chunks (split-K/V)
when the step has too few items to fill the GPU, e.g. a few decode rows reading
a long shared prompt; each chunk writes its own partial (o, lse) state and the
merge kernel combines them with the row's other entries.

Computed once per plan (one host sync) and reused by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.plan import AttentionPlan

# A split chunk is rounded up to this many tokens, so every autotuned BLOCK_N divides it.
CHUNK_ALIGN = 128
# Never split a segment into chunks shorter than this: below it the merge costs more
# than the parallelism gains.
MIN_CHUNK = 256
# Item columns: job, e0, e1, kv_lo, kv_hi, split
ITEM_COLS = 6


@dataclass
class WorkClass:
    """Items launched together with one query-tile height ``block_q``."""
    block_q: int
    epb: int                # entries per item: block_q // group
    items: torch.Tensor     # [W, ITEM_COLS] int32, on the plan's device

    @property
    def num_items(self) -> int:
        return self.items.shape[0]


@dataclass
class WorkPlan:
    classes: list[WorkClass]
    state_off: torch.Tensor  # [E] int32: first partial-state slot of each entry
    nsplit: torch.Tensor     # [E] int32: partial states of each entry (0: job reads nothing)
    num_states: int
    direct: bool             # every row has one entry and no split: write o directly
    has_shift: bool          # some entry has a non-zero shift: rotate queries in-kernel


def block_q_sizes(group: int, half_pad: int, fp32: bool = False) -> tuple[int, int]:
    """(small, large) query-tile heights: tl.dot needs >= 16 rows; a tile holds whole
    GQA groups; wide head dims get a shorter tile to bound registers; float32 with head
    dim 256 no taller tile than the small one (32 rows need 69,632 B of shared memory with
    the smallest config: over a T4's (sm_75) 64 KB per block)."""
    small = max(16, 1 << (group - 1).bit_length())
    large = small if fp32 and half_pad >= 128 else max(small, 64 if half_pad <= 64 else 32)
    return small, large


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.int64)


def build_work(plan: AttentionPlan, num_kv_heads: int, group: int, half_pad: int,
               target_programs: int, kv_chunk: int | None = None, fp32: bool = False) -> WorkPlan:
    """Cut ``plan`` into work items.

    ``target_programs``: enough (item, kv head) programs to fill the device; segments
    longer than the fair share of keys per program are split into chunks of that share
    (at least MIN_CHUNK tokens). ``kv_chunk`` forces a split of every segment into
    chunks of that many tokens (tests, benchmarks).
    """
    device = plan.q_indptr.device
    hp = plan.host()  # (the plan as built on the CPU: no copy back from the GPU)
    q_indptr, kv_len = _host(hp.q_indptr), _host(hp.kv_len)
    merge_indptr = _host(hp.merge_indptr)
    J = kv_len.numel()
    E = int(q_indptr[-1]) if J else 0
    n_ent = q_indptr[1:] - q_indptr[:-1]                       # [J]
    live = (n_ent > 0) & (kv_len > 0)
    small, large = block_q_sizes(group, half_pad, fp32)
    # a job whose rows fit one small tile goes to the small class (decode-like)
    is_small = n_ent * group <= small
    epb = torch.where(is_small, small // group, large // group)
    blocks = torch.where(live, (n_ent + epb - 1) // epb, torch.zeros_like(n_ent))

    if kv_chunk is not None:
        if kv_chunk < 1:
            raise ValueError(f"kv_chunk={kv_chunk} must be >= 1 token.")
        chunk = torch.full_like(kv_len, int(kv_chunk))
    else:
        # Balance by work, not by item count: one (item, kv head) program should read
        # about total / target_programs keys, so a long prompt read by a few rows is cut
        # into chunks even when many short items exist beside it.
        total = int((blocks * kv_len).sum()) * num_kv_heads
        per_program = -(-total // max(1, target_programs))
        c = max(MIN_CHUNK, -(-per_program // CHUNK_ALIGN) * CHUNK_ALIGN)
        chunk = torch.full_like(kv_len, c)
    nsplit_job = torch.where(live, -(-kv_len // chunk), torch.zeros_like(kv_len))

    classes = []
    for cls_small, bq in ((True, small), (False, large)):
        sel = live & (is_small == cls_small)
        cnt = torch.where(sel, blocks * nsplit_job, torch.zeros_like(blocks))
        total = int(cnt.sum())
        if total == 0:
            continue
        job = torch.repeat_interleave(torch.arange(J), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(total) - first[job]
        b, s = local // nsplit_job[job], local % nsplit_job[job]
        e0 = q_indptr[job] + b * epb[job]
        e1 = torch.minimum(e0 + epb[job], q_indptr[job + 1])
        lo = s * chunk[job]
        hi = torch.minimum(lo + chunk[job], kv_len[job])
        items = torch.stack([job, e0, e1, lo, hi, s], dim=1)
        # longest chunks first: the tail of the grid gets the short items
        items = items[torch.argsort(hi - lo, descending=True, stable=True)]
        classes.append(WorkClass(bq, bq // group, items.to(torch.int32).contiguous().to(device)))

    nsplit = torch.repeat_interleave(nsplit_job, n_ent) if E else torch.zeros(0, dtype=torch.int64)
    state_off = torch.cumsum(nsplit, 0) - nsplit
    num_states = int(nsplit.sum())
    rows_one = bool(((merge_indptr[1:] - merge_indptr[:-1]) == 1).all())
    direct = rows_one and E == merge_indptr.numel() - 1 and bool((nsplit_job <= 1).all())
    has_shift = bool(plan.has_shift) or bool((_host(hp.shift) != 0).any())
    return WorkPlan(classes, state_off.to(torch.int32).to(device), nsplit.to(torch.int32).to(device),
                    num_states, direct, has_shift)


def cached_work(plan: AttentionPlan, key: tuple, make) -> WorkPlan:
    """The plan's WorkPlan for ``key``, built by ``make()`` on first use. Cached on the
    plan object itself: a plan lives for one step and serves every layer."""
    cache = plan.__dict__.setdefault("_triton_work", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]
