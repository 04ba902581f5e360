"""Sampling one token per row: Loom's sampler vs sorting the vocabulary, same run.

For filtered sampling (top-k, top-p, min-p) at a real vocabulary (Qwen's 151,936 tokens),
Loom's ``sample()`` looks only at each row's largest logits (engine/sampler.py,
``_filtered_rows``); the baseline is the same filters on the whole row with a full sort
(``_filtered_logprobs``, as an engine that sorts each row does; Loom did so before) and the
same inverse-CDF draw. Rows are logits shaped like a model's (normal(0, 2.5) plus a few
boosted tokens) or flat (normal(0, 2.5): the widest nucleus). Median ms per step (n rows);
both paths are checked to draw the same tokens with the same uniform numbers first.

    python bench/bench_sampler.py [--vocab 151936] [--n 1 8 64] [--repeats 7]
"""
from __future__ import annotations

import argparse

import torch

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)

from bench_attention import timed  # noqa: E402
from bench_generate import machine_info  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.sampler import _filtered_logprobs, pick, sample  # noqa: E402

SETTINGS = {  # (label, SamplingParams keywords)
    "T 0.6, top_p 0.95, top_k 20 (Qwen3 thinking)": dict(temperature=0.6, top_p=0.95, top_k=20),
    "T 0.7, top_p 0.8": dict(temperature=0.7, top_p=0.8),
    "top_k 20": dict(temperature=1.0, top_k=20),
    "min_p 0.05": dict(temperature=1.0, min_p=0.05),
}


def rows(n: int, vocab: int, peaked: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2.5
    if peaked:  # a few tokens well above the rest, as a model's next-token logits
        for r in range(n):
            x[r, torch.randint(vocab, (6,), generator=g)] += torch.tensor([12.0, 11.0, 10.0, 9.5, 9.0, 8.0])
    return x


def baseline(logits: torch.Tensor, p: SamplingParams, u: torch.Tensor) -> list[int]:
    """The whole-row path: each row filtered with a sort of the vocabulary, one draw each."""
    return pick(torch.stack([_filtered_logprobs(logits[r], p) for r in range(logits.shape[0])]).exp(), u)


def median_ms(fn, repeats: int) -> float:
    return timed(fn, repeats, warmup=1) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(machine_info())
    print(f"vocabulary {a.vocab:,}; median ms per step of n rows (speedup = sort / loom)")
    print(f"{'settings':<46} {'rows':<7} {'n':>4} {'sort ms':>9} {'loom ms':>9} {'speedup':>8}")
    for label, kw in SETTINGS.items():
        p = SamplingParams(**kw)
        for peaked in (True, False):
            for n in a.n:
                x = rows(n, a.vocab, peaked, seed=n)
                gens = [torch.Generator().manual_seed(i) for i in range(n)]
                u = torch.rand(n, generator=torch.Generator().manual_seed(n))
                got, _ = sample(x, [p] * n, [torch.Generator().manual_seed(i) for i in range(n)])
                want = baseline(x, p, torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(i))
                                                 for i in range(n)]))
                same = "" if got == want else "  (draws differ: see engine/sampler.py on rounding edges)"
                t_sort = median_ms(lambda: baseline(x, p, u), a.repeats)
                t_loom = median_ms(lambda: sample(x, [p] * n, gens), a.repeats)
                print(f"{label:<46} {'peaked' if peaked else 'flat':<7} {n:>4} {t_sort:>9.2f} {t_loom:>9.2f} "
                      f"{t_sort / t_loom:>7.1f}x{same}")


if __name__ == "__main__":
    main()
