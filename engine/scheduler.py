"""Scheduler for parallel sampling: FIFO admission with page reservations,
one StepBatch per step holding every active thread of every request.

A request's prompt is prefilled once into its own segment; its ``n`` threads
then each write into their own segment and attend ``[(prompt, 0), (own, 0)]``.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import KVCache, Reservation, Segment
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .step import StepBatch, StepItem


@dataclass
class Thread:
    index: int
    generator: torch.Generator
    seg: Segment | None = None
    reservation: Reservation | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None
    request: "Request | None" = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    threads: list[Thread]
    pages_needed: int
    prompt_seg: Segment | None = None
    prompt_res: Reservation | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    t_start: float = 0.0

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.threads)

    def pages_held(self) -> int:
        segs = [self.prompt_seg] + [t.seg for t in self.threads]
        return sum(len(s.pages) for s in segs if s is not None)


class Scheduler:
    def __init__(self, cache: KVCache, tokenizer, eos_ids: list[int], max_positions: int,
                 max_batched_tokens: int = 8192):
        self.cache, self.tokenizer = cache, tokenizer
        self.eos_ids = set(eos_ids)
        self.max_positions = max_positions
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []

    # ---- admission -------------------------------------------------------------------------
    def pages_needed(self, prompt_len: int, p: SamplingParams) -> int:
        """Worst-case pages of a request: its prompt, plus per thread every token it may
        write (the last sampled token is never written back)."""
        gen = min(p.max_tokens, max(self.max_positions - prompt_len, 1))
        return self.cache.pages_for(prompt_len) + p.n * self.cache.pages_for(gen - 1)

    def add(self, req: Request):
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _admit(self) -> list[Request]:
        admitted, budget = [], self.max_batched_tokens
        while self.waiting:
            req = self.waiting[0]
            P = len(req.prompt_ids)
            if admitted and P > budget:
                break
            if not self.cache.can_reserve(req.pages_needed):
                break  # FIFO: later requests wait behind the head too
            self.waiting.popleft()
            c = self.cache
            req.prompt_res = c.reserve(c.pages_for(P))
            req.prompt_seg = c.new_segment(0, req.prompt_res)
            per_thread = (req.pages_needed - c.pages_for(P)) // req.params.n
            for t in req.threads:
                t.reservation = c.reserve(per_thread)
            req.t_start = time.perf_counter()
            admitted.append(req)
            budget -= P
        return admitted

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> StepBatch:
        batch = StepBatch()
        for req in self._admit():
            self.prefilling.append(req)
            batch.items.append(StepItem(req.prompt_seg, req.prompt_ids, [(req.prompt_seg, 0)],
                                        owner=req))
        for req in self.running:
            for t in req.threads:
                if not t.finished:
                    batch.items.append(StepItem(t.seg, [t.token_ids[-1]],
                                                [(req.prompt_seg, 0), (t.seg, 0)], owner=t))
        return batch

    def postprocess(self, batch: StepBatch, logits: torch.Tensor, sample_fn) -> list[RequestOutput]:
        """Sample every wanted row, advance threads, retire finished requests."""
        rows, threads = [], []
        for r, it in enumerate(batch.items):
            o = it.owner
            # A prefill item's last row is sampled once per thread of its request.
            for t in (o.threads if isinstance(o, Request) else [o]):
                rows.append(r)
                threads.append(t)
        reqs = {id(t.request): t.request for t in threads}.values()
        for req in reqs:
            req.metrics.forward_steps += 1
            req.metrics.kv_pages_peak = max(req.metrics.kv_pages_peak, req.pages_held())
        tokens, logprobs = sample_fn(logits[rows], [t.request.params for t in threads],
                                     [t.generator for t in threads])
        for i, (t, tok) in enumerate(zip(threads, tokens)):
            if t.seg is None:       # first token after prefill: the thread gets its segment
                t.seg = self.cache.new_segment(len(t.request.prompt_ids), t.reservation)
            self._append_token(t.request, t, tok, logprobs[i])
        self.running.extend(self.prefilling)
        self.prefilling = []
        done = [r for r in self.running if r.finished]
        self.running = [r for r in self.running if not r.finished]
        return [self._finish(r) for r in done]

    def _append_token(self, req: Request, t: Thread, tok: int, lp_row: torch.Tensor):
        from .sampler import top_logprobs
        p = req.params
        t.token_ids.append(tok)
        req.metrics.generated_tokens += 1
        if p.logprobs is not None:
            t.logprobs = t.logprobs or []
            t.logprobs.append(top_logprobs(lp_row, tok, p.logprobs))
        if not p.ignore_eos and tok in self.eos_ids:
            t.finish_reason, t.stop_reason = "stop", tok
        elif tok in p.stop_token_ids:
            t.finish_reason, t.stop_reason = "stop", tok
        elif p.stop and self._check_stop_strings(t, p):
            pass
        elif len(t.token_ids) >= p.max_tokens or \
                len(req.prompt_ids) + len(t.token_ids) >= self.max_positions:
            t.finish_reason = "length"
        if t.finished:
            self._release_thread(t)

    def _check_stop_strings(self, t: Thread, p: SamplingParams) -> bool:
        text = self.tokenizer.decode(t.token_ids)
        # Only a stop string that ends inside the newest token's text can be new.
        hits = [(text.find(s), s) for s in p.stop if s in text]
        if not hits:
            return False
        pos, s = min(hits)
        t.text, t.finish_reason, t.stop_reason = text[:pos], "stop", s
        return True

    def _release_thread(self, t: Thread):
        if t.seg is not None:
            self.cache.release_segment(t.seg)
            t.seg = None
        if t.reservation is not None:
            self.cache.release(t.reservation)

    def _release_request(self, req: Request):
        for t in req.threads:
            self._release_thread(t)
        if req.prompt_seg is not None:
            self.cache.release_segment(req.prompt_seg)
            req.prompt_seg = None
        if req.prompt_res is not None:
            self.cache.release(req.prompt_res)

    def _finish(self, req: Request) -> RequestOutput:
        self._release_request(req)
        req.metrics.wall_s = time.perf_counter() - req.t_start
        outs = []
        for t in req.threads:
            text = t.text if t.text is not None else self.tokenizer.decode(t.token_ids)
            outs.append(CompletionOutput(t.index, text, list(t.token_ids), t.finish_reason,
                                         t.logprobs, t.stop_reason))
        return RequestOutput(req.id, req.prompt, list(req.prompt_ids), outs, req.metrics)

    def abort_all(self):
        """Drop every request and give back all their pages (after an error)."""
        for req in list(self.waiting) + self.prefilling + self.running:
            self._release_request(req)
        self.waiting.clear()
        self.prefilling, self.running = [], []
