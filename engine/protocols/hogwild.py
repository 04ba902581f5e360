"""Hogwild! collaborative workers: N workers of one model see each other's tokens
live through one shared cache, in one batched forward pass per step.

Layouts (every worker's view, read as one contiguous text through shifts):
* ``contiguous``: the prompt, the other workers' whole outputs, then its own.
* ``combined``: the prompt, the shared history of finished steps (in commit order),
  the other workers' steps in progress, then its own step. A step ends at a
  paragraph break after a sentence end (never inside a code fence or display
  math); it then joins the history by reference (no copy) and the worker opens a
  new step under a fresh header. When views hold more than ``compact_after``
  segments, the written history is rewritten once into one contiguous segment
  (keys re-rotated to their new positions), so attention cost stops growing with
  the number of steps. (It must be at least workers + 2: the prompt, a history step
  and every worker's own step; unset, it is ``COMPACT_AFTER`` or that, the larger.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from ..threads import Thread, layout_end
from ..tokenizer import TextStream
from .base import Protocol, ProtocolRun, bool_arg, int_arg, min_tokens_owed, one_output_only, tokens_at_most
from .sampling import last_boxed

NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]

COLLAB_PROMPT = (
    "You are {names}: {n} assistants solving one problem together, in parallel. Each of you "
    "writes in your own turn, and each of you sees what the others write as soon as they "
    "write it. Split the work: take a part nobody else is doing, build on the others' "
    "findings, and do not repeat what someone has already done. Check each other's work "
    "when it helps. Write in short steps, each ending with a blank line. When the problem "
    "is solved, one of you writes the final answer as \\boxed{{answer}}."
)
CHECKIN = "(Quick check: am I duplicating another worker's work? If so, I switch to another part.) "
COMPACT_AFTER = 32  # compact_after when unset (or workers + 2 if larger)
FINISHER = "\n\nAll workers have stopped. Based on all of the work above, the final answer is \\boxed{"


def step_ended(text: str) -> bool:
    """A paragraph break right after a sentence end, outside code fences and display math."""
    if not text.endswith("\n\n"):
        return False
    body = text.rstrip()
    if not re.search(r"[.!?][\"')\]*_]*$", body):
        return False
    return text.count("```") % 2 == 0 and text.count("$$") % 2 == 0 and \
        text.count("\\[") == text.count("\\]")


@dataclass(eq=False)
class Worker:
    index: int
    name: str
    steps: list[Thread] = field(default_factory=list)   # its step threads, in order
    generated: int = 0
    done: bool = False

    @property
    def current(self) -> Thread:
        return self.steps[-1]


def _header_optional(workers: int, layout: str) -> bool:
    """One worker in the contiguous layout: its view stays [root], so a step without a header
    samples from the prompt's logits as it should; any other view needs a header first."""
    return workers == 1 and layout == "contiguous"


def _check_template(arg: str, text: str, **fields):
    """``text`` formats with ``fields`` alone, or a ValueError says which argument and how."""
    try:
        text.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ValueError(f"{arg}={text!r} is a str.format template that may use {names} only ({type(e).__name__}: "
                         f"{e}); write a literal brace doubled, as in '\\boxed{{{{answer}}}}'.") from None


def _default_names(workers: int = 64) -> list[str]:
    return NAMES + [f"Worker{i}" for i in range(9, max(workers, 64) + 1)]


