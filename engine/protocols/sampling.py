"""Parallel sampling over one shared prompt: plain n-sample generation,
self-consistency (majority vote) and first-finish search."""
from __future__ import annotations

from collections import Counter

from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from .base import Protocol, ProtocolRun, int_arg

SELECT = ("all", "first_finish", "majority")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed{")
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                return text[j:k].strip()
            depth -= 1
    return None


class ParallelSampling(Protocol):
    """n threads forked from the prompt with empty headers: the prompt is prefilled once
    and its pages are shared. ``select``: "all" (every sample), "first_finish" (the first
    sample to stop; the others are cut off), "majority" (all, the majority answer first)."""
    name = "parallel_sampling"
    shares_prompt_prefix = True

    def __init__(self, n: int | None = None, select: str = "all", extract_answer=last_boxed):
        self.n, self.select, self.extract_answer = n, select, extract_answer
        self.check_config()

    def check_config(self):
        if self.n is not None:
            self.n = int_arg("ParallelSampling n", self.n, 1)
        if self.select not in SELECT:
            raise ValueError(f"select={self.select!r} must be one of {SELECT}.")
        if not callable(self.extract_answer):
            raise ValueError(f"extract_answer={self.extract_answer!r} must be a function of a completion's text "
                             "(its answer, or None), e.g. engine.protocols.sampling.last_boxed.")

    def check_params(self, params):
        if self.n is not None and params.n not in (1, self.n):
            raise ValueError(f"ParallelSampling(n={self.n}) and SamplingParams(n={params.n}) disagree; "
                             "give n in one of them.")

    def _n(self, params: SamplingParams) -> int:
        return self.n if self.n is not None else params.n

    def need_text(self, params):
        total = f", max_total_tokens={params.max_total_tokens}" if params.max_total_tokens else ""
        return f"n={self._n(params)} x max_tokens={params.max_tokens}{total}"

    def need_fix(self):
        return "lower max_tokens / n, or set SamplingParams(max_total_tokens=...)"

    def pages_needed(self, cache, prompt_len, params, max_positions):
        gen = min(params.max_tokens, max(max_positions - prompt_len, 1))
        n = self._n(params)
        kids = n * cache.pages_for(gen - 1)
        if params.max_total_tokens is not None:
            # the threads' tokens sum to at most max_total_tokens: their pages to at most that
            # many tokens' pages plus one part-filled page per thread that has tokens
            kids = min(kids, cache.pages_for(params.max_total_tokens) + min(n, params.max_total_tokens))
        return cache.pages_for(prompt_len) + kids

    def start(self, tree, core, params, make_generator):
        return _SamplingRun(self, tree, core, params, make_generator)


class _SamplingRun(ProtocolRun):
    def __init__(self, proto: ParallelSampling, tree, core, params, make_generator):
        super().__init__(tree, core, params, make_generator)
        self.proto = proto
        self.kids = tree.fork(tree.root, [[] for _ in range(proto._n(params))])
        for k in self.kids:
            self.activate(k)
        self.first: int | None = None

    def on_token(self, t, tok):
        self.core.accept(t, tok)
        self.total += 1
        if t.finished:
            if self.first is None and t.finish_reason == "stop":
                self.first = self.kids.index(t)
            self.tree.discard(t)  # its pages go back now
            if self.proto.select == "first_finish" and self.first is not None:
                for k in self.kids:
                    if not k.finished:
                        k.finish_reason = "abort"
                        self.tree.discard(k)

    def done(self):
        if not self.samplers():  # also ends threads the total budget cannot cover
            for k in self.kids:
                self.tree.discard(k)
        return all(k.finished for k in self.kids)

    def outputs(self) -> list[CompletionOutput]:
        outs = [self.completion(k, i) for i, k in enumerate(self.kids)]
        sel = self.proto.select
        if sel == "all":
            return outs
        for o in outs:
            o.answer = self.proto.extract_answer(o.text)
        if sel == "first_finish":
            return [outs[self.first if self.first is not None else 0]]
        votes = Counter(o.answer for o in outs if o.answer is not None)
        if votes:
            best = votes.most_common(1)[0][0]
            outs.sort(key=lambda o: o.answer != best)
        return outs
