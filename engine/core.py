"""EngineCore: one batched step over threads of any number of trees.

    threads --step()--> StepBatch --ModelRunner.run--> logits [R, V] --sampler--> tokens

Every thread with pending tokens is fed (prefill, injected headers, last
sampled tokens); every thread in ``samplers`` draws one token from the logits
after its last token. A freshly forked thread with an empty header samples from
its parent's logits (that is how n samples share one prompt).
"""
from __future__ import annotations

import dataclasses

import torch

from .runner import ModelRunner
from .sampler import Penalties, _no_text, apply_penalties, logit_processed, sample, top_logprobs, top_logprobs_rows
from .sampling_params import SamplingParams
from .step import StepBatch, StepItem
from .threads import Thread, check_growable, effective_end, refresh_view
from .tokenizer import TextStream


class CacheFullError(ValueError):
    """The KV cache has no room for this step's tokens (nothing was changed)."""


def logits_source(t: Thread) -> Thread:
    """The thread whose last logits ``t`` samples from: itself, or while it has no tokens yet
    (a fork child with an empty header, possibly of another such child) its nearest ancestor
    that has some: their text is all it sees."""
    while not t.tokens and t.parent is not None:
        t = t.parent
    return t


def logits_of(t: Thread) -> torch.Tensor:
    """``t``'s next-token logits [V] (``last_logits``, or its row of them: Thread.logits_row)."""
    return t.last_logits if t.logits_row is None else t.last_logits[t.logits_row]


def own_text(tokenizer, t: Thread) -> str:
    """The text of ``t``'s own segment (header, injected and sampled tokens, special tokens
    spelled out), read after the text before it in its view, as a completion's: decoded
    alone, a SentencePiece decoder stripped its first space (a fork's header " Draft A:" read
    "Draft A:"). A tokenizer's, not an EngineCore's: a session's thread handle reads it with
    its LLM's tokenizer alone (an EngineCore kept the LLM's weights and KV cache)."""
    return tokenizer.completion_text(context_tail(t, tokenizer.CONTEXT_TOKENS, own=False), t.tokens,
                                     skip_special_tokens=False)


