"""Decode attention over a shared prompt on a GPU: Loom's Triton segment attention vs
flash-attn's paged ``flash_attn_with_kvcache`` vs PyTorch SDPA.

Each configuration: N threads share a prompt of P tokens and own O tokens each; one
decode query per thread. Methods:

  triton       segment attention over the paged pool (page 16): the prompt's K/V are
               read once for all N threads (one job), own segments one job each
  flash_paged  flash_attn_with_kvcache, page size 256 (its requirement), per-thread
               block tables naming the shared prompt pages: reads the prompt N times
  sdpa_concat  F.scaled_dot_product_attention on per-thread concatenated K/V [N, H, P+O, D]
               (the copy is made once, outside the timing)
  sdpa_shared  one SDPA call over all P + N*O tokens with a dense boolean mask

Reported: median ms over repeats (warm-up outside the timing), bytes of K/V (+ mask)
each method must read, and GB/s = bytes / time.

    python bench/bench_attention_gpu.py --device cuda [--dtype bfloat16] [--repeats 50]
    python bench/bench_attention_gpu.py --smoke   # CPU, Triton interpreter, tiny sizes:
                                                  # checks that every method agrees
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU under TRITON_INTERPRET=1; checks agreement only")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="float32: no flash_paged column (flash-attn takes 16-bit inputs only)")
    ap.add_argument("--quick", action="store_true",
                    help="three configurations (those of bench_attention.py --quick), 10 repeats")
    ap.add_argument("--threads", default="1,8,32")
    ap.add_argument("--prompt", default="1024,8192")
    ap.add_argument("--own", default="64,512")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FLASH_PAGE = 256  # flash_attn_with_kvcache's paged KV needs page_block_size % 256 == 0


class Setup:
    """K/V of one configuration, in every layout the methods need."""

    def __init__(self, N, P, O, Hq, Hkv, D, ps, dtype, device, seed):
        from engine.attention.plan import ThreadStep, build_plan_py
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.N, self.P, self.O, self.Hq, self.Hkv, self.D = N, P, O, Hq, Hkv, D
        self.scale = D ** -0.5
        self.elem = torch.empty((), dtype=dtype).element_size()
        # logical K/V: prompt [P, Hkv, D], own [N, O, Hkv, D]
        mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)
        self.kp, self.vp = mk(P, Hkv, D), mk(P, Hkv, D)
        self.ko, self.vo = mk(N, O, Hkv, D), mk(N, O, Hkv, D)
        self.q = mk(N, Hq, D)
        # Loom paged pool (page ps): prompt pages, then each thread's pages
        pp, po = -(-P // ps), -(-O // ps)
        total = pp + N * po
        self.k_pool = torch.zeros(total, ps, Hkv, D, dtype=dtype, device=device)
        self.v_pool = torch.zeros_like(self.k_pool)
        flat_k, flat_v = self.k_pool.view(-1, Hkv, D), self.v_pool.view(-1, Hkv, D)
        flat_k[:P], flat_v[:P] = self.kp, self.vp
        seg_pages, seg_len = {0: list(range(pp))}, {0: P}
        for i in range(N):
            first = pp + i * po
            flat_k[first * ps:first * ps + O], flat_v[first * ps:first * ps + O] = self.ko[i], self.vo[i]
            seg_pages[1 + i], seg_len[1 + i] = list(range(first, first + po)), O
        steps = [ThreadStep([(0, 0), (1 + i, 0)], 1 + i, 1) for i in range(N)]
        self.plan = build_plan_py(steps, seg_len, seg_pages).to(device)
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))

    # ---- methods -------------------------------------------------------------------------------
    def triton_fn(self):
        import triton_kernels as tk
        return lambda: tk.segment_attention(self.q, self.k_pool, self.v_pool, self.plan,
                                            self.inv_freq, self.scale)

    def triton_bytes(self):
        return 2 * (self.P + self.N * self.O) * self.Hkv * self.D * self.elem

    def flash_fn(self):
        if self.q.dtype not in (torch.float16, torch.bfloat16) or self.q.device.type != "cuda":
            return None
        try:
            from flash_attn import flash_attn_with_kvcache
            from triton_kernels.flash import flash_supported
        except Exception:
            return None
        if not flash_supported(self.q.device):  # (flash-attn 2: sm_8x and sm_90 only)
            return None
        N, P, O, Hkv, D = self.N, self.P, self.O, self.Hkv, self.D
        if P % FLASH_PAGE:
            return None
        pp, po = P // FLASH_PAGE, -(-O // FLASH_PAGE)
        kc = torch.zeros(pp + N * po, FLASH_PAGE, Hkv, D, dtype=self.q.dtype, device=self.q.device)
        vc = torch.zeros_like(kc)
        fk, fv = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
        fk[:P], fv[:P] = self.kp, self.vp
        table = torch.zeros(N, pp + po, dtype=torch.int32, device=self.q.device)
        for i in range(N):
            first = pp + i * po
            fk[first * FLASH_PAGE:first * FLASH_PAGE + O] = self.ko[i]
            fv[first * FLASH_PAGE:first * FLASH_PAGE + O] = self.vo[i]
            table[i, :pp] = torch.arange(pp)
            table[i, pp:] = torch.arange(first, first + po)
        seqlens = torch.full((N,), P + O, dtype=torch.int32, device=self.q.device)
        q = self.q[:, None]  # [N, 1, Hq, D]
        return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table,
                                               softmax_scale=self.scale, causal=True)[:, 0]

    def per_thread_bytes(self):
        return 2 * self.N * (self.P + self.O) * self.Hkv * self.D * self.elem

    def sdpa_concat_fn(self):
        N = self.N
        k = torch.cat([self.kp[None].expand(N, -1, -1, -1), self.ko], 1).transpose(1, 2).contiguous()
        v = torch.cat([self.vp[None].expand(N, -1, -1, -1), self.vo], 1).transpose(1, 2).contiguous()
        q = self.q[:, :, None]  # [N, Hq, 1, D]
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=self.scale,
                                                      enable_gqa=True)[:, :, 0]

    def sdpa_shared_fn(self):
        N, P, O = self.N, self.P, self.O
        k = torch.cat([self.kp, self.ko.reshape(N * O, self.Hkv, self.D)]).transpose(0, 1)[None]
        v = torch.cat([self.vp, self.vo.reshape(N * O, self.Hkv, self.D)]).transpose(0, 1)[None]
        k, v = k.contiguous(), v.contiguous()
        mask = torch.zeros(N, P + N * O, dtype=torch.bool, device=self.q.device)
        mask[:, :P] = True
        for i in range(N):
            mask[i, P + i * O:P + (i + 1) * O] = True
        q = self.q.transpose(0, 1)[None]  # [1, Hq, N, D]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None],
                                                      scale=self.scale, enable_gqa=True)[0].transpose(0, 1)

    def shared_bytes(self):
        toks = self.P + self.N * self.O
        return 2 * toks * self.Hkv * self.D * self.elem + self.N * toks  # + the bool mask


def time_ms(fn, repeats: int, device) -> float:
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def machine_info(device) -> str:
    import triton
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"triton {triton.__version__}"]
    try:
        import flash_attn
        parts.append(f"flash-attn {flash_attn.__version__}")
    except Exception:
        parts.append("flash-attn not installed")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        parts += [f"GPU {p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)",
                  f"CUDA {torch.version.cuda}"]
    else:
        parts.append(f"CPU {platform.processor() or platform.machine()} (Triton interpreter)")
    return ", ".join(parts)


def run(args) -> int:
    if args.smoke:
        device = torch.device("cpu")
        grid = [(n, p, o) for n in (1, 3) for p in (40,) for o in (5, 17)]
        Hq, Hkv, D, repeats = 4, 2, 64, 1
        dtype = torch.float16
    else:
        device = torch.device(args.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            print(f"bench_attention_gpu.py needs a CUDA GPU (device={args.device!r}, "
                  f"torch.cuda.is_available()={torch.cuda.is_available()}); nothing to measure. "
                  "Use --smoke to check the script on the CPU.", file=sys.stderr)
            return 2
        ints = lambda s: [int(x) for x in s.split(",")]
        grid = [(n, p, o) for n in ints(args.threads) for p in ints(args.prompt) for o in ints(args.own)]
        Hq, Hkv, D, repeats = args.heads, args.kv_heads, args.head_dim, args.repeats
        if args.quick:
            grid, repeats = [(1, 1024, 64), (8, 8192, 512), (32, 8192, 512)], 10
        dtype = getattr(torch, args.dtype)
    print(machine_info(device))
    print(f"decode: Hq={Hq} Hkv={Hkv} D={D} {str(dtype).replace('torch.', '')} page={args.page_size}; "
          "median ms over " + f"{repeats} runs")
    hdr = f"{'N':>3} {'prompt':>6} {'own':>4}  {'method':<12} {'ms':>8} {'MB read':>9} {'GB/s':>8}  {'max err':>8}"
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for N, P, O in grid:
        s = Setup(N, P, O, Hq, Hkv, D, args.page_size, dtype, device, args.seed)
        methods = [("triton", s.triton_fn(), s.triton_bytes()),
                   ("flash_paged", s.flash_fn(), s.per_thread_bytes()),
                   ("sdpa_concat", s.sdpa_concat_fn(), s.per_thread_bytes()),
                   ("sdpa_shared", s.sdpa_shared_fn(), s.shared_bytes())]
        ref = s.sdpa_concat_fn()().float()
        for name, fn, nbytes in methods:
            if fn is None:
                print(f"{N:>3} {P:>6} {O:>4}  {name:<12} {'n/a':>8}")
                continue
            err = (fn().float() - ref).abs().max().item()
            worst = max(worst, err) if name != "sdpa_concat" else worst
            ms = time_ms(fn, repeats, device)
            print(f"{N:>3} {P:>6} {O:>4}  {name:<12} {ms:>8.3f} {nbytes / 1e6:>9.2f} "
                  f"{nbytes / ms / 1e6:>8.1f}  {err:>8.1e}")
        del s
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if worst > 5e-2:
        print(f"methods disagree: max abs error {worst:.3g}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """The table for the arguments parsed at import (bench_attention.py --device cuda sets
    sys.argv before importing this module)."""
    return run(ARGS)


if __name__ == "__main__":
    sys.exit(main())
