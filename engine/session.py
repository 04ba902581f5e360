"""The programmable thread API.

    s = llm.session(prompt)                                   # s.root: ThreadHandle
    a, b = s.fork(s.root, ["\\n<Path>\\n1:", "\\n<Path>\\n2:"])
    outs = s.generate([a, b], SamplingParams(...))            # one batched pass per step
    c = s.join([a, b], header="<Conclusion>", positions="max")
    out = s.generate([c], SamplingParams(...))[0]
    s.close()                                                 # frees every page it holds

Forks and max/sequential joins never copy or recompute K/V: a child's view names
its ancestors' segments; a continuation's view names the joined threads' ones.
"""
from __future__ import annotations

import weakref

from .core import own_text
from .interrupts import DEFERRED
from .llm import _as_list, engine_method
from .outputs import CompletionOutput
from .sampling_params import SamplingParams, _is_int
from .threads import Thread, ThreadTree


class ThreadHandle:
    """A user's handle on one thread of a session. It refers to its session weakly: the
    session holds its handles, so a strong reference back would make a cycle, and a
    session dropped without close() would keep its pages until Python's cycle collector
    happened to run (refusing requests meanwhile). A dropped session closes at once (while
    another Python thread runs an engine call: first thing in the LLM's next call); its
    handles still read their tokens and text, and the verbs refuse them."""

    def __init__(self, session: "Session", thread: Thread):
        self._session, self._t = weakref.ref(session), thread
        self._tokenizer = session._llm.tokenizer  # (not the LLM's core: a handle kept after its LLM
        #                                            was dropped kept the weights and KV cache)

    def __copy__(self):  # a handle names one thread of one live session: copies are the handle
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("a ThreadHandle cannot be pickled: it names a thread of a live session.")

    @property
    def _s(self) -> "Session":
        s = self._session()
        if s is None:
            raise ValueError(f"thread {self._t.id}'s session was dropped (and closed, freeing its pages); "
                             "keep a reference to the Session while you use its threads.")
        return s

    @property
    def id(self) -> int:
        return self._t.id

    @property
    def token_ids(self) -> list[int]:
        """The tokens of this thread's own segment (header, injected and sampled)."""
        return list(self._t.tokens)

    @property
    def text(self) -> str:
        """The text of its tokens (engine.core.own_text)."""
        return own_text(self._tokenizer, self._t)

    @property
    def parent(self) -> "ThreadHandle | None":
        return self._s._handle(self._t.parent) if self._t.parent is not None else None

    @property
    def children(self) -> list["ThreadHandle"]:
        return [self._s._handle(c) for c in self._t.children]

    @property
    def position(self) -> int:
        """Home position of this thread's next token."""
        return self._t.end

    def __repr__(self):
        return f"ThreadHandle(id={self.id}, tokens={len(self._t.tokens)})"


serialized = engine_method(True, lambda session: session._llm)  # (see engine.llm.engine_call)
locked = engine_method(False, lambda session: session._llm)