def context_tail(t: Thread, k: int, own: bool = True) -> list[int]:
    """The last ``k`` tokens of the text ``t``'s next token follows: its own, then those of
    the segments before it in its view (``own`` False: those only, the text its own follows)."""
    out: list[int] = []
    for seg, _ in reversed(t.view if own else t.view[:-1]):
        toks = t.tokens if seg is t.seg else (seg.tokens or [])
        out[:0] = toks[-(k - len(out)):]
        if len(out) >= k:
            break
    return out


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: list[int], max_positions: int,
                 vocab_size: int):
        self.runner, self.cache = runner, runner.cache
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = set(eos_ids)
        # the tokenizer's EOS: a stop on it has stop_reason None; the other EOS ids (a
        # generation_config.json's list) stop as stop_token_ids do, naming the token (vLLM)
        eos = tokenizer.eos_token
        self.primary_eos = tokenizer.token_to_id(eos) if eos is not None else None
        self.max_positions = max_positions
        self.forward_steps = 0
        self._bad_ids: dict[tuple[str, ...], list[list[int]]] = {}  # (bad_word_ids')
        # Tests and tools may script the tokens: fn(threads) -> one token per thread.
        self.token_source = None
        # (thread, the last step's logits: Thread.logits_row its row) for the threads that sampled in it
        self._row_views: list[tuple[Thread, torch.Tensor]] = []
        self._penalized: list[Thread] = []  # threads holding a Penalties state

    def settle(self, fed: set[int] | None = None):
        """The threads that sampled in the last step and are not in ``fed`` (ids; None: every
        thread, at the end of an engine call) copy their logits row out of that step's
        logits, which are then no longer referenced (a discarded thread has none), unless the
        token it sampled is still pending: those logits are then not after its last token, and
        it is fed before anything samples from it again (every thread of a session keeps its
        last token pending after generate: each kept a stale [vocab] copy, 600 KB with a 152k
        vocabulary, beyond the KV cache's budget: a session of many finished children held
        more memory in them than in its pages). A thread that stopped sampling (accept's stop
        rules, or its protocol's: a fork, a step's end, a budget) drops its [vocab] penalty
        state; at a call's end every thread does."""
        for t, logits in self._row_views:
            if t.last_logits is logits and t.logits_row is not None and (fed is None or id(t) not in fed):
                t.last_logits, t.logits_row = None if t.pending else logits[t.logits_row].clone(), None
        self._row_views = []
        keep = [t for t in self._penalized if fed is not None and t.finish_reason is None and not t.closed]
        kept = {id(t) for t in keep}
        for t in self._penalized:
            if id(t) not in kept:
                t.penalties = None
        self._penalized = keep

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` written after other tokens (headers, tags, injected text;
        Tokenizer.encode_continuation), checked against the model's vocabulary."""
        ids = self.tokenizer.encode_continuation(text)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{text!r:.60} encodes to token id {bad[0]}, outside the model's vocabulary "
                             f"[0, {self.vocab_size}) (the tokenizer has tokens the model has no rows for); "
                             "write it without that token.")
        return ids

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """The token ids ``SamplingParams.bad_words`` forbid (vLLM's two forms of each word:
        as written after other text, and as a new word, a space before it), distinct,
        checked against the model's vocabulary; remembered per list of words."""
        key = tuple(words)
        got = self._bad_ids.get(key)
        if got is None:
            got = []
            for w in words:
                for text in (w.lstrip(), " " + w.lstrip()):
                    ids = self.tokenizer.encode_continuation(text)
                    out = [i for i in ids if not 0 <= i < self.vocab_size]
                    if out:
                        raise ValueError(f"SamplingParams.bad_words: {text!r:.60} encodes to token id {out[0]}, "
                                         f"outside the model's vocabulary [0, {self.vocab_size}); leave that word out.")
                    if ids and ids not in got:
                        got.append(ids)
            if len(self._bad_ids) >= 256:
                self._bad_ids.clear()
            self._bad_ids[key] = got
        return got

    def _bad_tokens(self, t: Thread) -> list[int]:
        """The tokens ``t``'s bad_words forbid now: each word's last token when the tokens
        ``t`` sampled in the call end with the rest of it (vLLM's rule)."""
        g, out = t.generated, []
        for ids in self.bad_word_ids(t.params.bad_words):
            k = len(ids) - 1
            if k == 0 or (k <= len(g) and g[len(g) - k:] == ids[:-1]):
                out.append(ids[-1])
        return out

    def call_params(self, p) -> SamplingParams:
        """``p`` checked, as a copy of its own for one engine call (the engine reads its params
        at every token, and the caller's object changed while the call runs, by a stream
        callback or another Python thread setting up its next call with it, reached the
        running request: max_tokens raised past its reserved pages, a stop string set).
        Refused before any work: parameters under which no token could ever be sampled:
        min_tokens forbids the stop tokens (stop_token_ids, and the EOS ids unless ignore_eos)
        until then, and those may be the whole vocabulary (a tiny model's: every row of the
        first step was -inf, reported as NaN logits from the weights)."""
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}.")
        p.verify()
        V = self.vocab_size
        for name, ids in (("logit_bias", p.logit_bias or ()), ("allowed_token_ids", p.allowed_token_ids or ())):
            out = [i for i in ids if i >= V]
            if out:
                raise ValueError(f"SamplingParams.{name} has token id {out[0]}, outside the model's vocabulary "
                                 f"[0, {V}); give ids below {V}.")
        banned = {i for i, b in (p.logit_bias or {}).items() if b == float("-inf")}
        if p.bad_words:
            banned |= {ids[0] for ids in self.bad_word_ids(p.bad_words) if len(ids) == 1}
        by = " and ".join(n for n, on in (("logit_bias (-inf)", p.logit_bias), ("bad_words", p.bad_words)) if on)

        def none_left(forbidden: set) -> bool:  # (every token forbidden: no token can be sampled)
            if p.allowed_token_ids is not None:
                return all(i in forbidden for i in p.allowed_token_ids)
            return len(forbidden) >= V and all(i in forbidden for i in range(V))
        if banned and none_left(banned):
            of = "allowed_token_ids" if p.allowed_token_ids is not None else f"the model's vocabulary of {V}"
            raise ValueError(f"SamplingParams' {by} leave no token of {of} to sample. Forbid fewer tokens.")
        if p.min_tokens > 0:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
            if none_left(stops | banned):
                eos = "" if p.ignore_eos else " and the EOS ids"
                if p.allowed_token_ids is None and not banned:
                    what = f"cover the model's whole vocabulary of {V} tokens"
                else:
                    what = "cover every token " + " and ".join(
                        n for n, on in (("logit_bias", p.logit_bias), ("bad_words", p.bad_words),
                                        ("allowed_token_ids", p.allowed_token_ids is not None)) if on) + " leave"
                raise ValueError(f"SamplingParams(min_tokens={p.min_tokens}) forbids the stop tokens until then, but "
                                 f"stop_token_ids{eos} {what}: no token could be sampled. Set min_tokens=0, "
                                 "or stop on fewer tokens.")
        return dataclasses.replace(p)

    def at_context_end(self, t: Thread) -> bool:
        """``t``'s next token would sit at or past the model's context: it samples no more."""
        return (t.seg.base + len(t.tokens) if t.live is None else effective_end(t)) >= self.max_positions

    def samplers_of(self, threads: list[Thread], left: int | None = None) -> list[Thread]:
        """Which of ``threads`` sample this step: those not finished whose next token is inside
        the model's context (the others end, "length"); with a total budget that leaves
        ``left`` tokens (None: none), the first ``left`` of them, the others ending here."""
        # (one pass, the context check inline: every step asks it of every thread, twice)
        mp, s = self.max_positions, []
        for t in threads:
            if t.finish_reason is None:
                if (t.seg.base + len(t.tokens) if t.live is None else effective_end(t)) >= mp:
                    t.finish_reason = "length"
                else:
                    s.append(t)
        if left is not None and len(s) > left:
            left = max(left, 0)
            for t in s[left:]:
                t.finish_reason = "length"
            s = s[:left]
        return s

    # ---- one step --------------------------------------------------------------------------
    def _check_room(self, feed: list[Thread]):
        c = self.cache
        need, reserved, ps = 0, {}, c.page_size
        for t in feed:
            seg = t.seg
            need += -(-(seg.length + len(t.pending)) // ps) - len(seg.pages)  # (c.pages_for, inline)
            res = seg.owner_reservation
            if res is not None:
                reserved[id(res)] = res.pages
        have = c.pages_unreserved + sum(reserved.values())
        if need > have:
            raise CacheFullError(
                f"The KV cache is full: this step needs {need} more pages but {have} are free "
                f"({c.num_pages} pages of {c.page_size} tokens in all). Close finished sessions, "
                f"or raise kv_cache_tokens.")

    def step(self, feed: list[Thread], samplers: list[Thread]) -> list[int]:
        """Feed ``feed``'s pending tokens, then sample one token for each of ``samplers``
        (returned in order; the caller applies them with ``accept``)."""
        mp = self.max_positions
        for t in samplers:
            if (t.seg.base + len(t.tokens) if t.live is None else effective_end(t)) >= mp:
                raise RuntimeError(f"thread {t.id} would sample at position {effective_end(t)}, past the "
                                   f"model's context of {self.max_positions} (engine bug: its caller "
                                   "ends such threads first)")
        sampling = {id(t) for t in samplers}
        # A live thread that does not sample here and whose view has grown so that its
        # pending tokens would sit past the model's context keeps them pending: no K/V is
        # written past the context (its readers see it as far as it is written).
        feed = [t for t in feed if t.live is None or id(t) in sampling or effective_end(t) <= self.max_positions]
        self._check_room(feed)  # (before any change; a re-write below takes no page)
        rewritten = []
        for t in samplers:
            if t.logits_stale and not t.pending and t.tokens:
                # A live thread written in a step where it did not sample (a session's other
                # threads' generate): its view has grown since. Its last token is written
                # again (same slot) so that its next token sees the view as it is now; the
                # slot's K/V are kept until the step is done, to put back if it fails.
                rewritten.append((t, self.cache.save_slot(t.seg, t.seg.length - 1)))
                t.seg.length -= 1
                t.pending = [t.tokens[-1]]
                feed.append(t)
        for t in feed + samplers:
            if t.live is not None:
                refresh_view(t)
        for t in samplers:
            if t.pending or t.tokens:
                continue
            src = logits_source(t)
            if src is t or (src.last_logits is None and src not in feed):
                raise ValueError(f"thread {t.id} has no tokens and no ancestor logits to sample from.")
        # A thread that sampled in the last step holds a view of that step's logits; one not
        # written in this step (it finished, or its caller left it out) keeps a copy of its
        # row instead: threads stopping at different steps each pinned a whole step's
        # logits (a session's 64 threads held 1 GB for 32 MB of rows).
        self.settle(fed={id(t) for t in feed})
        items = [StepItem(t.seg, t.pending, t.view, owner=t) for t in feed]
        logits, row_of = None, {}
        if items:
            try:
                logits = self.runner.run(StepBatch(items))
            except BaseException:  # (the runner put the segments back: each re-write undone too)
                for t, saved in rewritten:
                    self.cache.restore_slot(t.seg, t.seg.length, saved)
                    t.seg.length += 1
                    t.pending = []
                raise
            self.forward_steps += 1
            row_views = self._row_views
            for i, t in enumerate(feed):
                t.pending = []
                row_of[id(t)] = i
                if id(t) in sampling:  # (its row by index, no view: most are fed again next step)
                    t.logits_stale = False
                    t.last_logits, t.logits_row = logits, i
                    row_views.append((t, logits))
                else:
                    t.logits_stale = t.live is not None
                    t.last_logits, t.logits_row = logits[i].clone(), None  # a private copy for idle
                    #                                       threads (a view would pin the whole batch)
        if not samplers:
            return []
        srcs = [t if t.tokens else logits_source(t) for t in samplers]
        for src in srcs:
            if src.last_logits is None:
                raise AssertionError(f"thread {src.id} has no logits: feed it first")
        table = self._logits_rows(srcs, logits, row_of)
        params, pen, early, shaped = [], [], [], []
        for i, t in enumerate(samplers):
            p = t.params
            params.append(p)
            if p.logit_bias or p.allowed_token_ids is not None or p.bad_words:
                shaped.append(i)
            if t.penalties is None and p.penalized:  # the repetition context: its view as it samples
                #                                      its first token of the call
                t.penalties = Penalties(p, self.vocab_size, [s.tokens for s, _ in t.view], self.runner.device,
                                        t.carried_counts)
                self._penalized.append(t)
            if t.penalties is not None:
                pen.append(i)
            if len(t.generated) < p.min_tokens:
                early.append(i)
        if self.token_source is not None:
            tokens = [int(x) for x in self.token_source(samplers)]
            logprobs = table.log_softmax(-1)
        else:  # (log-probs stay the model's, before logit_bias and penalties: vLLM's raw log-probs)
            biased = logit_processed(table, shaped, [params[i] for i in shaped],
                                     [self._bad_tokens(samplers[i]) if params[i].bad_words else ()
                                      for i in shaped]) if shaped else table
            penalized = apply_penalties(biased, pen, [samplers[i].penalties for i in pen]) if pen else biased
            if early:  # (as vLLM's min_tokens: its stop tokens cannot be drawn yet)
                penalized = penalized.clone() if penalized is table else penalized
                rows, cols = [], []  # (one index_put for every early row: one each cost ~10 us)
                for i in early:
                    p = samplers[i].params
                    stops = [s for s in set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                             if s < penalized.shape[1]]
                    rows += [i] * len(stops)
                    cols += stops
                if rows:
                    dev = penalized.device
                    penalized[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")
            tokens, logprobs = sample(penalized, params, [t.generator for t in samplers], raw=table)
        if logprobs is None:
            for t in samplers:
                t._lp_row = t._lp_entry = None
        else:
            want = [i for i, t in enumerate(samplers) if t.logprobs is not None]
            entries = dict(zip(want, top_logprobs_rows(logprobs, want, [tokens[i] for i in want],
                                                       [samplers[i].params.logprobs for i in want],
                                                       [self.namer(samplers[i].params) for i in want]))) if want else {}
            for i, t in enumerate(samplers):
                t._lp_row = (logprobs, i)  # (its row by index: accept reads it only for a token not drawn here)
                e = entries.get(i)
                t._lp_entry = (tokens[i], e) if e is not None else None  # (accept's, for this token)
        return tokens

    @staticmethod
    def _logits_rows(srcs: list[Thread], logits, row_of: dict) -> torch.Tensor:
        """[len(srcs), V]: each source thread's last logits. Rows of this step's forward
        are taken with one index (or none when they are all of it, in order) instead of
        stacking one row at a time."""
        idx = [row_of.get(id(s), -1) for s in srcs]
        if logits is not None and min(idx) >= 0:
            if idx == list(range(logits.shape[0])):
                return logits
            return logits.index_select(0, torch.tensor(idx, device=logits.device))
        return torch.stack([logits_of(s) for s in srcs])

    # ---- applying a sampled token ----------------------------------------------------------
    def begin(self, t: Thread, params: SamplingParams, generator: torch.Generator):
        """Reset ``t``'s sampling state for a new generate call."""
        check_growable(t)
        t.params, t.generator = params, generator
        t.generated, t.finish_reason, t.stop_reason, t.stop_token, t.stop_text = [], None, None, None, None
        t.text_context = context_tail(t, self.tokenizer.CONTEXT_TOKENS)
        t.text_stream = TextStream(self.tokenizer, params.skip_special_tokens, t.text_context) if params.stop else None
        t.penalties = t.carried_counts = None  # (made at its first sample: step)
        t.logprobs = [] if params.logprobs is not None else None

    def accept(self, t: Thread, tok: int, path_limit: int | None = None) -> None:
        """Append a sampled token and apply the stop rules of ``t.params``."""
        p: SamplingParams = t.params
        if t.joined_into is not None or t.children:  # (else nothing to refuse: the check, inline)
            check_growable(t)
        t.tokens.append(tok)
        t.pending.append(tok)
        t.generated.append(tok)
        t.path_tokens += 1
        if t.penalties is not None:
            t.penalties.add(tok)
        lp = getattr(t, "_lp_row", None)
        if t.logprobs is not None and lp is not None:
            e = getattr(t, "_lp_entry", None)  # (step's, made for all its threads at once)
            t.logprobs.append(e[1] if e is not None and e[0] == tok else
                              top_logprobs(lp[0][lp[1]], tok, p.logprobs, self.namer(p)))
        t._lp_row = t._lp_entry = None
        eos = not p.ignore_eos and tok in self.eos_ids
        early = len(t.generated) < p.min_tokens  # (as vLLM: EOS and stop tokens end it from min_tokens on)
        if not early and (eos or tok in p.stop_token_ids):
            # (as vLLM: the stop token's text is not in the output, and stop_reason names only
            # a stop the caller asked for)
            t.finish_reason, t.stop_reason, t.stop_token = "stop", None if eos and tok == self.primary_eos else tok, tok
            t.stop_text = self.tokenizer.completion_text(t.text_context, t.generated if p.include_stop_str_in_output
                                                         else t.generated[:-1], p.skip_special_tokens)
        elif p.stop and self._stop_string(t, p):
            pass
        elif len(t.generated) >= p.max_tokens or \
                (t.seg.base + len(t.tokens) if t.live is None else effective_end(t)) >= self.max_positions or \
                (path_limit is not None and t.path_tokens >= path_limit):
            t.finish_reason = "length"

    def _stop_string(self, t: Thread, p: SamplingParams) -> bool:
        # The text grows by whole characters (TextStream, made by begin() with the stops);
        # a new match ends in the new piece.
        piece = t.text_stream.push(t.generated[-1])
        if not piece or len(t.generated) <= p.min_tokens:  # (as vLLM: stop strings after min_tokens)
            return False
        text = t.text_stream.text
        new_from = len(text) - len(piece)
        # the first stop string of the list found in the new text (as vLLM; not the earliest one)
        hit = next(((j, s) for s in p.stop if (j := text.find(s, max(0, new_from - len(s) + 1))) >= 0), None)
        if hit is None:
            return False
        pos, s = hit
        t.finish_reason, t.stop_reason = "stop", s
        t.stop_text = text[:pos + len(s)] if p.include_stop_str_in_output else text[:pos]
        return True

    def namer(self, p: SamplingParams):
        """Log-probs' decoded_token for ``p``: each token's text alone (none without detokenize, as vLLM)."""
        return self.tokenizer.token_text if p.detokenize else _no_text

    def drop_token(self, t: Thread):
        """``t``'s protocol takes no token from the last step (it ended earlier in the step):
        forget that step's log-prob rows, which accept() would have read (they pin the step's
        [rows, vocab] log-probs)."""
        t._lp_row = t._lp_entry = None

    def text_of(self, t: Thread) -> str:
        if not t.params.detokenize:  # (as vLLM: no text)
            return ""
        if t.stop_text is not None:
            return t.stop_text
        return self.tokenizer.completion_text(t.text_context, t.generated, t.params.skip_special_tokens)
