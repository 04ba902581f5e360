"""Paged KV cache: a page pool, ref-counted segments, and page reservations.

A *page* holds ``page_size`` token slots of K and V for every layer (one pool
tensor per layer, ``[num_pages, page_size, n_kv_heads, head_dim]``). A *segment*
is an append-only run of tokens owning its pages; token ``i`` sits at home
position ``base + i``. Segments are ref-counted by the threads and views that
hold them and give their pages back when the last holder lets go.

Admission reserves the worst-case pages a request can need, so a running
request never finds the pool empty; pages are taken from the reservation
lazily as tokens arrive, so ``pages_used`` is what is really written.
"""
from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field

import torch


def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Segment:
    id: int
    base: int                       # home position of token 0
    pages: array = field(default_factory=lambda: array("i"))  # int32 page ids, in order
    length: int = 0
    refs: int = 1
    owner_reservation: "Reservation | None" = None
    tokens: list[int] = field(default_factory=list)  # its thread's token list (ThreadTree's; penalties read it)


@dataclass
class Reservation:
    pages: int                      # pages still reserved (not yet taken)
    closed: bool = False            # released: pages its segments free go to the pool


class KVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1.")
        if num_pages < 1:
            raise ValueError(f"The KV cache needs at least one page (got {num_pages}); "
                             "raise kv_cache_tokens.")
        if num_pages >= 2**31:
            raise ValueError(f"The KV cache would have {num_pages:,} pages; page ids are int32 (the attention "
                             "plan's), so at most 2**31 - 1: lower kv_cache_tokens or raise page_size.")
        self.page_size, self.num_pages = page_size, num_pages
        self.bytes_per_token = kv_token_bytes(num_layers, num_kv_heads, head_dim, dtype)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # torch.empty does not touch memory: the OS maps pages as they are first written.
        try:
            self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        except (RuntimeError, MemoryError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
            self.k = self.v = []
            tokens = num_pages * page_size
            raise ValueError(
                f"The KV cache of {tokens:,} tokens ({self.bytes_per_token:,} bytes each: "
                f"{tokens * self.bytes_per_token / 2**30:,.1f} GiB) could not be allocated on {device} "
                f"({str(e).splitlines()[0][:300]}); lower kv_cache_tokens.") from None
        # Free pages: those given back (a stack: the last freed is taken first), then the pages
        # [_fresh, num_pages) never taken, in order. Compact and lazy, 1 byte a page up front (a
        # list of every page id, as Python ints, took ~45 bytes a page when the LLM was made:
        # more than the K/V of a small model's token, uncounted by the memory check).
        self._free_pages = array("i")
        self._fresh = 0
        self._page_refs = bytearray(num_pages)  # (0 or 1: a page never holds two segments)
        self._reserved = 0
        self.segments: dict[int, Segment] = {}
        self._free_ids: list[int] = []  # (a heap: the smallest id first, so that the step's
        #                                    segment table, indexed by id, stays as small as the live set)
        self._next_id = 0
        # Since begin_append (see rollback_append): pages taken (page, its reservation or None)
        # and segments grown (segment, its length and page count before); None: not recording.
        self._journal: tuple[list, list] | None = None

    # ---- reservations ----------------------------------------------------------------------
    @property
    def pages_free(self) -> int:
        return len(self._free_pages) + self.num_pages - self._fresh

    @property
    def pages_used(self) -> int:
        return self.num_pages - self.pages_free

    @property
    def pages_unreserved(self) -> int:
        return self.pages_free - self._reserved

    def can_reserve(self, pages: int) -> bool:
        return pages <= self.pages_unreserved

    def reserve(self, pages: int) -> Reservation:
        assert self.can_reserve(pages), "reserve() without can_reserve()"
        self._reserved += pages
        return Reservation(pages)

    def release(self, res: Reservation):
        self._reserved -= res.pages
        res.pages = 0
        res.closed = True
        assert self._reserved >= 0

    # ---- pages -----------------------------------------------------------------------------
    def _take_page(self, res: Reservation | None) -> int:
        from_res = res is not None and res.pages > 0
        if from_res:
            res.pages -= 1
            self._reserved -= 1
        elif not self.pages_unreserved > 0:
            raise RuntimeError("KV cache is full: no unreserved page left (engine bug: a thread "
                               "wrote past its reservation).")
        if self._free_pages:
            page = self._free_pages.pop()
        else:
            page, self._fresh = self._fresh, self._fresh + 1
        assert self._page_refs[page] == 0, "a free page still has references"
        self._page_refs[page] = 1
        if self._journal is not None:
            self._journal[0].append((page, res if from_res else None))
        return page

    def _drop_page(self, page: int) -> bool:
        """Drop a reference; True if that freed the page."""
        assert self._page_refs[page] > 0
        self._page_refs[page] -= 1
        if self._page_refs[page] == 0:
            self._free_pages.append(page)
            return True
        return False

    # ---- segments --------------------------------------------------------------------------
    def new_segment(self, base: int, reservation: Reservation | None = None) -> Segment:
        sid = heapq.heappop(self._free_ids) if self._free_ids else self._next_id
        if sid == self._next_id:
            self._next_id += 1
        seg = Segment(id=sid, base=base, owner_reservation=reservation)
        self.segments[sid] = seg
        return seg

    def retain(self, seg: Segment) -> Segment:
        assert seg.refs > 0, "retain() on a freed segment"
        seg.refs += 1
        return seg

    def release_segment(self, seg: Segment):
        assert seg.refs > 0, "segment released twice"
        seg.refs -= 1
        if seg.refs == 0:
            freed = sum(self._drop_page(p) for p in seg.pages)
            res = seg.owner_reservation
            if res is not None and not res.closed:
                # Back to the request that freed them: its reservation bounds what it holds at
                # once, not what it ever took (a Hogwild! compaction frees and takes again).
                res.pages += freed
                self._reserved += freed
            seg.pages = array("i")
            del self.segments[seg.id]
            heapq.heappush(self._free_ids, seg.id)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def append_slots(self, seg: Segment, n: int) -> list[int]:
        """Grow ``seg`` by ``n`` tokens; return their flat slot indices (page * page_size + off)."""
        if self._journal is not None:
            self._journal[1].append((seg, seg.length, len(seg.pages)))
        ps, first, pages = self.page_size, seg.length, seg.pages
        end = first + n
        # the pages up to the last token's, in order (a segment may hold a page past its
        # length already: a re-written token's)
        for _ in range(-(-end // ps) - len(pages)):
            pages.append(self._take_page(seg.owner_reservation))
        seg.length = end
        if n == 1:  # (a decode step's)
            return [pages[first // ps] * ps + first % ps]
        return [pages[i // ps] * ps + i % ps for i in range(first, end)]

    def save_slot(self, seg: Segment, i: int):
        """A copy of the K/V of ``seg``'s token ``i`` over every layer (restore_slot puts it back)."""
        page, off = seg.pages[i // self.page_size], i % self.page_size
        return [(k[page, off].clone(), v[page, off].clone()) for k, v in zip(self.k, self.v)]

    def restore_slot(self, seg: Segment, i: int, saved):
        page, off = seg.pages[i // self.page_size], i % self.page_size
        for (k, v), (ks, vs) in zip(zip(self.k, self.v), saved):
            k[page, off], v[page, off] = ks, vs

    # ---- one step's appends as a unit ----------------------------------------------------
    def begin_append(self):
        """Record the appends that follow, so that rollback_append can undo them."""
        self._journal = ([], [])

    def end_append(self):
        self._journal = None

    def rollback_append(self):
        """Undo the appends since begin_append (a step that failed before its tokens were
        accepted): each segment back to its length, each page taken back to where it came
        from (its reservation, or the free pool). Slots written past a length are unseen."""
        pages, grown = self._journal
        self._journal = None
        for seg, length, npages in reversed(grown):
            del seg.pages[npages:]  # (a segment may hold a page past its length: a re-written token's)
            seg.length = length
        for page, res in reversed(pages):
            assert self._page_refs[page] == 1, "a page taken in the failed step gained references"
            self._page_refs[page] = 0
            self._free_pages.append(page)
            if res is not None:
                res.pages += 1
                self._reserved += 1

    def stats(self) -> dict:
        return {"pages_total": self.num_pages, "pages_free": self.pages_free,
                "pages_used": self.pages_used, "pages_reserved": self._reserved,
                "page_size": self.page_size, "segments": len(self.segments)}
