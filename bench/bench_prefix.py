"""Requests that share a prompt prefix, in one generate call: shared vs each its own, in one run.

Same random Qwen3-shaped model as bench_generate.py (~58M parameters, float32). --requests
prompts, each a common preamble of --prefix-len tokens followed by --own-len tokens of its
own (random ids), sampled --new-tokens each (EOS ignored, seeded), in one ``generate`` call
with ``LLM.share_prompt_prefixes`` on (the preamble written once, read once per step for
all requests) and off (each request writes and reads its whole prompt). The two settings
alternate; median seconds of the call, the tokens it fed (prefill + decode), its peak KV
pages, and whether both gave the same tokens. ``--protocol hogwild``: each request is a
Hogwild! collaboration of two workers (--new-tokens each), which read the prompt through
live views.

    python bench/bench_prefix.py [--prefix-len 1024] [--own-len 16] [--requests 8]
                                 [--new-tokens 32] [--repeats 3] [--protocol sampling|hogwild]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)
sys.path.insert(0, os.path.dirname(__file__))

from bench_generate import MODEL, machine_info  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.demo import make_random_model  # noqa: E402


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, share: bool, protocol=None):
    """(seconds, tokens fed, peak KV pages used, the tokens) of one generate call."""
    llm.share_prompt_prefixes = share
    fed, peak, run_ = [0], [0], llm.runner.run

    def counting(batch):
        fed[0] += batch.num_tokens
        out = run_(batch)
        peak[0] = max(peak[0], llm.cache.pages_used)
        return out
    llm.runner.run = counting
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, protocol=protocol)
        dt = time.perf_counter() - t0
    finally:
        del llm.runner.run
        llm.share_prompt_prefixes = True
    return dt, fed[0], peak[0], [c.token_ids for o in outs for c in o.outputs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--own-len", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--protocol", choices=["sampling", "hogwild"], default="sampling")
    a = ap.parse_args()
    from engine.protocols import Hogwild
    make = (lambda: Hogwild(workers=2, collab_prompt=None, finisher=False)) if a.protocol == "hogwild" else (lambda: None)
    print(machine_info())
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(make_random_model(d, **MODEL), seed=0)
        V = llm.config.vocab_size
        g = torch.Generator().manual_seed(1)
        pre = torch.randint(0, V, (a.prefix_len,), generator=g).tolist()
        prompts = [pre + torch.randint(0, V, (a.own_len,), generator=g).tolist() for _ in range(a.requests)]
        params = SamplingParams(temperature=1.0, max_tokens=a.new_tokens, ignore_eos=True, seed=0)
        workers = 2 if a.protocol == "hogwild" else 1
        print(f"model: Qwen3-shaped random, float32 | {a.requests} requests, each a {a.prefix_len}-token "
              f"preamble + {a.own_len} tokens of its own, {a.new_tokens} new tokens each"
              f"{' (a Hogwild! collaboration of 2 workers: each worker)' if workers > 1 else ''}, median of {a.repeats}")
        run(llm, [p[:48] for p in prompts], params, True, make())  # (warm-up)
        times = {True: [], False: []}
        got = {}
        for _ in range(a.repeats):
            for share in (True, False):
                dt, fed, peak, toks = run(llm, prompts, params, share, make())
                times[share].append(dt)
                got[share] = (fed, peak, toks)
        total = a.requests * a.new_tokens * workers
        print(f"{'prompt prefix':>14} {'median s':>9} {'tok/s':>8} {'tokens fed':>11} {'peak KV pages':>14}")
        for share in (True, False):
            t = statistics.median(times[share])
            fed, peak, _ = got[share]
            print(f"{'shared' if share else 'per request':>14} {t:9.3f} {total / t:8.1f} {fed:11,} {peak:14,}")
        speed = statistics.median(times[False]) / statistics.median(times[True])
        print(f"shared / per request: {speed:.2f}x faster; same tokens: {got[True][2] == got[False][2]}")


if __name__ == "__main__":
    main()
