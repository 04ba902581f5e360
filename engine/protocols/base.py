"""Protocols drive threads through the engine verbs (fork, join, inject, finish).

A ``Protocol`` is user-facing configuration (``Multiverse()``, ``ParallelSampling(8)``);
``Protocol.start(tree, core, params, make_generator)`` returns a per-request
``ProtocolRun``, a state machine the scheduler asks each step which threads
sample (``samplers``) and tells each sampled token (``on_token``). Each generate()
call runs its own copy of the protocol (``Protocol.for_call``): a subclass keeps
per-request state on its run, not on ``self`` (what a call writes to its copy
does not come back to the caller's object).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace

from ..core import EngineCore
from ..outputs import CompletionOutput, RequestMetrics
from ..sampling_params import SamplingParams, _is_int
from ..threads import Thread, ThreadTree


class Protocol:
    name = "protocol"
    # True: a request's threads read its prompt only through the root (forks of it, live views
    # starting with it: ThreadTree.spawn), and pages_needed counts the prompt as
    # pages_for(prompt_len) of the root's own segment; LLM.generate may then write a prompt
    # prefix that several requests share once, in segments the roots' views start with (every
    # built-in protocol; False, a custom protocol's default: each request writes its prompt)
    shares_prompt_prefix = False

    def pages_needed(self, cache, prompt_len: int, params: SamplingParams, max_positions: int) -> int:
        raise NotImplementedError

    def need_text(self, params: SamplingParams) -> str:
        """What pages_needed bounds, in words, for the error of a request that cannot fit."""
        return f"n={params.n} x max_tokens={params.max_tokens}"

    def need_fix(self) -> str:
        """How to lower that bound."""
        return "lower max_tokens / n"

    def check_params(self, params: SamplingParams) -> None:
        """Refuse sampling parameters this protocol cannot honour (before any work)."""

    def check_config(self) -> None:
        """Check (and normalise) the protocol's own settings. Its constructor calls it, and
        generate() at each call: the attributes may have been changed since, and a run reads
        them as they are (a ParaThinker whose ``paths`` outgrew its limits ran more threads
        than its request's reserved pages hold)."""

    def for_call(self) -> "Protocol":
        """A copy of this protocol for one engine call, with its settings as they are now (its
        dataclass settings, a tree's ``limits`` and ``tags``, copied too). A run reads them
        at every step, and the caller's object changed while the call ran (by a stream
        callback, or another Python thread setting up its next call with it) reached the
        running request: a tree's limits lowered under its forks, a Hogwild! finisher_tokens
        raised past its reserved pages. Its lists, dicts and sets are copied as well (a
        Hogwild!'s ``names`` appended to while the call ran gave the call's requests admitted
        after that one worker more)."""
        c, copies = copy.copy(self), {}  # (one copy of a container two settings share: names is _default_names)
        for k, v in vars(self).items():
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                setattr(c, k, replace(v))
            elif isinstance(v, (list, dict, set)):
                setattr(c, k, copies.setdefault(id(v), copy.copy(v)))
        return c

    def start(self, tree: ThreadTree, core: EngineCore, params: SamplingParams,
              make_generator) -> "ProtocolRun":
        raise NotImplementedError


def tokens_at_most(text: str) -> int:
    """A bound on the tokens ``text`` encodes to, for admission bounds made without the
    tokenizer: a token covers at least one byte, plus a few for tokenizers that add a marker."""
    return len(text.encode()) + 8


def min_tokens_owed(params: SamplingParams, done: int) -> SamplingParams:
    """``params`` for a thread that continues ``done`` tokens already written toward its
    min_tokens (a Hogwild! worker's earlier steps, a tree's critical path): min_tokens, as
    max_tokens, counts over all of them."""
    if not params.min_tokens or not done:
        return params
    return replace(params, min_tokens=max(params.min_tokens - done, 0))


def one_output_only(protocol: Protocol, params: SamplingParams, threads: str) -> None:
    """For protocols whose request is one tree with one text output: ``n`` would be silently
    ignored, so it is refused; so is ``detokenize=False`` (they read their threads' text)."""
    if params.n != 1:
        raise ValueError(f"{type(protocol).__name__} gives one output per prompt ({threads}); "
                         f"SamplingParams(n={params.n}) asks for {params.n}: pass n=1, or the prompt "
                         f"{params.n} times.")
    if not params.detokenize:  # (its tags and its output are text)
        raise ValueError(f"{type(protocol).__name__} reads its threads' text (tags, headers) and gives its output "
                         "as text; SamplingParams(detokenize=False) is for plain sampling: leave it True.")


class ProtocolRun:
    def __init__(self, tree: ThreadTree, core: EngineCore, params: SamplingParams, make_generator):
        self.tree, self.core, self.params = tree, core, params
        self.make_generator = make_generator
        self.active: list[Thread] = []
        self.total = 0                        # tokens sampled over all threads
        self.max_total = params.max_total_tokens
        self.metrics = RequestMetrics()   # the scheduler shares the request's metrics here

    def activate(self, t: Thread, params: SamplingParams | None = None):
        """Make ``t`` sample from now on."""
        self.core.begin(t, params or self.params, self.make_generator(t.id))
        self.active.append(t)

    def samplers(self) -> list[Thread]:
        # (a thread may start at the model's context end, e.g. a join past it; the total budget
        # may not cover one more token for every thread: the first ones, in creation order)
        return self.core.samplers_of(self.active, None if self.max_total is None else self.max_total - self.total)

    def on_token(self, t: Thread, tok: int):
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError

    def outputs(self) -> list[CompletionOutput]:
        raise NotImplementedError

    def drop_unwritten_eos(self, t: Thread):
        """``t`` just stopped on an EOS it has not written yet: the EOS is not written at all
        (threads that read ``t``, a join or other Hogwild workers, must not see it)."""
        if t.finish_reason == "stop" and t.stop_token in self.core.eos_ids and t.pending \
                and t.pending[-1] == t.stop_token:
            t.tokens.pop(), t.pending.pop()

    def completion(self, t: Thread, index: int) -> CompletionOutput:
        return CompletionOutput(index, self.core.text_of(t), list(t.generated), t.finish_reason,
                                t.logprobs, t.stop_reason)


def int_arg(name: str, x, lo: int) -> int:
    """A protocol's integer argument (numpy integers too; not a bool) as an int >= ``lo``."""
    if not _is_int(x) or x < lo:
        raise ValueError(f"{name}={x!r} must be an integer >= {lo}.")
    return int(x)


def bool_arg(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name}={x!r} must be True or False.")
    return x
