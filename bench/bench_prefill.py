"""Long-prompt prefill: one forward pass vs chunks of ``max_forward_tokens``, in one run.

Same random Qwen3-shaped model as bench_generate.py (~58M parameters, float32), one
prompt of --prompt-len tokens, prefilled by ``generate(max_tokens=1)`` with the prompt
in one pass and in chunks of each --chunks size. For each: median seconds (the methods
alternate, so host drift hits them alike) and the peak memory the call adds beyond the
model and its KV cache (the process's resident high-water mark during the call, after
freed heap memory is given back; Linux only).

    python bench/bench_prefill.py [--prompt-len 8192] [--chunks 2048 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import ctypes
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
from engine.cache import kv_token_bytes  # noqa: E402
from engine.demo import make_random_model  # noqa: E402


def _status(field: str) -> float | None:
    """A /proc/self/status field in MB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mb(fn) -> float | None:
    """Resident memory added at the peak of ``fn()`` (MB), or None if it cannot be read."""
    _trim()
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    fn()
    peak = _status("VmHWM")
    return None if base is None or peak is None else peak - base


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(machine_info())
    with tempfile.TemporaryDirectory() as d:
        make_random_model(d, **MODEL)
        P = a.prompt_len
        # One engine per method over one model directory; each cache holds just the prompt, and
        # a first prefill touches all of its pages, so that the peaks below count temporaries.
        llms = {f"one pass ({P})": LLM(d, seed=0, kv_cache_tokens=P + 64, max_forward_tokens=P)}
        for c in a.chunks:
            llms[f"chunks of {c}"] = LLM(d, seed=0, kv_cache_tokens=P + 64, max_forward_tokens=c)
        prompt = torch.randint(0, MODEL["vocab_size"], (P,), generator=torch.Generator().manual_seed(1)).tolist()
        p = SamplingParams(max_tokens=1, temperature=0)
        first = {}
        for name, llm in llms.items():
            first[name] = llm.generate([prompt], p)[0].outputs[0].token_ids
        c = llms[next(iter(llms))].config
        kv = kv_token_bytes(c.num_layers, c.num_kv_heads, c.head_dim, torch.float32) * P
        print(f"model: Qwen3-shaped random, float32 | prompt {P} tokens, median of {a.repeats} | "
              f"the prompt's K/V {kv / 2**20:.0f} MB")
        times = {n: [] for n in llms}
        peaks = {}
        for r in range(a.repeats):
            for name, llm in llms.items():
                t0 = time.perf_counter()
                peak = peak_mb(lambda: llm.generate([prompt], p))
                times[name].append(time.perf_counter() - t0)
                peaks[name] = peak if name not in peaks or peak is None else max(peaks[name], peak)
        one = statistics.median(times[next(iter(llms))])
        print(f"{'method':>18} {'median s':>9} {'vs one pass':>12} {'peak MB beyond model+KV':>24} {'token':>7}")
        for name in llms:
            t = statistics.median(times[name])
            pk = "n/a" if peaks[name] is None else f"{peaks[name]:.0f}"
            print(f"{name:>18} {t:>9.3f} {t / one:>11.3f}x {pk:>24} {first[name][0]:>7}")
        same = len({tuple(v) for v in first.values()}) == 1
        print(f"same first token from every method: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
