"""Scheduler: FIFO admission with page reservations, then one EngineCore step per
iteration over every thread of every running request.

Each request is a ThreadTree driven by a protocol run (plain parallel sampling
by default). Admission reserves the request's worst-case pages, so a running
request never finds the pool empty; a request that can never fit is refused
before any work, one that merely has to wait stays queued in order.
"""
from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field

from .core import EngineCore
from .outputs import RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .threads import ThreadTree, prefix_end


def sessions_hold_pages(cache, need: int, what: str) -> ValueError:
    """The error for a request that fits the cache but not the pages open sessions leave."""
    c = cache
    return ValueError(f"{what} needs up to {need} free pages of the KV cache but open sessions hold all but "
                      f"{c.pages_unreserved} of its {c.num_pages}; close them (Session.close), or raise "
                      f"kv_cache_tokens (now {c.num_pages * c.page_size}).")


@dataclass(eq=False)
class Request:
    id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    protocol: object                  # a Protocol (engine.protocols)
    pages_needed: int = 0
    tree: ThreadTree | None = None
    run: object = None                # the protocol's per-request run
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    t_start: float = 0.0
    prefix: tuple = ()                # (segment, 0) entries of a shared prompt prefix (LLM.generate)


class Scheduler:
    def __init__(self, core: EngineCore, make_generator, max_batched_tokens: int = 8192):
        self.core, self.cache = core, core.cache
        self.make_generator = make_generator
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request):
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self):
        budget = self.max_batched_tokens
        while self.waiting:
            req = self.waiting[0]
            P = len(req.prompt_ids) - prefix_end(req.prefix)  # (it prefills past a shared prefix, written already)
            if P > budget and budget < self.max_batched_tokens:
                break  # (next step; a longer prompt than the budget is admitted alone: it used
                #        to wait until nothing else ran, and every request queued behind it too)
            if not self.cache.can_reserve(req.pages_needed):
                break  # FIFO: later requests wait behind the head
            res = self.cache.reserve(req.pages_needed)
            try:
                req.tree = ThreadTree(self.cache, res)
            except BaseException:  # (a MemoryError: the reservation back, not held for good)
                self.cache.release(res)
                raise
            self.waiting.popleft()
            self.running.append(req)  # (first: abort_all closes its tree if start() raises)
            req.tree.new_root(req.prompt_ids, req.prefix)
            # (bound to this request's params, not the request: a cycle through its run; nor a
            # lambda over this loop's variable: every request admitted in this step would draw
            # its later threads from the last one's params)
            params = req.params
            req.run = req.protocol.start(req.tree, self.core, params, functools.partial(self.make_generator, params))
            req.run.metrics = req.metrics
            req.t_start = time.perf_counter()
            budget -= P

    def step(self) -> list[RequestOutput]:
        """Admit, run one batched forward over all running requests, retire finished ones."""
        self._admit()
        feed, samplers, owner = [], [], []
        for req in self.running:
            s = req.run.samplers()  # (first: it may start threads, e.g. a join, whose headers this step feeds)
            f = [t for t in req.tree.open.values() if t.pending]
            feed += f
            samplers += s
            owner += [req] * len(s)
            if f or s:
                req.metrics.forward_steps += 1
            req.metrics.max_parallel_threads = max(req.metrics.max_parallel_threads, len(s))
        if not feed and not samplers:
            if self.running:
                raise RuntimeError("no thread can advance: protocol bug")
            if self.waiting:  # nothing runs, so nothing this call does can free pages: sessions hold them
                raise sessions_hold_pages(self.cache, self.waiting[0].pages_needed, "A request")
            return []
        try:
            tokens = self.core.step(feed, samplers)
        except FloatingPointError as e:  # (non-finite logits: the sampler's rows are these samplers)
            e.request_ids = sorted({owner[r].id for r in getattr(e, "rows", ())})
            raise
        for req in self.running:
            req.metrics.kv_pages_peak = max(req.metrics.kv_pages_peak, req.tree.pages_held())
        for req, t, tok in zip(owner, samplers, tokens):
            if t.finished:  # ended by its protocol earlier in this step: the token is dropped
                self.core.drop_token(t)
                continue
            req.metrics.generated_tokens += 1
            req.run.on_token(t, tok)
        ended = [r.run.done() for r in self.running]  # (once each: a run's samplers() may move it on)
        done = [r for r, e in zip(self.running, ended) if e]
        self.running = [r for r, e in zip(self.running, ended) if not e]
        try:
            return [self._finish(r) for r in done]
        finally:  # (a protocol's outputs() may raise, e.g. a user's extract_answer: pages back anyway)
            for r in done:
                r.tree.close()

    def _finish(self, req: Request) -> RequestOutput:
        outs = req.run.outputs()  # (step() closes the tree afterwards, whether this raises or not)
        req.metrics.wall_s = time.perf_counter() - req.t_start
        return RequestOutput(req.id, req.prompt, list(req.prompt_ids), outs, req.metrics)

    def abort_all(self):
        """Drop every request and give back all their pages (after an error)."""
        for req in self.running:
            req.tree.close()
        self.waiting.clear()
        self.running = []
