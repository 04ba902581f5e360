"""Pack a thread tree into one sequence: the single-sequence equivalent of a
fork/join run, as used to train such models (Multiverse, ThreadWeaver).

``pack(session_or_tree) -> (input_ids [N], position_ids [N], attention_mask [N, N])``
lays every thread's own segment out in creation order (parents before
children). Token i may attend token j (``mask[i, j]``) iff j's segment is in the
view of i's thread and, inside one segment, j <= i: an ancestor-only mask.
Positions are home positions, i.e. the ``max`` scheme; ``reprefill`` joins pack
too (their segment holds the re-read text). A ``sequential`` join places keys by
per-view shifts, which no single position per token can express, so it is
refused. Views are taken as final: a forked parent is assumed not to grow after
its fork (true of every tree protocol).
"""
from __future__ import annotations

import torch

from .threads import ThreadTree


def pack(session_or_tree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tree: ThreadTree = getattr(session_or_tree, "tree", session_or_tree)
    if tree is None:
        raise ValueError("pack() needs an open session or a ThreadTree (this session is closed).")
    threads = [t for t in tree.threads if t.tokens]
    start, length, ids, pos = {}, {}, [], []
    for t in threads:
        start[t.seg.id], length[t.seg.id] = len(ids), len(t.tokens)
        ids.extend(t.tokens)
        pos.extend(range(t.seg.base, t.seg.base + len(t.tokens)))
    N = len(ids)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for t in threads:
        s0, n = start[t.seg.id], len(t.tokens)
        if t.live is not None:  # (even with zero shifts: the threads it reads may have grown since)
            raise ValueError(f"pack() cannot express thread {t.id}'s live view (spawn / set_view): it reads "
                             "the threads of its view as they grow, laid out anew every step; pack() lays out "
                             "trees of forks and joins (positions='max' or 'reprefill').")
        bounds = []  # the column ranges of the view's other segments
        for seg, shift in t.view:
            if shift != 0:
                raise ValueError("pack() cannot express a 'sequential' join (non-zero view shifts): "
                                 "use positions='max' or 'reprefill' for trees meant for packing.")
            if seg.id == t.seg.id or seg.id not in start:
                continue
            # All of the owner's tokens, pending ones included (the engine writes them first).
            bounds += (start[seg.id], start[seg.id] + length[seg.id])
        if bounds:
            # Every row of the thread sees the same columns: one row made from the ranges'
            # +1 / -1 ends (a slice assignment per range and row block took 17 s for a
            # 1,500-deep chain), then broadcast over the thread's rows.
            edges = torch.zeros(N + 1, dtype=torch.int32)
            b = torch.tensor(bounds, dtype=torch.long)
            edges.index_add_(0, b[0::2], torch.ones(len(bounds) // 2, dtype=torch.int32))
            edges.index_add_(0, b[1::2], torch.full((len(bounds) // 2,), -1, dtype=torch.int32))
            mask[s0:s0 + n] = edges[:N].cumsum(0) > 0
        mask[s0:s0 + n, s0:s0 + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), mask)
