"""Sampling parameters, validated up front with errors that name the allowed range."""
from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's sampling epsilon; vLLM samples a
#                     temperature in (0, 0.01) at 0.01 instead: its argmax, but for near-ties)


@dataclass
class SamplingParams:
    """How each completion is sampled, with vLLM's field names and meanings: ``n``
    completions per prompt; ``temperature`` (below 1e-5: greedy), ``top_p``, ``top_k`` (-1 or
    0: off) and ``min_p`` (applied first); ``max_tokens`` (default 256) and ``min_tokens``;
    ``stop`` strings, ``stop_token_ids``, ``include_stop_str_in_output``,
    ``skip_special_tokens``, ``ignore_eos``; ``seed`` (None or -1: none); ``logprobs`` (the
    top-k log-probs of each sampled token, the model's: before penalties and logit_bias);
    presence, frequency and repetition penalties; ``logit_bias`` ({token id: bias} added to
    the logits, -inf forbids a token), ``allowed_token_ids`` (only these can be sampled) and
    ``bad_words`` (never written: a word's last token is forbidden when the thread's tokens
    end with the rest of it), before the penalties; ``prompt_logprobs`` (the prompt tokens'
    log-probs and the top-k at each: RequestOutput.prompt_logprobs); ``truncate_prompt_tokens``
    (the prompt's last k token ids kept). ``max_total_tokens`` (Loom's): a protocol's (or a
    ``Session.generate`` call's) bound on the tokens sampled over all its threads. Every field is checked when made and at each call."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 256
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    max_total_tokens: int | None = None   # protocols, Session.generate: bound on tokens sampled over all threads
    min_tokens: int = 0                   # as vLLM: no EOS, stop token or stop string ends a
    #                                       completion before it has this many tokens
    include_stop_str_in_output: bool = False  # as vLLM: the stop string (a stop token's text) kept
    skip_special_tokens: bool = True      # as vLLM: special tokens' text left out of the output's text
    # as vLLM: presence / frequency over the tokens a thread samples in this call,
    # repetition over its context at its first token of the call (the prompt, the threads
    # it sees, its own tokens) and those
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # as vLLM: added to the logits before the penalties
    allowed_token_ids: list[int] | None = None  # as vLLM: every other token is forbidden
    # as vLLM: each word's tokens, as written after other text and as a new word (a space
    # before it), are never all sampled in a row in the call
    bad_words: str | list[str] | None = None
    # as vLLM: RequestOutput.prompt_logprobs, for each prompt token after the first its
    # log-prob and rank after the tokens before it, and the top-k there
    prompt_logprobs: int | None = None
    # as vLLM: generate() keeps the prompt's last k token ids (-1: as many as the model's
    # context holds with one position to generate)
    truncate_prompt_tokens: int | None = None
    # as vLLM: False leaves the outputs' text empty and log-probs' decoded_token None (no stop
    # strings then: they are found in the text)
    detokenize: bool = True

    def __post_init__(self):
        self.verify()

    def verify(self):
        """Check every field (generate() calls it again: fields may have been changed since);
        a single stop string / token id becomes a list, numpy numbers Python ones."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, (set, frozenset)):  # (a dict falls to _as_list's refusal)
            raise ValueError(f"SamplingParams.stop={self.stop!r} is invalid: a set has no order, and the first stop "
                             "string of the list found ends a completion; give a list.")
        self.stop = _as_list(self.stop, "stop", "a non-empty string or a list of non-empty strings")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str):
                self.bad_words = [self.bad_words]
            self.bad_words = _as_list(self.bad_words, "bad_words", "None or a list of words (non-blank strings)")
            if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
                raise ValueError(f"SamplingParams.bad_words={self.bad_words!r} is invalid: must be None or a list "
                                 "of words (non-blank strings).")
            self.bad_words = self.bad_words or None
        if _is_int(self.stop_token_ids):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of non-negative token ids")

        def bad(name, rng):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {rng}.")
        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not _is_num(self.temperature) or not (0.0 <= self.temperature <= 100.0):
            bad("temperature", "must be in [0, 100] (0, or anything below 1e-5, means greedy)")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be -1 or 0 (disabled) or an integer >= 1")
        if not _is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2] (0 disables it)")
        if not _is_num(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 100.0:
            # (a logit is multiplied or divided by it: 1e-40 made them inf)
            bad("repetition_penalty", "must be in [0.01, 100] (1 disables it; above 1 discourages repeats)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative token ids")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if not self.detokenize and self.stop:
            bad("detokenize", f"with stop={self.stop!r}: stop strings are found in the text, as in vLLM; "
                "use detokenize=True, or stop_token_ids")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be None or an integer")
        if self.seed == -1:  # (as vLLM: no seed)
            self.seed = None
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if self.max_total_tokens is not None and (not _is_int(self.max_total_tokens)
                                                  or self.max_total_tokens < 1):
            bad("max_total_tokens", "must be None or an integer >= 1")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 100):
            # (vLLM's -1, every token's, it also refuses by default: a 150k-entry dict a token)
            bad("logprobs", "must be None or an integer in [0, 100] (whole distributions: LLM.score)")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= 100):
            bad("prompt_logprobs", "must be None or an integer in [0, 100] (whole distributions: LLM.score)")
        if self.truncate_prompt_tokens is not None and (not _is_int(self.truncate_prompt_tokens) or
                                                        not (self.truncate_prompt_tokens >= 1
                                                             or self.truncate_prompt_tokens == -1)):
            bad("truncate_prompt_tokens", "must be None, an integer >= 1 (the prompt's last tokens kept), or -1 "
                "(as many as the model's context holds)")
        for name in ("n", "top_k", "max_tokens", "min_tokens", "seed", "max_total_tokens", "logprobs",
                     "prompt_logprobs", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        if self.top_k == 0:  # (vLLM's default spelling of "disabled")
            self.top_k = -1
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            setattr(self, name, float(getattr(self, name)))
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                bad("logit_bias", "must be None or a dict {token id: bias}")
            if any(not _is_int(k) or k < 0 for k in self.logit_bias):
                bad("logit_bias", "its keys must be non-negative integer token ids (JSON's string keys: int(key))")
            if any(not _is_num(v) or not (-1e30 <= v <= 1e30 or v == float("-inf")) for v in self.logit_bias.values()):
                bad("logit_bias", "its biases must be numbers in [-1e30, 1e30], or -inf (the token is never sampled)")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            if _is_int(self.allowed_token_ids):
                self.allowed_token_ids = [self.allowed_token_ids]
            self.allowed_token_ids = _as_list(self.allowed_token_ids, "allowed_token_ids",
                                              "None or a non-empty list of token ids")
            if any(not _is_int(t) or t < 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "must be None or a non-empty list of non-negative token ids")
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "would forbid every token: give at least one id, or None (every token allowed)")
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW pick the top token: dividing logits by them
        overflows float32 (inf / NaN), and their distribution is the argmax anyway."""
        return self.temperature < GREEDY_BELOW


# vLLM fields Loom does not have: the value that is Loom's behaviour (accepted: code that
# spells vLLM's defaults runs unchanged), and what to do instead.
_VLLM_ONLY = {
    "best_of": (None, "n samples, selected by a protocol: engine.protocols.ParallelSampling(n, select=...)"),
    "use_beam_search": (False, "n samples with a protocol (engine.protocols)"),
    "spaces_between_special_tokens": (True, "llm.tokenizer.decode(output.token_ids, ...)"),
    "logits_processors": (None, "not supported"),
    "guided_decoding": (None, "not supported"),
    "structured_outputs": (None, "not supported"),
    "extra_args": (None, "not supported"),
}


def _init_with_vllm_names(init):
    """SamplingParams' __init__, taking vLLM's fields Loom lacks when they hold the value
    that is Loom's behaviour, and refusing other values (and unknown names) with one
    clear error (a bare TypeError said only 'unexpected keyword argument')."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for name in [k for k in kwargs if k in _VLLM_ONLY]:
            value, (loom, instead) = kwargs.pop(name), _VLLM_ONLY[name]
            if name == "best_of" and _is_int(value) and _is_int(n := kwargs.get("n", 1)) and 1 <= value < n:
                raise ValueError(f"SamplingParams(best_of={value!r}) is below n={n!r}: best_of must be >= n "
                                 "(as vLLM); leave it out.")
            same = (value is None or (name == "best_of" and value == kwargs.get("n", 1))
                    or (loom is None and isinstance(value, (list, tuple, dict)) and not value)  # (empty: no-op)
                    or (loom is not None and value == loom))
            if not same:
                raise ValueError(f"SamplingParams({name}={value!r}): Loom does not support vLLM's {name} "
                                 f"({instead}); leave it out or at {loom!r}.")
        fields = [f.name for f in dataclasses.fields(SamplingParams)]
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(f"SamplingParams has no field {', '.join(unknown)}; its fields: {', '.join(fields)}.")
        init(self, *args, **kwargs)
    return __init__


SamplingParams.__init__ = _init_with_vllm_names(SamplingParams.__init__)


def _as_list(value, name: str, what: str) -> list:
    """value (None, or an iterable that is not a string) as a new list; else one clear error."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {what}.")
    return list(value)


def _is_int(x) -> bool:  # (numpy integers too)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_num(x) -> bool:  # (numpy floats too; not NaN)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x == x
