"""Threads and the engine verbs over them: fork, join, inject, finish.

A ``Thread`` writes into its own segment and attends a view: an ordered list of
(segment, shift) pairs, its own segment last. A ``ThreadTree`` owns the threads
of one request or session and their segment references. No verb copies or
recomputes K/V, except a ``reprefill`` join, whose point is to recompute.

Positions (DESIGN.md §3): a thread's tokens sit at home positions
``seg.base + i``; its *end* is ``seg.base + len(tokens)``. A view entry (s, shift)
shows segment s at positions ``s.base + shift + i``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .cache import KVCache, Reservation, Segment

JOIN_SCHEMES = ("max", "sequential", "reprefill")


@dataclass(eq=False)
class Thread:
    id: int
    seg: Segment
    view: tuple[tuple[Segment, int], ...]    # own segment last; immutable: assign a new tuple
    tokens: list[int] = field(default_factory=list)   # own segment: written + pending
    pending: list[int] = field(default_factory=list)  # not yet in the cache
    parent: "Thread | None" = None
    children: list["Thread"] = field(default_factory=list)
    joined_into: "Thread | None" = None
    header_len: int = 0                       # leading tokens that were injected, not sampled
    path_tokens: int = 0                      # sampled tokens on the chain root..this thread
    last_logits: torch.Tensor | None = None   # next-token logits after the last written token
    # (a thread that sampled in the last step: that step's logits [R, V], this thread's its row
    # logits_row, until EngineCore.settle; a view a thread and step cost ~1-2 us: core.logits_of)
    logits_row: int | None = None
    # (live views) last_logits were computed in a step where this thread did not sample:
    # its view may have grown since, so its next sample re-feeds its last token first
    logits_stale: bool = False
    closed: bool = False
    events: list[dict] = field(default_factory=list)
    # sampling state of the current generate call
    params: object = None
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None      # as vLLM: a stop string or stop_token_ids' token; the tokenizer's EOS: None
    stop_token: int | None = None             # the EOS or stop token that ended it (not in its text)
    stop_text: str | None = None              # its text when a stop ended it: cut before the stop
    text_stream: object = None                # its sampled text so far, for stop strings
    text_context: list[int] = field(default_factory=list)  # the last tokens before this call's (decoding)
    penalties: object = None                  # sampler.Penalties when its params penalize repeats
    carried_counts: torch.Tensor | None = None  # sampled-token counts it continues (a Hogwild! worker's
                                              # earlier steps): presence / frequency penalties count them
    tag: object = None                        # free slot for the protocol driving it
    live: "list[Thread] | None" = None        # live view: these threads' segments, laid out
                                              # one after another, then its own (Hogwild!)
    lead: tuple = ()                          # segments its text begins with before its own, which a
                                              # live view of it reads too (a root's shared prompt prefix)

    @property
    def end(self) -> int:
        return self.seg.base + len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self):
        return f"Thread({self.id}, seg={self.seg.id}, len={len(self.tokens)}, view={len(self.view)})"


class ThreadTree:
    """The threads of one request or session, and the segment references they hold."""

    def __init__(self, cache: KVCache, reservation: Reservation | None = None,
                 max_positions: int | None = None, context_source: str = "max_position_embeddings"):
        self.cache, self.reservation = cache, reservation
        self.threads: list[Thread] = []
        self.open: dict[int, Thread] = {}     # the threads not discarded, in creation order
        self.by_seg: dict[int, Thread] = {}   # the same, by their own segment's id
        self._segs: list[Segment] = []        # segments this tree made (pages_held: the live ones)
        self._ids = itertools.count()
        self.root: Thread | None = None
        # When set (sessions): tokens placed past this position are refused up front (the
        # model's context; a Mistral window cap keeps Loom exact only inside it).
        self.max_positions = max_positions
        self.context_source = context_source

    def _check_room(self, end: int, tokens: int, what: str):
        """Sessions' verbs (requests reserve their worst case instead): the last position must
        be within the model's context, and a segment of ``tokens`` tokens must fit the whole
        cache (else no step can ever write it)."""
        if self.max_positions is None:
            return
        if end > self.max_positions:
            raise ValueError(f"{what} would reach position {end}, past the model's context of "
                             f"{self.max_positions} tokens ({self.context_source}); shorten it, or "
                             "continue from a thread that has room.")
        c = self.cache
        need = c.pages_for(tokens)
        if need > c.num_pages:
            raise ValueError(f"{what} would need {need} pages of the KV cache, which has {c.num_pages} pages of "
                             f"{c.page_size} tokens; shorten it, or raise kv_cache_tokens (now "
                             f"{c.num_pages * c.page_size}).")

    # ---- creation --------------------------------------------------------------------------
    def _new_thread(self, base: int, view: list[tuple[Segment, int]], parent: Thread | None,
                    header: list[int], what: str = "A new thread's header") -> Thread:
        self._check_room(base + len(header), len(header), what)
        made = len(self.threads)
        try:
            return self._make_thread(base, view, parent, header)
        except BaseException:  # (e.g. a MemoryError queueing the header: a join's or spawn's
            self._unmake(self.threads[made:])  # thread, which the caller never gets, undone)
            raise

    def _make_thread(self, base: int, view: list[tuple[Segment, int]], parent: Thread | None,
                     header: list[int]) -> Thread:
        seg = self.cache.new_segment(base, self.reservation)
        for s, _ in view:
            self.cache.retain(s)
        th = Thread(next(self._ids), seg, tuple(view) + ((seg, 0),), parent=parent)
        seg.tokens = th.tokens
        self.threads.append(th)
        self.open[th.id] = th
        self.by_seg[seg.id] = th
        self._segs.append(seg)
        if parent is not None:
            parent.children.append(th)
        self.inject(th, header, header=True)
        return th

    def new_root(self, prompt_ids: list[int], prefix: tuple = ()) -> Thread:
        """The prompt's thread. ``prefix``: (segment, 0) entries holding the prompt's first
        tokens, written by others (LLM.generate's shared prompt prefixes, each segment after
        the one before it); the root reads them and writes the rest of the prompt after them."""
        assert self.root is None, "a tree has one root"
        base = prefix_end(prefix)
        assert 0 <= base < len(prompt_ids), "a shared prefix leaves the root at least one token"
        self.root = self._new_thread(base, list(prefix), None, list(prompt_ids[base:]),
                                     what=f"The {len(prompt_ids)}-token prompt")
        self.root.lead = tuple(s for s, _ in prefix)  # (segments others made: the tree's prompt prefix)
        return self.root

    def prompt_ids(self) -> list[int]:
        """The root's whole prompt: its shared prefix segments' tokens (its lead), then its own."""
        return [x for s in self.root.lead for x in s.tokens] + self.root.tokens

    def fork(self, parent: Thread, headers: list[list[int]]) -> list[Thread]:
        """k children of ``parent``: each sees the parent's view (its own segment included)
        and starts at the parent's end position with its header pending."""
        self._check_open(parent)
        self._check_static(parent, "fork")
        if not headers:
            raise ValueError("fork() needs at least one child header (an empty list [] is a valid header).")
        for h in headers:  # (all checked before any child exists)
            self._check_room(parent.end + len(h), len(h), f"A header of {len(h)} tokens after thread {parent.id}")
        made = len(self.threads)
        try:
            kids = [self._new_thread(parent.end, parent.view, parent, list(h)) for h in headers]
        except BaseException:  # (e.g. a MemoryError making the second child: the parent not forked)
            self._unmake(self.threads[made:])
            raise
        for k in kids:
            k.path_tokens = parent.path_tokens
        parent.events.append({"event": "fork", "children": [k.id for k in kids]})
        return kids

    def join(self, threads: list[Thread], header: list[int], positions: str = "max") -> Thread:
        """A continuation whose view is the ordered union of the joined threads' views."""
        if positions not in JOIN_SCHEMES:
            raise ValueError(f"positions={positions!r} is not a join scheme; use one of {JOIN_SCHEMES}.")
        if not threads:
            raise ValueError("join() needs at least one thread.")
        for t in threads:
            self._check_open(t)
            self._check_static(t, "join")
            if t.joined_into is not None:
                raise ValueError(f"thread {t.id} was already joined into thread {t.joined_into.id}.")
        if len({t.id for t in threads}) != len(threads):
            raise ValueError("join() names a thread twice.")
        own = {t.seg.id: t for t in threads}
        for t in threads:
            for s, _ in t.view[:-1]:
                if s.id in own:
                    raise ValueError(f"join() of thread {own[s.id].id} with thread {t.id}, which sees it already "
                                     f"(its ancestor, or a thread joined into it): join threads that do not see "
                                     "each other, e.g. the children of one fork.")
        common = set.intersection(*({s.id for s, _ in t.view[:-1]} for t in threads))
        ctx = [(s, sh) for s, sh in threads[0].view if s.id in common]
        parent = threads[0].parent if all(t.parent is threads[0].parent for t in threads) else None
        if positions == "reprefill":
            text = [tok for t in threads for s, _ in t.view if s.id not in common
                    for tok in s.tokens]
            # (after the common context's last token: a thread's part the others do not share
            # may begin before it, e.g. a max join's sibling of the others' parent)
            start = max((s.base + sh + len(s.tokens) for s, sh in ctx if s.tokens), default=0)
            cont = self._new_thread(start, ctx, parent, text + list(header),
                                    "The reprefill join's continuation (the joined text and its header)")
            cont.header_len = len(cont.tokens)
        else:
            # sequential: the first thread keeps its layout; each next one's segments not shown
            # yet are shifted so that their first token follows the previous thread's end (a
            # segment two threads share, e.g. their common parent below a shallower sibling,
            # is shown once, and takes no positions twice)
            view, seen, end = list(ctx), set(common), None
            for t in threads:
                new = [(s, sh) for s, sh in t.view if s.id not in seen]
                d = 0
                if positions == "sequential" and end is not None:
                    d = end - min((s.base + sh for s, sh in new if s.tokens), default=t.end)
                for s, sh in new:
                    seen.add(s.id)
                    view.append((s, sh + d))
                end = t.end + d
            base = end if positions == "sequential" else max(t.end for t in threads)
            cont = self._new_thread(base, view, parent, list(header),
                                    f"The {positions} join's continuation (with its header)")
        cont.path_tokens = max(t.path_tokens for t in threads)
        for t in threads:
            t.joined_into = cont
            t.events.append({"event": "join", "into": cont.id, "positions": positions})
        return cont

    # ---- live views (Hogwild!) -------------------------------------------------------------
    def spawn(self, view: list[Thread], header: list[int]) -> Thread:
        """A thread whose view is ``view`` (threads, read live as they grow) then its own
        segment, which starts where the view's layout ends now."""
        if not header and not (len(view) == 1 and view[0] is self.root):
            raise ValueError("spawn() needs a non-empty header unless the view is just the root.")
        self._check_view(view)
        base = layout_end(view)
        th = self._new_thread(base, [(s, 0) for s in _lead(view)] + [(u.seg, 0) for u in view],
                              self.root if not header else None, list(header), "The spawned thread's header")
        th.live = list(view)
        refresh_view(th)
        return th

    def set_view(self, th: Thread, view: list[Thread]):
        """Replace a live thread's view (cycles between threads are allowed)."""
        self._check_open(th)
        if any(u is th for u in view):
            raise ValueError(f"thread {th.id}'s view cannot contain itself (its own segment is "
                             "always last).")
        self._check_view(view)
        if not th.tokens and not (len(view) == 1 and view[0] is self.root):
            raise ValueError(f"thread {th.id} has no tokens yet: its first token would be sampled from the "
                             "root's logits, not after this view; spawn it with a header, or inject "
                             "tokens into it before changing its view.")
        self._check_room(layout_end(view) + len(th.tokens), len(th.tokens),
                         f"The new view of thread {th.id} (laid out, then its {len(th.tokens)} tokens)")
        lead = _lead(view)
        for s in lead:
            self.cache.retain(s)
        for u in view:
            self.cache.retain(u.seg)
        for s, _ in th.view[:-1]:
            self.cache.release_segment(s)
        th.live = list(view)
        th.view = tuple((s, 0) for s in lead) + tuple((u.seg, 0) for u in view) + ((th.seg, 0),)
        refresh_view(th)

    def _check_view(self, view: list[Thread]):
        """A live view names open threads, each once (a thread whose text begins in segments
        before its own, a root reading a shared prompt prefix, first: laid out from its start)."""
        if len({u.id for u in view}) != len(view):
            raise ValueError("a view names the same thread twice.")
        if any(u.lead for u in view[1:]):
            raise ValueError("a thread reading a shared prompt prefix (the root of a request sharing one) must "
                             "come first in a live view.")
        for u in view:
            self._check_open(u)

    def drop_view(self, th: Thread):
        """A finished, fully written thread lets go of the segments its view reads (it will
        not sample or write again): they are freed once no other view holds them. Its own
        segment stays, for the views that read it."""
        if not th.finished or th.pending or th.closed:
            raise ValueError(f"thread {th.id} may still need its view (unfinished, unwritten or closed).")
        for s, _ in th.view[:-1]:
            self.cache.release_segment(s)
        th.view = ((th.seg, 0),)
        th.live = None

    def compact(self, threads: list[Thread], base: int, inv_freq: torch.Tensor) -> Thread:
        """Rewrite the segments of ``threads`` (fully written, in order) once into one new
        contiguous segment starting at home position ``base``: V copied, K re-rotated from
        each token's old home position to its new one. Returns a finished thread owning it;
        callers re-point views to it and discard the old threads."""
        from .attention.reference import rotate_by
        for t in threads:
            if t.pending:
                raise ValueError(f"thread {t.id} has unwritten tokens; compact after they are written.")
        th = self._new_thread(base, [], None, [])
        th.tokens.extend(tok for t in threads for tok in t.tokens)  # (in place: th.seg.tokens is this list)
        total = len(th.tokens)
        dev = self.cache.k[0].device  # (index and angle tensors on the pools' device)
        slots = torch.tensor(self.cache.append_slots(th.seg, total), dtype=torch.long, device=dev)
        ps = self.cache.page_size
        src, delta = [], []
        pos = base
        for t in threads:
            n = t.seg.length
            src += [t.seg.pages[i // ps] * ps + i % ps for i in range(n)]
            delta += [pos - t.seg.base] * n
            pos += n
        src_t = torch.tensor(src, dtype=torch.long, device=dev)
        delta_t = torch.tensor(delta, dtype=torch.long, device=dev)
        inv_freq = inv_freq.to(dev)
        for kp, vp in zip(self.cache.k, self.cache.v):
            Hkv, D = kp.shape[2], kp.shape[3]
            kf, vf = kp.view(-1, Hkv, D), vp.view(-1, Hkv, D)
            k = rotate_by(kf[src_t], delta_t, inv_freq).to(kf.dtype)
            kf.index_copy_(0, slots, k)
            vf.index_copy_(0, slots, vf[src_t])
        th.finish_reason = "compacted"
        return th

    def inject(self, th: Thread, tokens: list[int], header: bool = False):
        """Queue tokens into ``th``'s own segment (written by the next step's extend pass)."""
        self._check_open(th)
        if tokens:
            check_growable(th)
            if not header:  # (a new thread's header was checked by _new_thread)
                self._check_room(effective_end(th) + len(tokens), len(th.tokens) + len(tokens),
                                 f"Injecting {len(tokens)} tokens into thread {th.id}")
        th.tokens.extend(tokens)
        th.pending.extend(tokens)
        if header:
            th.header_len += len(tokens)

    def _check_open(self, th: Thread):
        if th.closed:
            raise ValueError(f"thread {th.id} is closed.")

    def _check_static(self, th: Thread, verb: str):
        """Fork children and join continuations keep the view they are given: a live view's
        threads go on growing into the positions its re-layout gives them each step, which a
        kept copy of its shifts would not follow."""
        if th.live is not None:
            raise ValueError(f"thread {th.id} reads a live view (spawn / set_view), which a {verb} cannot keep; "
                             "spawn a new thread with the view you want instead.")

    def check_growable(self, th: Thread):
        """``th`` may take more tokens: it is open, and no fork child or join continuation
        sees its segment (they see it as it was then, a prefix: a token added later would
        sit at the positions of their own tokens, a silent wrong context)."""
        self._check_open(th)
        check_growable(th)

    # ---- release ---------------------------------------------------------------------------
    def discard(self, th: Thread):
        """Drop a thread's references (its segment survives while any view holds it)."""
        if th.closed:
            return
        th.closed = True
        del self.open[th.id]
        del self.by_seg[th.seg.id]
        th.last_logits = th.logits_row = th.penalties = None
        for s, _ in th.view:
            self.cache.release_segment(s)

    def _unmake(self, made: list[Thread]):
        """Take back the threads a verb made before it failed, so that it changed nothing: their
        pages and references, their places in the tree, and their ids (a seeded thread's draws
        depend on its id)."""
        for th in reversed(made):
            self.discard(th)
            self.threads.remove(th)
            self._segs.remove(th.seg)
            if th.parent is not None:
                th.parent.children.remove(th)
        if made:
            self._ids = itertools.count(made[0].id)

    def close(self):
        for th in self.threads:
            self.discard(th)
        if self.reservation is not None:
            self.cache.release(self.reservation)
            self.reservation = None

    def pages_held(self) -> int:
        """Pages of the segments the open threads' views hold: the live segments this tree
        made (a segment lives while a view holds it, and only this tree's views name its
        segments). O(live segments), not O(threads x view): the scheduler asks every step."""
        self._segs = [s for s in self._segs if s.refs > 0]
        held = sum(len(s.pages) for s in self._segs)
        if self.root is not None and self.root.lead and self.open:  # (a shared prompt prefix its open threads read)
            held += sum(len(s.pages) for s in self.root.lead)
        return held


def prefix_end(prefix) -> int:
    """The position after a (segment, 0) chain of prompt-prefix segments (0: none)."""
    return prefix[-1][0].base + prefix[-1][0].length if prefix else 0


def check_growable(t: Thread):
    """Refuse more tokens for a thread that was joined, or forked into children that see it
    (they see its segment as it was at the fork / join; see ThreadTree.check_growable)."""
    if t.joined_into is not None:
        raise ValueError(f"thread {t.id} was joined into thread {t.joined_into.id}, which sees it as it was "
                         f"at the join; it cannot take more tokens: continue from thread {t.joined_into.id}.")
    kids = [k.id for k in t.children if k.live is None]
    if kids:
        raise ValueError(f"thread {t.id} was forked: its children {kids} see it as it was at the fork, so it "
                         "cannot take more tokens; to continue its text, fork one more child of it.")


def _lead(view: list[Thread]) -> tuple:
    """The segments a live view reads before its first thread's own: that thread's lead."""
    return view[0].lead if view else ()


def layout_end(view: list[Thread]) -> int:
    """Where a live view laid out ends once this step's pending tokens are written: each viewed
    thread counts what its segment will hold (an open thread: its tokens; a closed one: its
    segment's length)."""
    return (view[0].seg.base if view else 0) + sum([u.seg.length if u.closed else len(u.tokens) for u in view])


def effective_end(t: Thread) -> int:
    """The position ``t``'s next token takes: its end, or for a live view the view's layout
    end (after this step's writes) plus its own tokens (see refresh_view)."""
    return t.end if t.live is None else layout_end(t.live) + len(t.tokens)


def refresh_view(t: Thread):
    """Recompute a live view's shifts from current lengths so that the thread sees its
    view as one contiguous text: view threads one after another, then its own tokens.
    Shifts are relative to the own segment's (whose home positions never change)."""
    if t.live is None:
        return
    pos = t.live[0].seg.base if t.live else 0
    starts = []
    for u in t.live:
        starts.append(pos)
        pos += u.seg.length if u.closed else len(u.tokens)  # (as layout_end counts it)
    own = pos - t.seg.base
    # (the first thread's lead sits before it at home positions, as that thread does: its shift)
    lead = tuple((s, -own) for s in _lead(t.live))
    t.view = lead + tuple([(u.seg, st - u.seg.base - own) for u, st in zip(t.live, starts)]) + ((t.seg, 0),)
