"""Model-triggered fork/join: the shared state machine of Multiverse, ThreadWeaver
and Parallel-R1 style protocols, and the bookkeeping every tree protocol needs
(budgets, forks, joins, outputs, events).

Threads have a *role*: ``main`` (the request's sequential thread; its end ends the
request) or ``path`` (a child of a fork; it ends at the path close tag, EOS, or
its budget). When every child of a fork has ended, they are joined into a
continuation that takes over the parent's role. Tags are plain strings matched
on decoded text, so they work whether the tokenizer has them as special tokens
or spells them out; where two end at one place (one the other's end), the longer
is the tag written.

Malformed output never crashes or hangs; each case is recorded in the output's
``events`` with what was done:

| case | behaviour |
| --- | --- |
| close tag in a ``main`` thread (nothing open) | ``stray_close``: ignored, continue |
| fork tag with no block open (tagged protocols) | ``unbalanced``: ignored, continue |
| fork tag with no outline items | ``empty_outline``: continue sequentially |
| more items than ``max_paths`` | ``too_many_items``: fork the first ``max_paths`` |
| fork at depth ``max_depth`` | ``depth_limit``: continue sequentially |
| fork within ``fork_margin`` of the budget (or on its last token) or past ``max_threads`` | ``budget``: continue sequentially |
| path ends without its close tag (EOS, budget) | ``unclosed_path``: close tag injected, then join |
| item number longer than 6 digits | ``long_item_number``: the child is numbered by position |
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core import own_text
from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from ..threads import Thread
from ..tokenizer import TextStream
from .base import Protocol, ProtocolRun, int_arg, min_tokens_owed, one_output_only, tokens_at_most
from .sampling import last_boxed


@dataclass
class TreeLimits:
    """A tree protocol's bounds: forks nested ``max_depth`` deep, ``max_paths`` children a
    fork, ``max_threads`` threads a request, no fork within ``fork_margin`` tokens of the
    budget. Without SamplingParams.max_total_tokens, ``max_paths`` x ``max_tokens`` bounds
    the tokens a request samples over all its threads."""
    max_depth: int = 2            # nesting levels of forks
    max_paths: int = 8            # children per fork
    max_threads: int = 64         # threads per request
    fork_margin: int = 16         # no fork with fewer budget tokens than this left

    def __post_init__(self):
        self.verify()

    def verify(self):
        for k in ("max_depth", "max_paths", "max_threads"):
            setattr(self, k, int_arg(k, getattr(self, k), 1))
        self.fork_margin = int_arg("fork_margin", self.fork_margin, 0)


@dataclass(eq=False)
class ThreadState:
    role: str                     # "main" | "path"
    depth: int
    text: str = ""                # decoded text of this thread's sampled tokens
    stream: object = None         # its TextStream (whole characters: tags may be non-ASCII)
    scan: int = 0                 # text already scanned for tags
    block_at: int | None = None   # where the current fork block opened
    skip: int = 0                 # leading own tokens that re-read joined text (reprefill)
    group: "ForkGroup | None" = None  # the fork this thread is a child of

    def next_text(self, tokenizer, tok: int, context=()) -> str:
        """The text ``tok`` completes (special tokens spelled out: tags may be special), read
        after ``context`` (the tokens the thread's text follows: decoded alone, a SentencePiece
        decoder stripped its first space, and a tag beginning with one was missed there)."""
        if self.stream is None:
            from ..tokenizer import TextStream
            self.stream = TextStream(tokenizer, skip_special_tokens=False, context=context)
        return self.stream.push(tok)


@dataclass(eq=False)
class ForkGroup:
    parent: Thread
    children: list[Thread]
    role: str
    depth: int
    cont: Thread | None = None     # the continuation, once joined


class TreeRun(ProtocolRun):
    """Budgets, joins and outputs common to tree protocols."""
    join_positions = "max"

    def __init__(self, proto, tree, core, params: SamplingParams, make_generator):
        super().__init__(tree, core, params, make_generator)
        self.proto, self.limits = proto, proto.limits
        self.tok = core.tokenizer
        self.forks_of: dict[int, list[ForkGroup]] = {}  # thread id -> the forks it made
        self.events: list[dict] = []
        self.main: Thread | None = None
        self.max_total = params.max_total_tokens or params.max_tokens * self.limits.max_paths

    def encode(self, text: str) -> list[int]:
        return self.core.encode_text(text)

    def event(self, kind: str, t: Thread, thread_too: bool = True, **kw):
        e = {"event": kind, "thread": t.id, **kw}
        self.events.append(e)
        if thread_too:  # (a fork is in its thread's events already: ThreadTree.fork records it there)
            t.events.append(e)

    def activate(self, t: Thread, params: SamplingParams | None = None):
        """As ProtocolRun's; min_tokens, as max_tokens, counts the critical path: a path or a
        continuation owes what the threads before it on that path have not written."""
        super().activate(t, min_tokens_owed(params or self.params, t.path_tokens))

    def spawn_main(self, header: list[int]) -> Thread:
        (m,) = self.tree.fork(self.tree.root, [header])
        m.tag = ThreadState("main", 0)
        self.main = m
        self.activate(m)
        return m

    # ---- per token -------------------------------------------------------------------------
    def samplers(self):
        while True:
            s = super().samplers()
            # paths that ended here (the total budget, or the model's context) are joined as
            # any ended path; a join's continuation may end at once too, so until nothing moves
            # (each fork once: once per ended path, each time looking at all of the fork's
            # paths, was paths^2 a step while they end one by one)
            n = len(self.tree.threads)
            for g in dict.fromkeys(a.tag.group for a in self.active if a.finished and a.tag is not None
                                   and a.tag.role == "path" and a.tag.group is not None):
                self.maybe_join(g)
            if len(self.tree.threads) == n:
                return s

    def on_token(self, t: Thread, tok: int):
        self.core.accept(t, tok, path_limit=self.params.max_tokens)
        self.drop_eos(t)
        self.total += 1
        st: ThreadState = t.tag
        st.text += st.next_text(self.tok, tok, t.text_context)
        if self.scans(t):
            self.scan(t, st)
        if self.total >= self.max_total:
            for a in self.samplers():  # (with no budget left it ends every thread, joining their forks)
                a.finish_reason = a.finish_reason or "length"
        # A fork joins when its last path ends: on that path's token (here), or in samplers().
        # (Only t: every active thread, looked at for each token, was paths^2 a step.)
        if t.finished and t.tag.role == "path" and t.tag.group is not None:
            self.maybe_join(t.tag.group)

    def scan(self, t: Thread, st: ThreadState):
        raise NotImplementedError

    def scans(self, t: Thread) -> bool:
        """Whether ``t``'s newest text is scanned for tags: while it samples, and when that
        token ended it by the budget or, in a path, by a stop string or a stop token it keeps
        (a close tag written up to it closes the path: the close tag injected too made it
        twice; an EOS is not written, drop_eos)."""
        return not t.finished or t.finish_reason == "length" or \
            (t.tag.role == "path" and t.finish_reason == "stop" and t.stop_token not in self.core.eos_ids)

    def drop_eos(self, t: Thread):
        """A path that ends on EOS: the EOS is not written (the join must not see it; the
        path's other tokens are written before the join, whenever that comes)."""
        if t.tag is not None and t.tag.role == "path":
            self.drop_unwritten_eos(t)

    def end_path(self, t: Thread, closed: bool):
        """A path thread stopped; its trailing EOS is dropped (drop_eos), its close tag added."""
        self.drop_eos(t)
        if not closed:
            self.event("unclosed_path", t, action="close tag injected")
            self.tree.inject(t, self.encode(self.proto.tags.path_close))

    # ---- fork / join -----------------------------------------------------------------------
    def can_fork(self, t: Thread, k: int) -> bool:
        st: ThreadState = t.tag
        if st.depth >= self.limits.max_depth:
            self.event("depth_limit", t, action="continue sequentially")
            return False
        left = min(self.params.max_tokens - t.path_tokens, self.max_total - self.total,
                   self.core.max_positions - t.end)  # (budgets, and the model's context)
        # (threads: those made, this fork's k children and continuation, and the continuation
        # each fork still open will make)
        owed = sum(g.cont is None for gs in self.forks_of.values() for g in gs)
        # (a thread its budget ended on the fork tag's token has no room, whatever fork_margin)
        if t.finished or left < self.limits.fork_margin or len(self.tree.threads) + k + 1 + owed > self.limits.max_threads:
            self.event("budget", t, action="continue sequentially")
            return False
        return True

    def fork(self, t: Thread, headers: list[str]) -> list[Thread]:
        st: ThreadState = t.tag
        t.finish_reason = "fork"  # the parent stops sampling; its continuation takes over
        if t in self.active:
            self.active.remove(t)
        kids = self.tree.fork(t, [self.encode(h) for h in headers])
        g = ForkGroup(t, kids, st.role, st.depth)
        self.forks_of.setdefault(t.id, []).append(g)
        for k in kids:
            k.tag = ThreadState("path", st.depth + 1, group=g)
            self.activate(k)
        self.event("fork", t, thread_too=False, children=[k.id for k in kids])
        return kids

    def maybe_join(self, g: ForkGroup):
        if any(not c.finished or c.finish_reason == "fork" for c in g.children) or g.cont is not None:
            return
        for c in g.children:
            self.active.remove(c)
            self.end_path(c, closed=c.stop_reason == "close")
        cont = self.tree.join(g.children, self.encode(self.proto.tags.join_header), self.join_positions)
        hdr = len(self.encode(self.proto.tags.join_header))
        skip = len(cont.tokens) - hdr if self.join_positions == "reprefill" else 0
        outer = g.parent.tag.group
        cont.tag = ThreadState(g.role, g.depth, group=outer, skip=skip)
        g.cont = cont
        if outer is not None:  # the continuation is now that slot's tip in the outer fork
            outer.children[outer.children.index(g.parent)] = cont
        self.event("join", g.parent, into=cont.id, positions=self.join_positions)
        if g.role == "main":
            self.main = cont
        self.activate(cont)
        if cont.path_tokens >= self.params.max_tokens or self.total >= self.max_total:
            cont.finish_reason = "length"
            if g.role == "path":
                self.maybe_join(cont.tag.group)

    def done(self) -> bool:
        return not self.samplers()

    # ---- outputs ---------------------------------------------------------------------------
    def continuations(self) -> dict[int, int]:
        """Each join continuation's id -> the id of the thread whose fork it continues. (The
        thread tree may say otherwise: after a nested fork a continuation joins threads of
        different parents and has none there, or the one path's, for a one-item fork.)"""
        return {g.cont.id: p for p, gs in self.forks_of.items() for g in gs if g.cont is not None}

    def flatten(self, t: Thread, out: list[int], conts: dict[int, int]):
        """The linear text of ``t``'s subtree: its own tokens, then the subtree of each child
        it forked, then the continuation of that fork (the layout the tags describe; placed by
        its fork, wherever the thread tree put it: ``conts``, from continuations())."""
        skip = len(t.tokens) if t is self.tree.root else (t.tag.skip if t.tag else 0)
        out.extend(t.tokens[skip:])
        for c in t.children:
            if c.id not in conts:
                self.flatten(c, out, conts)
        for g in self.forks_of.get(t.id, []):
            if g.cont is not None:
                self.flatten(g.cont, out, conts)

    def outputs(self) -> list[CompletionOutput]:
        ids: list[int] = []
        fork_of = self.continuations()
        self.flatten(self.tree.root, ids, fork_of)
        threads, root = self.tree.threads, self.tree.root
        owner = {id(t.seg): t.id for t in threads}  # (segment ids are the cache's: shared by all requests, reused)
        # (a prompt prefix shared with other requests is the prompt thread's as much as the rest
        # of its prompt: left out of views, which name the root's own segment for the prompt)
        shared = {id(s) for s in root.lead}
        prompt = self.tree.prompt_ids()
        tree = [{"id": t.id, "parent": fork_of.get(t.id, t.parent.id if t.parent else None),
                 "role": "prompt" if t is root or t.tag is None else t.tag.role,
                 "text": self.tok.completion_text([], prompt, skip_special_tokens=False) if t is root
                 else own_text(self.tok, t),
                 "token_ids": prompt if t is root else list(t.tokens), "generated": len(t.generated),
                 "joined_into": t.joined_into.id if t.joined_into else None,
                 "view": [[owner[id(s)], sh] for s, sh in t.view if id(s) not in shared], "events": list(t.events),
                 # log-prob of each token it sampled (when SamplingParams.logprobs is set)
                 "logprobs": [d[tok] for tok, d in zip(t.generated, t.logprobs or [])]}
                for t in threads]
        metrics = {"critical_path_tokens": max((t.path_tokens for t in threads), default=0),
                   "total_tokens": self.total, "forward_steps": self.metrics.forward_steps,
                   "max_parallel_threads": self.metrics.max_parallel_threads, "threads": len(threads)}
        last = self.main
        reason = "length" if last is None or last.finish_reason == "length" else "stop"
        # the stop token's text: kept with include_stop_str_in_output, unless it is a special token
        # that skip_special_tokens leaves out (as plain sampling's)
        kept = self.params.include_stop_str_in_output and not (
            self.params.skip_special_tokens and ids and ids[-1] in self.tok.special_ids)
        shown = ids[:-1] if ids and last is not None and last.stop_token == ids[-1] and not kept else ids
        ctx = prompt  # (the text follows the prompt: Tokenizer.completion_text)
        text = self.tok.completion_text(ctx, shown, skip_special_tokens=False)
        if last is not None and last.stop_token is None and last.stop_text is not None:
            # a stop string: cut before it, as plain sampling
            n = len(last.generated)
            if n and ids[-n:] == last.generated:
                text = self.tok.completion_text(ctx, ids[:-n], skip_special_tokens=False) + self._stop_cut(last)
        out = CompletionOutput(0, text, ids, reason, None, last.stop_reason if last is not None else None,
                               answer=last_boxed(text))
        out.tree, out.metrics, out.events = tree, metrics, list(self.events)
        return [out]

    def _stop_cut(self, t: Thread) -> str:
        """The text of ``t``'s sampled tokens, special tokens spelled out, cut before the stop string
        that ended it (after it, with include_stop_str_in_output). The stop was found in its own
        text, special tokens as skip_special_tokens says: the cut is mapped from there token by
        token (a special token's text read inside the stop's letters here is not where it is)."""
        cut, inc = len(t.stop_text), self.params.include_stop_str_in_output
        own = TextStream(self.tok, self.params.skip_special_tokens, t.text_context)
        spelled = TextStream(self.tok, False, t.text_context)
        for tok in t.generated:
            a, b = own.push(tok), spelled.push(tok)
            if len(own.text) > cut or (inc and len(own.text) >= cut):  # (the cut is in this token's text)
                return spelled.text[:len(spelled.text) - len(b) + min(cut - (len(own.text) - len(a)), len(b))]
        return t.stop_text


class TagTreeProtocol(Protocol):
    """Base of tag-triggered tree protocols (see TreeRun)."""
    run_cls = None
    shares_prompt_prefix = True  # (its threads read the prompt through forks of the root)
    HEADER_NUM: str | int = "1"  # a path header's {num}: the item number as the model wrote it (text)

    def __init__(self, tags, positions: str, limits: TreeLimits | None):
        if tags is getattr(type(self), "DEFAULT_TAGS", None):
            # (its own copy: the class's one object was every default instance's, so that
            # `proto.tags.join_header = ...` on one changed every Multiverse() made after it)
            tags = dataclasses.replace(tags)
        self.tags, self.positions = tags, positions
        self.limits = limits or TreeLimits()
        self.check_config()

    def check_config(self):
        from ..threads import JOIN_SCHEMES
        from .tagged import Tags
        if self.positions not in JOIN_SCHEMES:
            raise ValueError(f"positions={self.positions!r} must be one of {JOIN_SCHEMES}.")
        for part in (self.limits, self.tags):  # (their own checks, again)
            if isinstance(part, (TreeLimits, Tags)):
                part.verify()
        if isinstance(self.tags, Tags):  # (a format spec may not fit {num}'s type: '{num:02d}' and text)
            try:
                self.tags.path_header.format(num=self.HEADER_NUM, i=1)
            except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
                what = "the item number as written, a string" if isinstance(self.HEADER_NUM, str) else "an int"
                raise ValueError(f"{type(self).__name__}: Tags.path_header={self.tags.path_header!r} does not format "
                                 f"with {{num}} ({what}) and {{i}} (an int): {type(e).__name__}: {e}.") from None

    def need_text(self, params):
        L = self.limits
        total = (f"max_total_tokens={params.max_total_tokens}" if params.max_total_tokens else
                 f"max_paths={L.max_paths} x max_tokens={params.max_tokens} sampled tokens")
        return (f"{type(self).__name__}: {total}, plus headers for up to max_threads={L.max_threads} threads"
                + (f", {1 + L.max_depth} times for reprefill joins (once more per nesting level)"
                   if self.positions == "reprefill" else ""))

    def header_tokens(self) -> int:
        """A bound on the tokens one thread's injected text takes: its header (with an item
        number of up to 6 digits) and a close tag, or a join header."""
        tg = self.tags
        heads = []
        for num in ("9" * 6, 999_999):  # (tagged protocols pass the number as text, ParaThinker as an int)
            try:
                heads.append(tg.path_header.format(num=num, i=999_999))
            except (ValueError, TypeError, IndexError, KeyError):
                pass
        return max([64, tokens_at_most(tg.join_header)]
                   + [tokens_at_most(h + tg.path_close) for h in heads or [tg.path_header]])

    def need_fix(self):
        return (f"lower max_tokens, set SamplingParams(max_total_tokens=...), or pass "
                f"limits=TreeLimits(max_paths=..., max_threads=...) to {type(self).__name__}")

    def pages_needed(self, cache, prompt_len, params, max_positions):
        L = self.limits
        total = params.max_total_tokens or params.max_tokens * L.max_paths
        headers = self.header_tokens() * L.max_threads  # injected header / close tokens
        # a reprefill join copies the joined text, and each level of nesting copies it once more
        mult = 1 + L.max_depth if self.positions == "reprefill" else 1
        return cache.pages_for(prompt_len) + cache.pages_for(mult * (total + headers)) + L.max_threads

    def check_params(self, params):
        one_output_only(self, params, "the tree's joined text; its threads are in .tree")

    def start(self, tree, core, params, make_generator):
        run = self.run_cls(self, tree, core, params, make_generator)
        run.join_positions = self.positions
        run.begin()
        return run