class Session:
    """A thread tree over one prompt (``llm.session(prompt)``; ``root``: the prompt's thread).
    Verbs: fork, join, spawn, set_view, inject, generate; ``close()`` (or a ``with`` block)
    frees every page the session holds. Their rules: engine/DESIGN.md, section 5."""

    def __init__(self, llm, prompt_ids: list[int]):
        self._llm = llm
        self.tree = ThreadTree(llm.cache, max_positions=llm.config.max_position_embeddings,
                               context_source=llm.config.context_source)
        self._handles: dict[int, ThreadHandle] = {}
        try:
            self.root = self._handle(self.tree.new_root(prompt_ids))
        except BaseException:  # (the half-made session, which the error's traceback holds, holds nothing)
            self.tree.close()
            self.tree = None
            raise
        self.forward_steps = 0

    # ---- helpers ---------------------------------------------------------------------------
    def _handle(self, t: Thread) -> ThreadHandle:
        h = self._handles.get(t.id)
        if h is None:
            # (setdefault, not a test then a store: a handle's parent / children, read in another
            # Python thread without the engine's lock, may make this thread's handle meanwhile;
            # a second one stored over it left the first refused by every verb, "not a thread
            # of this session")
            h = self._handles.setdefault(t.id, ThreadHandle(self, t))
        return h

    def _threads(self, hs, verb: str) -> list[Thread]:
        if not isinstance(hs, (list, tuple)):
            raise ValueError(f"{verb}() takes a list of threads, got {type(hs).__name__}.")
        return [self._thread(h) for h in hs]

    def _thread(self, h) -> Thread:
        if not isinstance(h, ThreadHandle) or h._s is not self or self._handles.get(h.id) is not h:
            raise ValueError(f"{h!r} is not a thread of this session.")
        return h._t

    def _tokens(self, x, what: str = "header") -> list[int]:
        if x is None:
            return []
        if isinstance(x, str):
            return self._llm.core.encode_text(x)
        x = _as_list(x)  # (a numpy array or tensor of ids, as prompts take them: a list, copied)
        if not isinstance(x, (list, tuple)):
            hint = " (a fork takes a list of these, one per child)" if what == "header" else ""
            raise ValueError(f"{what} {x!r:.60} must be a string or a list of token ids{hint}.")
        ids = list(x)
        V = self._llm.config.vocab_size
        if not all(_is_int(i) and 0 <= i < V for i in ids):
            raise ValueError(f"{what} {x!r:.60} must be a string or token ids in [0, {V}).")
        return [int(i) for i in ids]

    def _check_open(self):
        if self.tree is None:
            raise ValueError("This session is closed.")

    def _unmake(self, made: list[Thread]):
        """Take back threads a verb made (a Ctrl-C deferred to its end: the caller never got
        them), their handles included."""
        for t in made:
            self._handles.pop(t.id, None)
        self.tree._unmake(made)

    # ---- verbs -----------------------------------------------------------------------------
    @serialized
    def fork(self, parent: ThreadHandle, headers) -> list[ThreadHandle]:
        """One child per header (str or token ids; "" or [] for none). The children see the
        parent as it is now, so the parent takes no more tokens afterwards (generate() and
        inject() on it raise); to go on with its text, fork one more child."""
        self._check_open()
        if isinstance(headers, (str, int)) or not isinstance(headers, (list, tuple)):
            raise ValueError("fork() takes a list of headers, one per child.")
        p = self._thread(parent)
        kids = self.tree.fork(p, [self._tokens(h) for h in headers])
        hs = [self._handle(k) for k in kids]

        def undo():
            p.events.pop()  # (its "fork" event)
            self._unmake(kids)
        self._llm._undo = undo
        return hs

    @serialized
    def join(self, threads: list[ThreadHandle], header=None, positions: str = "max") -> ThreadHandle:
        """A continuation that sees every joined thread. ``positions``: "max" (all siblings
        start at the fork position; the continuation after the longest), "sequential"
        (siblings placed one after another by shifts) or "reprefill" (joined text prefilled
        again causally). The header must not be empty: the continuation's first token is
        sampled after it, seeing all joined threads. The joined threads take no more tokens."""
        self._check_open()
        hdr = self._tokens(header)
        if not hdr:
            raise ValueError("join() needs a non-empty header (e.g. '<Conclusion>') so that the "
                             "continuation's first token is computed with every joined thread in view.")
        ts = self._threads(threads, "join")
        t = self.tree.join(ts, hdr, positions)
        h = self._handle(t)

        def undo():
            for u in ts:
                u.joined_into = None
                u.events.pop()  # (its "join" event)
            self._unmake([t])
        self._llm._undo = undo
        return h

    @serialized
    def spawn(self, view: list[ThreadHandle], header=None) -> ThreadHandle:
        """A new thread that attends ``view`` live (each named thread's segment, laid out one
        after another as it grows) and then its own segment, which starts with ``header``."""
        self._check_open()
        if not isinstance(view, (list, tuple)) or not view:
            raise ValueError("spawn() needs a non-empty view: a list of this session's threads.")
        t = self.tree.spawn([self._thread(h) for h in view], self._tokens(header))
        h = self._handle(t)
        self._llm._undo = lambda: self._unmake([t])
        return h

    @serialized
    def set_view(self, thread: ThreadHandle, view: list[ThreadHandle]):
        """Replace what a spawned thread attends; cycles between threads are allowed."""
        self._check_open()
        t = self._thread(thread)
        if t.live is None:
            raise ValueError(f"thread {t.id} was not spawned with a live view; only spawn()ed "
                             "threads can change their view.")
        old = t.live, t.view
        self.tree.set_view(t, self._threads(view, "set_view"))

        def undo():
            c = self._llm.cache
            for s, _ in old[1][:-1]:
                c.retain(s)
            for s, _ in t.view[:-1]:
                c.release_segment(s)
            t.live, t.view = old
        self._llm._undo = undo

    @serialized
    def inject(self, thread: ThreadHandle, tokens):
        """Append tokens (str or ids) to a thread; written by the next step's extend pass."""
        self._check_open()
        t, ids = self._thread(thread), self._tokens(tokens, "injected text")
        self.tree.inject(t, ids)

        def undo():
            del t.tokens[len(t.tokens) - len(ids):], t.pending[len(t.pending) - len(ids):]
        self._llm._undo = undo

    @serialized
    def generate(self, threads: list[ThreadHandle], sampling_params: SamplingParams | None = None
                 ) -> list[CompletionOutput]:
        """Advance ``threads`` together, one batched forward per step, until each stops
        (``max_total_tokens``: over all of them, the first ones taking what is left).
        Returns one CompletionOutput per thread (the tokens generated by this call)."""
        self._check_open()
        p = self._llm.core.call_params(SamplingParams() if sampling_params is None else sampling_params)
        if p.n != 1:
            raise ValueError("Session.generate runs each given thread once (n=1); fork the thread "
                             "to get several samples.")
        if p.prompt_logprobs is not None:
            raise ValueError("SamplingParams.prompt_logprobs applies to LLM.generate's prompts; a session's "
                             "threads have none: LLM.score(token_ids) gives the log-probs of any tokens.")
        if p.truncate_prompt_tokens is not None:
            raise ValueError("SamplingParams.truncate_prompt_tokens applies to LLM.generate's prompts; a "
                             "session's threads have none: give LLM.session the prompt's last tokens.")
        ts = self._threads(threads, "generate")
        if len({t.id for t in ts}) != len(ts):
            raise ValueError("A thread appears twice in generate().")
        for t in ts:
            self.tree.check_growable(t)  # (open; not forked or joined: see ThreadTree.check_growable)
            if not t.tokens and t.parent is None:
                raise ValueError(f"thread {t.id} has no tokens to continue from.")
        core, llm = self._llm.core, self._llm
        for t in ts:
            # (seeded: the thread's length in the key, so that each call on it draws anew)
            core.begin(t, p, llm._thread_generator(p, t.id + (len(t.tokens) << 24)))
        left = p.max_total_tokens  # (tokens this call may still sample over all its threads)
        try:
            while True:
                active = core.samplers_of(ts, left)  # (as a protocol's)
                if not active:
                    break
                if left is not None:
                    left -= len(active)
                tokens = core.step(self._feed(active), active)
                self.forward_steps += 1
                llm._rng_kept = True  # (the threads keep these tokens even if the call fails later)
                for t, tok in zip(active, tokens):
                    core.accept(t, tok)
        except BaseException as e:
            for t in ts:  # leave the threads consistent: stopped where they are
                if not t.finished:
                    t.finish_reason = "abort"
            rows = getattr(e, "rows", ())  # (non-finite logits: indices into the step's samplers)
            if isinstance(e, FloatingPointError) and rows and e.args:
                bad = {id(active[r]) for r in rows}
                at = [i for i, t in enumerate(ts) if id(t) in bad]
                many = len(at) > 1
                e.args = (f"{e.args[0]} They come from the thread{'s' * many} at position{'s' * many} "
                          f"{', '.join(map(str, at))} of this call's list (0-based; thread id{'s' * many} "
                          f"{', '.join(str(ts[i].id) for i in at)}).", *e.args[1:])
            raise
        return [CompletionOutput(i, core.text_of(t), list(t.generated), t.finish_reason,
                                 t.logprobs, t.stop_reason) for i, t in enumerate(ts)]

    def _feed(self, active: list[Thread]) -> list[Thread]:
        """The threads whose pending tokens this step writes: the sampling threads and the
        threads their views read, transitively (another thread's pending header, e.g. one
        that cannot fit the cache now, waits until something reads it).

        A fork child's or join continuation's (static) view already holds the views of the
        threads it reads (a fork child: its parent's view; a join: the union of the joined
        threads'), so a static thread found through a static thread's view adds nothing more:
        only live views are followed further. Each thread is entered once (a deep tree's
        views are long: following every view of every thread read was O(threads x view) a
        step), and only the threads the views name are looked at (every open thread of the
        session was, at every step: a session that forks a child per request, each child left
        with its last sampled token pending, took longer a step with each child it had made)."""
        owner = self.tree.by_seg
        need, seen, stack = {t.id: t for t in active}, {t.id for t in active}, list(active)
        while stack:
            t = stack.pop()
            for s, _ in t.view[:-1]:
                u = owner.get(s.id)
                if u is None or u.seg is not s:
                    continue
                if u.pending:
                    need[u.id] = u
                if (t.live is not None or u.live is not None) and u.id not in seen:
                    seen.add(u.id)
                    stack.append(u)
        return sorted((t for t in need.values() if t.pending), key=lambda t: t.id)  # (creation order)

    @locked
    def pages_held(self) -> int:
        return self.tree.pages_held() if self.tree is not None else 0

    @locked
    def close(self):
        """Free every page this session holds. Idempotent."""
        if self.tree is not None:
            self.tree.close()
            self.tree = None

    def _close_or_hand_over(self):
        """close(), unless another Python thread runs an engine call (or this one is inside the
        engine lock's own bookkeeping, where the garbage collector may run this): then the LLM's
        next call closes the tree (engine_call), and this returns at once. (A dropped session waited for
        that call to end, in whatever thread dropped it: a server thread stalled for a whole
        generate, and in the main thread a Ctrl-C meanwhile was lost, a second one left the
        session's pages held for good.)"""
        llm = self._llm
        with DEFERRED:  # (main thread: a Ctrl-C from here waits until the lock is let go again)
            if not llm._lock.acquire(blocking=False):
                tree, self.tree = self.tree, None
                if tree is not None:
                    llm._dropped.append(tree)
                return
            try:
                self.close()
            finally:
                llm._lock.release()

    def __del__(self):
        if getattr(self, "tree", None) is None:
            return
        try:
            self._close_or_hand_over()
        except KeyboardInterrupt:
            # A Ctrl-C before the lock was tried or as the close ended: finish freeing, then
            # hand it to the engine call this runs inside, if any (Python drops exceptions
            # raised in __del__).
            try:
                self._close_or_hand_over()
            except BaseException:
                pass
            if DEFERRED._depth > 0:
                DEFERRED.pending = True
        except Exception:  # interpreter shutdown: the cache may be gone already
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
