"""The attention plan: what each new query row of one step attends to.

A plan is built once per step (``build_plan``) and reused by every layer. It is
CSR over *jobs*: one job per segment read in this step, holding every query row
that reads that segment, so a shared prompt's K/V is read once for all threads.

Tensors (all int32, on the CPU or the model's device):

    kv_indptr    [J+1]  job j reads pages kv_page_ids[kv_indptr[j]:kv_indptr[j+1]]
    kv_page_ids  [P]    page ids in the pool, in token order
    kv_len       [J]    valid tokens of job j's segment (<= pages * page_size)
    q_indptr     [J+1]  job j owns entries e in [q_indptr[j], q_indptr[j+1])
    q_rows       [E]    query row (index into q's first dim) of entry e
    shift        [E]    the segment's shift in that row's view (DESIGN.md §3):
                        the row's query is used rotated at (home position - shift)
    causal_limit [E]    entry e sees keys [0, causal_limit[e]) of the segment
    merge_indptr [T+1]  row t merges the partial states of entries
    merge_entries[E]    merge_entries[merge_indptr[t]:merge_indptr[t+1]]

Semantics of ``segment_attention(q, k_pool, v_pool, plan, inv_freq, scale)``:
for each entry e of job j, with row r = q_rows[e], query head h and kv head
h // (Hq // Hkv):  q' = rotate(q[r, h], -shift[e] * inv_freq) (rotate-half
RoPE convention, as Hugging Face); keys/values: the first causal_limit[e]
tokens of the segment; partial state (o_e, lse_e) = softmax attention with
``scale``. Row t's output is the log-sum-exp merge of its entries' states; a
row with no visible key gets zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class AttentionPlan:
    kv_indptr: torch.Tensor
    kv_page_ids: torch.Tensor
    kv_len: torch.Tensor
    q_indptr: torch.Tensor
    q_rows: torch.Tensor
    shift: torch.Tensor
    causal_limit: torch.Tensor
    merge_indptr: torch.Tensor
    merge_entries: torch.Tensor
    # Host-side facts the backends use to pick fast paths (not tensors).
    num_rows: int = 0
    has_shift: bool = False

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device, non_blocking: bool = True) -> "AttentionPlan":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device, non_blocking=non_blocking)
        moved = AttentionPlan(**kw)
        host = self if self.q_indptr.device.type == "cpu" else self.__dict__.get("_host_plan")
        if host is not None:
            moved.__dict__["_host_plan"] = host  # (see host())
        return moved

    def __copy__(self) -> "AttentionPlan":
        return replace(self)  # (without the cached host plan and work splits: a copy may get other tensors)

    def host(self) -> "AttentionPlan":
        """This plan on the CPU, for host-side decisions (the Triton backend's work split):
        the plan it was copied from when there is one, so that reading it costs no copy
        back from the GPU and no wait for the step's queued work; else one blocking copy,
        kept."""
        if self.q_indptr.device.type == "cpu":
            return self
        if "_host_plan" not in self.__dict__:
            self.__dict__["_host_plan"] = self.to("cpu", non_blocking=False)
        return self.__dict__["_host_plan"]

    @property
    def num_jobs(self) -> int:
        return self.kv_len.numel()

    @property
    def num_entries(self) -> int:
        return self.q_rows.numel()


@dataclass
class ThreadStep:
    """One thread's part of a step, as the plan builder sees it.

    ``view`` lists (segment id, shift) pairs the thread attends to, its own
    segment included; ``own`` is the segment its ``num_new`` new tokens were
    appended to (already counted in ``seg_len``).
    """
    view: list[tuple[int, int]]
    own: int
    num_new: int


def build_plan_py(threads: list[ThreadStep], seg_len: dict[int, int],
                  seg_pages: dict[int, list[int]]) -> AttentionPlan:
    """Plain-Python plan builder: the oracle for the C++ one.

    Rows are numbered thread by thread in order. Jobs are ordered by first
    appearance of their segment; entries inside a job by row; a row's merge list
    in the order of its thread's view.
    """
    job_of: dict[int, int] = {}
    job_entries: list[list[tuple[int, int, int]]] = []  # (row, shift, limit)
    row_refs: list[list[tuple[int, int]]] = []  # per row, in view order: (job, index in its entries)
    row = 0
    for th in threads:
        own_len = seg_len[th.own]
        if own_len < th.num_new:
            raise ValueError(f"build_plan_py: a thread's own segment {th.own} has {own_len} tokens, fewer "
                             f"than its {th.num_new} new ones (its length counts them)")
        refs: list[list[tuple[int, int]]] = [[] for _ in range(th.num_new)]
        for seg, shift in th.view:
            if seg not in job_of:
                job_of[seg] = len(job_entries)
                job_entries.append([])
            ents = job_entries[job_of[seg]]
            for i in range(th.num_new):
                if seg == th.own:
                    limit = own_len - th.num_new + i + 1
                else:
                    limit = seg_len[seg]
                refs[i].append((job_of[seg], len(ents)))
                ents.append((row + i, shift, limit))
        row_refs += refs
        row += th.num_new
    num_rows = row
    segs = list(job_of)
    kv_indptr, kv_pages, kv_len = [0], [], []
    q_indptr, q_rows, shifts, limits = [0], [], [], []
    job_place: list[list[int]] = []  # per job: entry k (in appending order) -> its index in the plan
    for j, seg in enumerate(segs):
        kv_pages.extend(seg_pages[seg])
        kv_indptr.append(len(kv_pages))
        kv_len.append(seg_len[seg])
        ents = job_entries[j]
        order = sorted(range(len(ents)), key=lambda k: ents[k][0])  # by row, stable
        place = [0] * len(ents)
        for k in order:
            place[k] = len(q_rows)
            r, s, lim = ents[k]
            q_rows.append(r)
            shifts.append(s)
            limits.append(lim)
        job_place.append(place)
        q_indptr.append(len(q_rows))
    merge_indptr, merge_entries = [0], []
    for r in range(num_rows):
        merge_entries.extend(job_place[j][k] for j, k in row_refs[r])
        merge_indptr.append(len(merge_entries))

    def t(x):
        return torch.tensor(x, dtype=torch.int32)
    return AttentionPlan(t(kv_indptr), t(kv_pages), t(kv_len), t(q_indptr), t(q_rows),
                         t(shifts), t(limits), t(merge_indptr), t(merge_entries),
                         num_rows=num_rows, has_shift=any(s != 0 for s in shifts))