class Hogwild(Protocol):
    """``workers`` collaborating workers (named by ``names``: Alice, Bob, ... by default) that
    sample side by side, each seeing the others' tokens as they are written, in the
    ``layout`` "combined" or "contiguous" (module docstring). ``header``: each step's first
    text, a template of ``{name}``; ``collab_prompt``: put around a text prompt (as a system
    message when the model has a chat template, before the prompt in the user message when
    that template refuses a system role; None: the prompt as it is), a template of
    ``{names}`` and ``{n}``; ``checkin``: added to a worker's header every ``checkin_every``
    steps (None: never); ``compact_after``: module docstring; ``stop_on_answer``: a worker's
    ``\\boxed{}`` ends the collaboration; ``finisher``: when the workers end without an
    answer, one more thread asks for it and samples up to ``finisher_tokens`` tokens.
    ``SamplingParams.max_tokens`` bounds each worker's tokens over all its steps. One
    output per prompt: its text (the steps in commit order), ``.answer``, ``.workers``,
    ``.events`` (commits) and ``.metrics``."""
    name = "hogwild"
    shares_prompt_prefix = True  # (live views read the root's shared prefix before it: ThreadTree.spawn)

    def __init__(self, workers: int = 2, layout: str = "combined", names: list[str] | None = None,
                 header: str = "{name}: ", collab_prompt: str | None = COLLAB_PROMPT,
                 checkin_every: int | None = None, checkin: str = CHECKIN,
                 compact_after: int | None = None, finisher: bool = True, finisher_tokens: int = 24,
                 stop_on_answer: bool = True):
        self._default_names = None  # (the list check_config made from the default names)
        if names is None:
            names = self._default_names = _default_names()
        self.workers, self.layout, self.names = workers, layout, names
        self.header, self.collab_prompt = header, collab_prompt
        self.checkin_every, self.checkin = checkin_every, checkin
        self.compact_after, self.finisher = compact_after, finisher
        self.finisher_tokens, self.stop_on_answer = finisher_tokens, stop_on_answer
        self.check_config()

    def check_config(self):
        self.workers = workers = int_arg("workers", self.workers, 1)
        self.finisher_tokens = int_arg("finisher_tokens", self.finisher_tokens, 1)
        self.finisher = bool_arg("finisher", self.finisher)
        self.stop_on_answer = bool_arg("stop_on_answer", self.stop_on_answer)
        layout = self.layout
        if layout not in ("combined", "contiguous"):
            raise ValueError(f"layout={layout!r} must be 'combined' or 'contiguous'.")
        if isinstance(self.names, str) or not hasattr(self.names, "__iter__"):
            raise ValueError(f"names={self.names!r} must be a list of the workers' names.")
        default = self.names is self._default_names  # (not set by the user: as many as workers wants)
        names = _default_names(workers) if default else list(self.names)
        if len(names) < workers:
            raise ValueError(f"{workers} workers need {workers} names, got {len(names)}.")
        self.names = names[:workers]  # (a run has one worker per name)
        if default:
            self._default_names = self.names
        header = self.header
        if not isinstance(header, str) or not (header or _header_optional(workers, layout)):
            raise ValueError(f"header={header!r} must be a non-empty string (each step's first token is "
                             "sampled after it, seeing the collaboration so far), e.g. '{name}: '.")
        if self.collab_prompt is not None and not isinstance(self.collab_prompt, str):
            raise ValueError(f"collab_prompt={self.collab_prompt!r} must be a string or None.")
        # (both are str.format templates: a stray brace failed in generate as a bare KeyError 'answer')
        for name in self.names or [""]:  # (each worker's: '{name[2]}' fits 'Alice', not 'Bo')
            _check_template("header", header, name=name)
        if self.collab_prompt is not None:
            _check_template("collab_prompt", self.collab_prompt, names=", ".join(self.names), n=workers)
        if not isinstance(self.checkin, str):
            raise ValueError(f"checkin={self.checkin!r} must be a string.")
        if self.checkin_every is not None:
            self.checkin_every = int_arg("checkin_every", self.checkin_every, 1)
        if self.compact_after is not None:  # (unset: as many as the workers need, see compact_limit)
            self.compact_after = int_arg("compact_after", self.compact_after, workers + 2)

    def compact_limit(self) -> int:
        """Views are compacted when they would hold more segments than this."""
        if self.compact_after is None:
            return max(COMPACT_AFTER, self.workers + 2)
        return self.compact_after

    def prepare_prompt(self, tokenizer, text: str | None, ids: list[int]) -> list[int]:
        """Render the collaboration prompt around a text prompt (token ids pass unchanged)."""
        if text is None or self.collab_prompt is None:
            return ids
        system = self.collab_prompt.format(names=", ".join(self.names), n=self.workers)
        if tokenizer.chat_template:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
            try:
                rendered = tokenizer.apply_chat_template(msgs)
            except ValueError as e:
                if not str(e).startswith("chat template error"):
                    raise
                # a template with no system role (Mistral-Instruct v0.1 / v0.2, Gemma) refuses one:
                # the collaboration prompt goes in the user message, before the problem
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"{system}\n\n{text}"}])
            return tokenizer.encode(rendered, add_special_tokens=False)
        return tokenizer.encode(f"{system}\n\nProblem: {text}\n")

    def need_text(self, params):
        total = (f"max_total_tokens={params.max_total_tokens}" if params.max_total_tokens else
                 f"workers={self.workers} x max_tokens={params.max_tokens}")
        return (f"Hogwild: {total}, plus step headers (a step may be one token), the history twice "
                f"while it is compacted, all within the model's context per copy")

    def need_fix(self):
        return "lower max_tokens or workers, or set SamplingParams(max_total_tokens=...)"

    def step_header_tokens(self) -> tuple[int, int]:
        """Bounds on one step's header tokens and on a check-in's."""
        longest = max(tokens_at_most(self.header.format(name=n)) for n in self.names)
        return longest, (tokens_at_most(self.checkin) if self.checkin_every else 0)

    def pages_needed(self, cache, prompt_len, params, max_positions):
        """The most pages the request holds at once (pages it frees go back to its
        reservation). The history's tokens H: every sampled token, plus a header for every
        step (a step may be one token) and a check-in every ``checkin_every`` steps of a
        worker; H never passes the context (workers see all of it). At a compaction the
        history exists twice (the old steps and the merged copy); the steps being written
        hold at most the workers' budget, each segment at most one partly filled page (at
        most compact_after history steps, one current step per worker, the merged copy, the
        finisher)."""
        total = params.max_total_tokens or params.max_tokens * self.workers
        W = self.workers
        hdr, checkin = self.step_header_tokens()
        steps = total + W  # (a worker's last step may be empty)
        checkins = (steps // self.checkin_every + W) if self.checkin_every else 0
        history = min(total + steps * hdr + checkins * checkin, max_positions)
        current = min(total + W * (hdr + checkin), W * max_positions)
        finisher = tokens_at_most(FINISHER) + self.finisher_tokens
        segments = self.compact_limit() + 2 * W + 4
        return cache.pages_for(prompt_len) + cache.pages_for(2 * history + current + finisher) + segments

    def check_params(self, params):
        one_output_only(self, params, f"the {self.workers} workers' collaboration; set workers=... for more workers")

    def start(self, tree, core, params, make_generator):
        return HogwildRun(self, tree, core, params, make_generator)


class HogwildRun(ProtocolRun):
    def __init__(self, proto: Hogwild, tree, core, params: SamplingParams, make_generator):
        super().__init__(tree, core, params, make_generator)
        self.proto, self.tok = proto, core.tokenizer
        # workers' budget; the finisher's few tokens come on top
        self.max_total = params.max_total_tokens or params.max_tokens * proto.workers
        self.history: list[Thread] = []      # committed steps (or one compacted segment first)
        self.commits: list[tuple[int, Thread]] = []  # (worker, step) in commit order
        self.finisher: Thread | None = None
        self.workers = [Worker(i, n) for i, n in enumerate(proto.names)]
        self.compactions = 0
        # a worker's budget is counted over all its steps, not per step thread
        self.step_params = SamplingParams(**{**vars(params), "max_tokens": 1 << 30})
        for w in self.workers:
            t = tree.spawn([tree.root], self._header(w))
            w.steps.append(t)
            self.activate(t, self.step_params)
        self._update_views()

    # ---- views -----------------------------------------------------------------------------
    def _header(self, w: Worker) -> list[int]:
        text = self.proto.header.format(name=w.name)
        k = self.proto.checkin_every
        if k is not None and len(w.steps) > 0 and len(w.steps) % k == 0:
            text += self.proto.checkin
        ids = self.core.encode_text(text)
        if not ids and not _header_optional(self.proto.workers, self.proto.layout):
            # (a step's first token is sampled after its header, seeing the live view)
            raise ValueError(f"Hogwild's step header {self.proto.header!r} is empty for worker {w.name!r}; "
                             "give it some text, e.g. header='{name}: '.")
        return ids

    def _view_of(self, w: Worker) -> list[Thread]:
        root = self.tree.root
        if self.proto.layout == "contiguous":
            return [root] + [o.current for o in self.workers if o is not w]
        # (a finished worker's last step is in the history already)
        return [root] + self.history + [o.current for o in self.workers if o is not w and not o.done]

    def _update_views(self):
        for w in self.workers:
            if not w.done and not w.current.closed:
                self.tree.set_view(w.current, self._view_of(w))

    # ---- per token -------------------------------------------------------------------------
    def on_token(self, t: Thread, tok: int):
        if t is self.finisher:
            self.core.accept(t, tok)
            self.drop_unwritten_eos(t)  # (as a tree's path's)
            # its text as the output's reads it, after its header (decoded alone, a byte-fallback
            # "}" after an unfinished character's byte read U+FFFD: it wrote on to finisher_tokens)
            if t.tag is None:
                t.tag = TextStream(self.tok, context=t.text_context)
            if "}" in t.tag.push(tok):
                t.finish_reason = "stop"
            return
        w = next(w for w in self.workers if w.current is t)
        self.core.accept(t, tok)
        self.drop_unwritten_eos(t)  # (the other workers read this step live)
        self.total += 1
        w.generated += 1
        if w.generated >= self.params.max_tokens and not t.finished:
            t.finish_reason = "length"
        # The step's text grows by whole characters (a TextStream per step thread, as stop
        # strings and tags): decoding the whole step at each token was O(step length) a token.
        if t.tag is None:
            t.tag = TextStream(self.tok)
        changed = bool(t.tag.push(tok))
        text = t.tag.text
        if t.finished:
            w.done = True
            self._commit(w)
            self._update_views()  # (its step is history now: the others' layouts show it there)
        elif not changed:  # (the same text as at its last token: neither check can change)
            pass
        elif self.proto.stop_on_answer and last_boxed(text) is not None:
            t.finish_reason, w.done = "stop", True
            self._commit(w)
            for o in self.workers:  # an answer ends the collaboration
                if not o.done:
                    o.current.finish_reason, o.done = "stop", True
                    self._commit(o)
        elif self.proto.layout == "combined" and step_ended(text):
            t.finish_reason = "step"
            self._commit(w)
            nxt = self.tree.spawn([self.tree.root], self._header(w))
            w.steps.append(nxt)
            self.activate(nxt, min_tokens_owed(self.step_params, w.generated))
            # presence / frequency penalties count the worker's tokens over all its steps
            nxt.carried_counts = t.penalties.counts if t.penalties is not None else t.carried_counts
            self._update_views()
            self._maybe_compact()
        if all(o.done for o in self.workers) and self.finisher is None:
            self._finish()

    def _commit(self, w: Worker):
        self.commits.append((w.index, w.current))
        if self.proto.layout == "combined" and len(w.current.tokens) > w.current.header_len:
            self.history.append(w.current)

    def _maybe_compact(self):
        # A committed step keeps its view (the history as it was, an older merged copy perhaps)
        # until its last token is written; then nothing reads through it: let go, so that at
        # most two copies of the history (the steps and their merged copy) exist at once.
        for h in self.history:
            if h.finished and not h.pending and not h.closed and len(h.view) > 1:
                self.tree.drop_view(h)
        segs = 1 + len(self.history) + len(self.workers)
        if segs <= self.proto.compact_limit():
            return
        ready = [h for h in self.history if not h.pending]
        if len(ready) < 2:
            return
        # The written prefix of the history becomes one segment placed right after the prompt.
        k = 0
        while k < len(self.history) and not self.history[k].pending:
            k += 1
        old = self.history[:k]
        merged = self.tree.compact(old, self.tree.root.end, self.core.runner.model.inv_freq)
        # (the request's peak: the old steps and their copy, both held until the discards below)
        self.metrics.kv_pages_peak = max(self.metrics.kv_pages_peak, self.tree.pages_held())
        self.history = [merged] + self.history[k:]
        self._update_views()
        for h in old:
            self.tree.discard(h)
        self.compactions += 1

    def _finish(self):
        # (the output's text as outputs() reads it: decoded alone, an invalid byte-fallback byte
        # before a worker's closing brace hid the answer that ended the collaboration)
        transcript = self.tok.completion_text(self.tree.prompt_ids(), [x for _, t in self.commits for x in t.tokens],
                                              skip_special_tokens=False)
        if not self.proto.finisher or last_boxed(transcript) is not None:
            return
        if self.proto.layout == "contiguous":
            view = [self.tree.root] + [t for _, t in self.commits]
        else:
            view = [self.tree.root] + self.history
        header = self.core.encode_text(FINISHER)
        if layout_end(view) + len(header) >= self.core.max_positions:
            return  # no room for it before the model's context: the workers' text is the output
        self.finisher = self.tree.spawn(view, header)
        fp = SamplingParams(**{**vars(self.params), "max_tokens": self.proto.finisher_tokens,
                               "min_tokens": 0, "n": 1, "stop": None})  # (its answer may be short)
        self.activate(self.finisher, fp)

    def samplers(self) -> list[Thread]:
        ended = False
        for w in self.workers:  # the view laid out reaches the model's context: this worker ends
            if not w.done and not w.current.finished and self.core.at_context_end(w.current):
                w.current.finish_reason, w.done, ended = "length", True, True
                self._commit(w)
        ws = [w.current for w in self.workers if not w.done and not w.current.finished]
        left = max(self.max_total - self.total, 0)
        for t in ws[left:]:  # the total budget cannot give these workers another token
            w = next(w for w in self.workers if w.current is t)
            t.finish_reason, w.done, ended = "length", True, True
            self._commit(w)
        if ended:
            self._update_views()
        if all(w.done for w in self.workers) and self.finisher is None:
            self._finish()  # (its header is fed by this step: the scheduler feeds after asking)
        if self.finisher is not None and not self.finisher.finished and self.core.at_context_end(self.finisher):
            self.finisher.finish_reason = "length"
        s = ws[:left]
        if self.finisher is not None and not self.finisher.finished:
            s.append(self.finisher)
        return s

    def done(self) -> bool:
        return not self.samplers()

    # ---- outputs ---------------------------------------------------------------------------
    def outputs(self) -> list[CompletionOutput]:
        order = [t for _, t in self.commits]
        if self.finisher is not None:
            order.append(self.finisher)
        ids = [x for t in order for x in t.tokens]
        text = self.tok.completion_text(self.tree.prompt_ids(), ids, skip_special_tokens=False)  # (after the prompt)
        answer = last_boxed(text)
        if answer is None and self.finisher is not None and self.finisher.generated:
            # (cut before its closing brace: the text ends with the finisher's, read as it reads)
            answer = last_boxed(text + "}")
        # a worker's text is read after the prompt, as the output's: decoded alone, a SentencePiece
        # decoder stripped its first space (header " {name}:" read "Alice:" against " Alice:")
        workers = [{"name": w.name, "token_ids": [x for s in w.steps for x in s.tokens],
                    "text": self.tok.completion_text(self.tree.prompt_ids(), [x for s in w.steps for x in s.tokens],
                                                     skip_special_tokens=False),
                    "steps": len(w.steps), "generated": w.generated,
                    # log-prob of each sampled token (when SamplingParams.logprobs is set)
                    "logprobs": [d[tok] for s in w.steps
                                 for tok, d in zip(s.generated, s.logprobs or [])]}
                   for w in self.workers]
        finisher = len(self.finisher.generated) if self.finisher is not None else 0
        metrics = {"forward_steps": self.metrics.forward_steps, "total_tokens": self.total + finisher,
                   "steps_committed": len(self.commits), "compactions": self.compactions,
                   "max_parallel_threads": self.metrics.max_parallel_threads}
        reason = "length" if any(w.current.finish_reason == "length" for w in self.workers) and \
            answer is None else "stop"
        out = CompletionOutput(0, text, ids, reason)
        out.answer, out.metrics, out.workers = answer, metrics, workers
        out.events = [{"event": "commit", "worker": wi, "thread": t.id} for wi, t in self.commits]
        return [out]
