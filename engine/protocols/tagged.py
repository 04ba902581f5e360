"""Tag-triggered fork/join protocols: Multiverse, ThreadWeaver, Parallel-R1."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

from ..threads import Thread
from .base import int_arg
from .tree import TagTreeProtocol, ThreadState, TreeLimits, TreeRun


@dataclass
class Tags:
    """Configurable tag strings. Matched on decoded text: special tokens or plain text."""
    fork: str                     # the tag that triggers a fork
    path_header: str              # header of child i; fields {num} (item number), {i} (1-based)
    path_close: str               # a child ends here
    join_header: str              # the continuation starts with this
    block_open: str | None = None # items are counted between block_open and fork
    item: str | None = None       # item tag; its number may follow ("<Outline>1:")

    def __post_init__(self):
        self.verify()

    def verify(self):
        for k in ("fork", "path_close", "join_header", "path_header"):
            if not isinstance(getattr(self, k), str):
                raise ValueError(f"Tags.{k}={getattr(self, k)!r} must be a string.")
        for k in ("block_open", "item"):
            if getattr(self, k) is not None and not isinstance(getattr(self, k), str):
                raise ValueError(f"Tags.{k}={getattr(self, k)!r} must be a string or None.")
        for k in ("fork", "path_close", "join_header"):
            if not getattr(self, k):
                raise ValueError(f"Tags.{k} must be a non-empty string.")
        if (self.block_open is None) != (self.item is None):
            raise ValueError("Tags.block_open and Tags.item go together (both or neither).")
        try:  # (a str.format template: a stray brace failed mid-run as a bare KeyError 'nm')
            fields = {f for _, f, _, _ in string.Formatter().parse(self.path_header) if f is not None}
            wrong = sorted(f for f in fields if re.split(r"[.\[]", f)[0] not in ("num", "i"))
            if wrong:
                raise ValueError(f"unknown field {{{wrong[0]}}}")
        except ValueError as e:
            raise ValueError(f"Tags.path_header={self.path_header!r} is a str.format template that may use {{num}} "
                             f"and {{i}} only ({e}); write a literal brace doubled, as in '{{{{'.") from None


MAX_ITEM_DIGITS = 6  # an item number the model writes longer than this is not copied to headers


class TaggedRun(TreeRun):
    def begin(self):
        self.spawn_main([])

    def _new_tags(self, st: ThreadState) -> list[tuple[int, str]]:
        """(end index, tag) of tags completed since the last scan, in text order. Of tags that
        end at one index (one the other's end: fork '</Goal>', path_close 'Goal>'), the longest
        is the one written (it was the first in string order: '</Goal>' forked, and with the
        two swapped, '</Goal>' in a main thread was a stray close and a fork)."""
        tg = self.proto.tags
        found: dict[int, str] = {}
        for tag in {tg.fork, tg.path_close, tg.block_open} - {None}:
            i = max(0, st.scan - len(tag) + 1)
            while (j := st.text.find(tag, i)) >= 0:
                if len(tag) > len(found.get(j + len(tag), "")):
                    found[j + len(tag)] = tag
                i = j + 1
        return sorted(found.items())

    def scan(self, t: Thread, st: ThreadState):
        tg = self.proto.tags
        for end, tag in self._new_tags(st):
            st.scan = end
            if tag == tg.block_open:
                st.block_at = end
            elif tag == tg.path_close:
                if st.role == "path":
                    t.finish_reason, t.stop_reason = "stop", "close"
                    return
                self.event("stray_close", t, tag=tag, action="ignored")
            elif tag == tg.fork:
                if self.on_fork_tag(t, st, end):
                    return
        st.scan = len(st.text)

    def items(self, st: ThreadState, end: int) -> list[str] | None:
        """Item numbers of the block that ``end`` closes (None: no block open)."""
        tg = self.proto.tags
        if tg.item is None:
            return [str(i + 1) for i in range(self.proto.num_paths)]
        if st.block_at is None:
            return None
        block = st.text[st.block_at:end - len(tg.fork)]
        st.block_at = None
        nums = []
        for k, m in enumerate(re.finditer(re.escape(tg.item) + r"\s*([0-9]+(?:\.[0-9]+)*)?", block)):
            nums.append(m.group(1) or str(k + 1))
        return nums

    def on_fork_tag(self, t: Thread, st: ThreadState, end: int) -> bool:
        if t.finished and t.finish_reason != "length":
            # (a stop string / stop token ended it on this token: scanned for its close tag only;
            # the stop, not a budget, ends it here, as a main thread's stop, which is not scanned)
            return False
        nums = self.items(st, end)
        if nums is None:
            self.event("unbalanced", t, tag=self.proto.tags.fork, action="ignored")
            return False
        if not nums:
            self.event("empty_outline", t, action="continue sequentially")
            return False
        if len(nums) > self.limits.max_paths:
            self.event("too_many_items", t, items=len(nums), action=f"fork {self.limits.max_paths}")
            nums = nums[:self.limits.max_paths]
        if any(len(n) > MAX_ITEM_DIGITS for n in nums):
            # (headers are budgeted at admission: a model-written number of any length would
            # outgrow the request's reserved pages)
            self.event("long_item_number", t, action=f"numbered by position (over {MAX_ITEM_DIGITS} digits)")
            nums = [n if len(n) <= MAX_ITEM_DIGITS else str(k + 1) for k, n in enumerate(nums)]
        if not self.can_fork(t, len(nums)):
            return False
        hdr = self.proto.tags.path_header
        self.fork(t, [hdr.format(num=n, i=i + 1) for i, n in enumerate(nums)])
        return True


class Multiverse(TagTreeProtocol):
    """``<Parallel><Goal><Outline>1: …</Outline>…</Goal><Path>…</Path>…<Conclusion>…``:
    fork at ``</Goal>`` with one child per outline item (started with its ``<Path>``
    header and number), a child ends at ``</Path>``, all joined (``max``) into a
    ``<Conclusion>``. Nesting up to ``limits.max_depth``."""
    name = "multiverse"
    run_cls = TaggedRun
    DEFAULT_TAGS = Tags(fork="</Goal>", block_open="<Goal>", item="<Outline>",
                        path_header="\n<Path>\n{num}:", path_close="</Path>",
                        join_header="\n<Conclusion>\n")

    def __init__(self, tags: Tags | None = None, positions: str = "max", limits: TreeLimits | None = None):
        super().__init__(_itemized(tags, type(self).__name__) or self.DEFAULT_TAGS, positions, limits)

    def check_config(self):
        super().check_config()
        _itemized(self.tags, type(self).__name__)
        _scanned_apart(self.tags, type(self).__name__)


def _scanned_apart(tags: Tags, name: str) -> None:
    """The tags the model's text is scanned for (fork, path close, block open) must differ:
    one string in two roles acts in one only (fork == path_close: every fork tag was an
    ignored stray close, no fork ever; block_open == fork: no fork; block_open == path_close:
    no path ever closed)."""
    scanned = [(k, getattr(tags, k)) for k in ("fork", "path_close", "block_open") if getattr(tags, k) is not None]
    for i, (k, a) in enumerate(scanned):
        for k2, b in scanned[i + 1:]:
            if a == b:
                raise ValueError(f"{name}: Tags.{k}={a!r} equals Tags.{k2}={b!r}: the model's text is scanned for "
                                 "both, and one string can act as only one of them; give them different tags.")


def _itemized(tags: Tags | None, name: str) -> Tags | None:
    if tags is not None and tags.item is None:
        raise ValueError(f"{name} forks one child per item the model lists: its tags need block_open and item "
                         "(a fixed number of children per fork tag: ParallelR1(num_paths=..., tags=...)).")
    return tags


class ThreadWeaver(TagTreeProtocol):
    """``<Outlines><Outline>1: …</Outline>…</Outlines>`` then one ``<Thread>`` per outline;
    the join closes unterminated threads and continues after ``</Parallel>``. ThreadWeaver
    lays threads out one after another: ``positions="sequential"`` does that without
    recomputation; ``"reprefill"`` is its exact inference semantics."""
    name = "threadweaver"
    run_cls = TaggedRun
    DEFAULT_TAGS = Tags(fork="</Outlines>", block_open="<Outlines>", item="<Outline>",
                        path_header="\n<Thread>\n{num}:", path_close="</Thread>",
                        join_header="\n</Parallel>\n")

    def __init__(self, tags: Tags | None = None, positions: str = "sequential",
                 limits: TreeLimits | None = None):
        super().__init__(_itemized(tags, type(self).__name__) or self.DEFAULT_TAGS, positions, limits)

    def check_config(self):
        super().check_config()
        _itemized(self.tags, type(self).__name__)
        _scanned_apart(self.tags, type(self).__name__)


class ParallelR1(TagTreeProtocol):
    """``<Parallel>`` opens ``num_paths`` ``<Path>`` children (sampled independently);
    each ends at ``</Path>``; the join appends ``</Parallel>`` and ``<Summary>``."""
    name = "parallel_r1"
    run_cls = TaggedRun
    DEFAULT_TAGS = Tags(fork="<Parallel>", path_header="\n<Path>\n", path_close="</Path>",
                        join_header="\n</Parallel>\n<Summary>\n")

    def __init__(self, num_paths: int = 2, tags: Tags | None = None, positions: str = "sequential",
                 limits: TreeLimits | None = None):
        self.num_paths = num_paths
        super().__init__(tags or self.DEFAULT_TAGS, positions, limits)

    def check_config(self):
        super().check_config()
        _scanned_apart(self.tags, type(self).__name__)
        self.num_paths = int_arg("num_paths", self.num_paths, 1)
        if self.num_paths > self.limits.max_paths:
            raise ValueError(f"num_paths={self.num_paths} exceeds limits.max_paths={self.limits.max_paths}.")
