"""ParaThinker: P forced paths from the prompt, first-finish cut-off, a summary."""
from __future__ import annotations

from ..sampling_params import _is_num
from ..threads import Thread
from .base import int_arg
from .tagged import Tags
from .tree import TagTreeProtocol, ThreadState, TreeLimits, TreeRun


class ParaThinkerRun(TreeRun):
    def begin(self):
        root = self.tree.root
        root.tag = ThreadState("main", 0)
        P, tg = self.proto.paths, self.proto.tags
        self.paths = self.fork(root, [tg.path_header.format(i=i + 1, num=i + 1) for i in range(P)])
        self.first_len: int | None = None

    def scan(self, t: Thread, st: ThreadState):
        tag = self.proto.tags.path_close
        if st.role == "path" and tag in st.text[max(0, st.scan - len(tag) + 1):]:
            t.finish_reason, t.stop_reason = "stop", "close"
        st.scan = len(st.text)

    def on_token(self, t: Thread, tok: int):
        if t.tag.role == "path":
            self.core.accept(t, tok, path_limit=self.params.max_tokens)
            self.drop_eos(t)
            self.total += 1
            t.tag.text += t.tag.next_text(self.tok, tok, t.text_context)
            if self.scans(t):
                self.scan(t, t.tag)
            first = t.finished and self.first_len is None
            if first:
                self.first_len = len(t.generated)
                self.event("first_finish", t, tokens=self.first_len)
            if self.first_len is not None:
                cut = self.proto.cutoff_ratio * self.first_len
                # (the first finish cuts every path that long; after it a path grows by its own
                # tokens only, so only t can reach the cut: all paths were O(paths) a token)
                for p in self.paths if first else (t,):
                    if not p.finished and len(p.generated) >= cut:
                        p.finish_reason = "length"
                        self.event("cutoff", p, tokens=len(p.generated))
            if self.total >= self.max_total:
                for a in self.samplers():
                    a.finish_reason = a.finish_reason or "length"
            g = t.tag.group
            if g is not None and t.finished:  # (its paths join when the last one ends, t among them)
                self.maybe_join(g)
        else:
            super().on_token(t, tok)


class ParaThinker(TagTreeProtocol):
    """``paths`` reasoning paths forced from the prompt (each opened by its own start tag,
    ``<think1>``…), ended at ``</think>``; once the first path ends, the others are cut
    off when they reach ``cutoff_ratio`` × its length (1.0: at once); then a summary
    thread attends every path (``max`` positions, no padding of paths)."""
    name = "parathinker"
    run_cls = ParaThinkerRun
    HEADER_NUM = 1  # (its {num} is the path's number, an int)
    DEFAULT_TAGS = Tags(fork="<think>", path_header="<think{i}>", path_close="</think>",
                        join_header="\n<summary>\n")

    def __init__(self, paths: int = 4, cutoff_ratio: float = 1.0, tags: Tags | None = None,
                 positions: str = "max", limits: TreeLimits | None = None):
        paths = int_arg("paths", paths, 1)
        limits = limits or TreeLimits(max_paths=max(paths, 8), max_threads=max(64, paths + 2))
        self.paths, self.cutoff_ratio = paths, cutoff_ratio
        super().__init__(tags or self.DEFAULT_TAGS, positions, limits)

    def check_config(self):
        super().check_config()
        self.paths = paths = int_arg("paths", self.paths, 1)
        if not _is_num(self.cutoff_ratio) or self.cutoff_ratio < 1.0:  # (_is_num: not NaN)
            raise ValueError(f"cutoff_ratio={self.cutoff_ratio!r} must be a number >= 1.0 (1.0 cuts "
                             "the other paths off as soon as the first one finishes).")
        self.cutoff_ratio = float(self.cutoff_ratio)
        limits = self.limits
        if paths > limits.max_paths or paths + 2 > limits.max_threads:
            raise ValueError(f"paths={paths} exceeds limits.max_paths={limits.max_paths} or needs more than "
                             f"limits.max_threads={limits.max_threads} threads (paths + 2); raise the limits.")
