"""What ``LLM.generate`` returns (vLLM-style names)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    forward_steps: int = 0        # engine steps this request took part in (a step is one
                                  # forward pass, or several when it feeds more than
                                  # max_forward_tokens tokens)
    generated_tokens: int = 0     # tokens sampled over all its threads
    kv_pages_peak: int = 0        # most KV pages the request held at once (a shared prompt
                                  # prefix's included)
    wall_s: float = 0.0           # admission to finish
    prompt_tokens: int = 0
    max_parallel_threads: int = 0 # most threads sampling in one step
    shared_prompt_tokens: int = 0 # its prompt's first tokens, written once for several
                                  # requests of the call (LLM.share_prompt_prefixes)


class Logprob(float):
    """A token's log-prob: a float, with vLLM's ``Logprob`` fields ``.logprob`` (the same
    value), ``.rank`` (1: the most likely token of its position) and ``.decoded_token`` (the
    token's text alone, special tokens spelled out, a SentencePiece word-start space kept)."""

    __slots__ = ("rank", "decoded_token")  # (no per-object dict: a step with log-probs builds k + 1 a thread)

    def __new__(cls, value: float, rank: int | None = None, decoded_token: str | None = None):
        obj = float.__new__(cls, value)
        obj.rank, obj.decoded_token = rank, decoded_token
        return obj

    @property
    def logprob(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Logprob(logprob={float(self)!r}, rank={self.rank}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):
        return (Logprob, (float(self), self.rank, self.decoded_token))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None                     # "stop" | "length"
    logprobs: list[dict[int, Logprob]] | None = None  # per token: its own and the top-k's (floats)
    stop_reason: int | str | None = None          # the stop string / stop_token_ids token that ended it
                                                  # (the tokenizer's EOS: None, as vLLM)
    answer: str | None = None                     # extracted answer (answer-selecting protocols)
    tree: list[dict] | None = None                # protocol runs: the thread tree, per thread (its "view":
                                                  # [id of the thread that wrote a segment, shift] pairs)
    metrics: dict | None = None                   # protocol runs: critical_path_tokens, ...
    events: list[dict] | None = None              # protocol runs: fork/join/malformed events

    def finished(self) -> bool:
        """Whether it ended (vLLM's; always, once generate() returned it)."""
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of its tokens' log-probs (vLLM's; None without SamplingParams.logprobs)."""
        if self.logprobs is None:
            return None
        return float(sum(lp[tok] for tok, lp in zip(self.token_ids, self.logprobs)))


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    finished: bool = True
    # SamplingParams.prompt_logprobs: None for the first prompt token, then each token's
    # {token id: Logprob} (itself and the top-k after the tokens before it); else None
    prompt_logprobs: list | None = None
