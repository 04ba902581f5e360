"""Linear layers: Loom's packed-panel GEMM vs torch.nn.functional.linear, same run.

Shapes of the Qwen3-shaped benchmark model (hidden 512, heads 8x64, kv 4x64,
intermediate 1536, vocab 32768); rows M = 1 and 8 (decode), 33, 1024 (prefill).
Median of repeats; GB/s counts the weight bytes read once, GFLOP/s the FMAs. Each timed
call reads another copy of the weights, rotating through copies that add up to --cold-mb
(default 512 MB, past a server's last-level cache): the weights come from memory, as in a
decode step that streams every layer's. --cold-mb 0 times one copy over and over (from cache).

    python bench/bench_linear.py [--repeats 20] [--cold-mb 512]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)

from bench_generate import machine_info, read_bandwidth  # noqa: E402

SHAPES = {"qkv": (1024, 512), "o_proj": (512, 512), "gate_up": (3072, 512), "down": (512, 1536),
          "lm_head": (32768, 512)}


def median_time(fn, args: list, repeats: int) -> float:
    """Median time of ``fn(*args[i])``, i rotating through ``args`` (each call another copy)."""
    fn(*args[0])
    fn(*args[-1])
    ts = []
    for r in range(repeats):
        a = args[r % len(args)]
        t0 = time.perf_counter()
        fn(*a)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cold-mb", type=int, default=512,
                    help="rotate through weight copies adding up to this many MB (0: one copy, cache-hot)")
    a = ap.parse_args()
    import engine._ops  # noqa: F401  registers torch.ops.loom.*
    print(machine_info())
    print(f"read bandwidth: {read_bandwidth() / 1e9:.1f} GB/s")
    print(f"weights: {'one copy, from cache' if a.cold_mb == 0 else f'rotating through {a.cold_mb} MB of copies'}")
    print(f"{'layer':>8} {'M':>5} {'F.linear ms':>12} {'loom ms':>9} {'speedup':>8} "
          f"{'loom GB/s':>10} {'loom GFLOP/s':>13}")
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-a.cold_mb * 2**20 // (n * k * 4)))
        ws = [torch.randn(n, k) for _ in range(copies)]
        wps = [torch.ops.loom.pack_linear_weight(w) for w in ws]
        for M in (1, 8, 33, 1024):
            x = torch.randn(M, k)
            torch.testing.assert_close(torch.ops.loom.linear_packed(x, wps[-1], None, n), F.linear(x, ws[-1]),
                                       atol=1e-3, rtol=1e-4)
            t_ref = median_time(lambda w: F.linear(x, w), [(w,) for w in ws], max(a.repeats, copies))
            t = median_time(lambda wp: torch.ops.loom.linear_packed(x, wp, None, n), [(wp,) for wp in wps],
                            max(a.repeats, copies))
            print(f"{name:>8} {M:>5} {t_ref * 1e3:>12.3f} {t * 1e3:>9.3f} {t_ref / t:>7.2f}x "
                  f"{n * k * 4 / t / 1e9:>10.1f} {2 * M * n * k / t / 1e9:>13.1f}")
        del ws, wps


if __name__ == "__main__":
    main()
