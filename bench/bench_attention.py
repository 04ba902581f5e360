"""Decode attention over a shared prompt: Loom's CPU op against what engines without
sharing do, plus the C++ plan builder.

N threads share one prompt of `shared` tokens and each has `own` tokens of its own;
every thread decodes one query. Qwen3-like heads (Hq=16, Hkv=8, D=128), float32 (or
--dtype bfloat16: q, K/V and every method in bfloat16), pages of 16 tokens. Methods (one aligned line per configuration):

  loom        torch.ops.loom.segment_attention (cpu): the prompt's K/V read once
  torch       the reference backend (engine/attention/reference.py)
  sdpa/thr    F.scaled_dot_product_attention, batched over threads, each thread's K/V
              concatenated (prompt copy + own tokens; built outside the timing)
  sdpa+mask   one SDPA call over all tokens once, with a dense boolean mask

Bytes = K/V bytes the method must read at least (plus the mask); GB/s = bytes / time;
GFLOP/s = the QK and PV multiply-adds over the time. This machine's speed drifts by up to
2x within minutes (a shared VM), so every timed run of every method follows a probe: one
read of a 512 MB buffer (its bandwidth; it also evicts the caches, so that K/V come from
memory as in a model's decode step), then, for loom, one 1024^3 torch.mm (the arithmetic
rate), then one call of the same method on a 16-token case (its code back in cache, as
in a step). %bw = the median over loom's runs of its GB/s over the read bandwidth taken
just before; %roof = the same median of the roofline time max(bytes / read bandwidth,
FLOPs / matmul peak) over loom's time, the peak (measured at start) scaled by that
torch.mm's rate against its rate at start (100% = as fast as this machine allows at
that moment, whichever of memory or arithmetic binds). need = the share of that scaled
peak which the row's FLOPs would take to run in the time of 50% of the read bandwidth
(above ~80%, 50% of bandwidth is out of reach on this machine's arithmetic: the row is
compute-bound). The peak is torch.mm's rate (in bfloat16 the float32 one where that is
higher: a CPU without bfloat16 products, where Loom widens to float32); in bfloat16
Loom's AMX tiles can beat it, so there %roof can pass 100% and need overstates. speedup = sdpa/thr time over loom
time (mostly the bytes each reads: sharing), vs mask = sdpa+mask time over loom time
(both read the prompt once); both from each run's time times the read bandwidth measured
just before it (the methods run minutes apart; the host's memory speed drifts). Times: median over --repeats after warm-up. A line after the table counts the rows
at >= 50% of read bandwidth and lists the others with their %roof and need; then each of those
rows is timed again in turn with its two parts alone (its shared prompt with one own token per
thread, and its own tokens over a 16-token prompt), against the peak at start and the read bandwidth,
and against its time if arithmetic and memory did not overlap at all (every FLOP at that peak,
then every byte at the read bandwidth; bench/overlap_probe.cpp measures how far one core overlaps them).

    python bench/bench_attention.py [--repeats 10] [--quick]
    python bench/bench_attention.py --device cuda [...]   # the GPU table: Triton vs flash-attn
                                                          # vs SDPA (bench_attention_gpu.py)
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)

from engine import _ops  # noqa: E402
from engine.attention.plan import ThreadStep, build_plan_py  # noqa: E402
from engine.attention.reference import segment_attention_torch  # noqa: E402

HQ, HKV, D, PAGE = 16, 8, 128, 16
SCALE = D ** -0.5


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(repeats: int, dtype=torch.float32) -> float:
    """Best matmul rate (GFLOP/s) measured here in dtype: torch.mm on 2048^3 and (float32)
    Loom's packed GEMM on [1024 x 512] x [512 x 1536]."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = 2 * 2048 ** 3 / timed(lambda: torch.mm(a, b), repeats)
    if dtype == torch.float32 and hasattr(torch.ops.loom, "linear_packed"):
        x, wp = torch.randn(1024, 512), torch.ops.loom.pack_linear_weight(torch.randn(1536, 512))
        best = max(best, 2 * 1024 * 512 * 1536 / timed(lambda: torch.ops.loom.linear_packed(x, wp, None, 1536),
                                                          repeats))
    return best / 1e9


class MachineProbe:
    """The machine's speed now: read() = GB/s of one sum of a 512 MB buffer (which also
    evicts the caches), mm() = GFLOP/s of one [1024 x 1024]^2 torch.mm in dtype."""

    def __init__(self, dtype=torch.float32):
        self.x = torch.ones(128 * 1024 * 1024)
        self.a, self.b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)

    def read(self) -> float:
        t = time.perf_counter()
        self.x.sum()
        return self.x.numel() * 4 / (time.perf_counter() - t) / 1e9

    def mm(self) -> float:
        t = time.perf_counter()
        torch.mm(self.a, self.b)
        return 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9

    def both(self) -> tuple[float, float]:
        return self.read(), self.mm()


def machine_bandwidth(repeats: int, probe: MachineProbe) -> tuple[float, float]:
    """(read GB/s of a 512 MB sum, copy GB/s counting read + write of a 256 MB copy)."""
    probe.read()
    read = statistics.median(probe.read() for _ in range(repeats))
    src, dst = probe.x[: 64 * 1024 * 1024], torch.empty(64 * 1024 * 1024)
    copy = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), repeats)
    return read, copy / 1e9


def timed_paired(fn, repeats: int, before, rewarm, warmup: int = 2) -> tuple[list[float], list]:
    """fn's wall times (s), each run just after a call of `before` (a probe that evicts the
    caches) and one of `rewarm` (the same method on a tiny case: its code and Python
    objects back in cache, as in a model's step, where only the K/V come cold from
    memory; without it a 16-token call takes 0.16 ms instead of 0.03): both lists."""
    for _ in range(warmup):
        fn()
    times, samples = [], []
    for _ in range(repeats):
        samples.append(before())
        rewarm()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, samples


class Case:
    """Pools, plan and per-method inputs of one configuration."""

    def __init__(self, n: int, shared: int, own: int, seed: int = 0, dtype=torch.float32, loom_only: bool = False):
        g = torch.Generator().manual_seed(seed)
        seg_len = {0: shared, **{i + 1: own for i in range(n)}}
        n_pages = sum(-(-L // PAGE) for L in seg_len.values())
        order = list(range(n_pages))
        random.Random(seed).shuffle(order)  # pages scattered over the pool, as in a live cache
        seg_pages, i = {}, 0
        for s, L in seg_len.items():
            k = -(-L // PAGE)
            seg_pages[s] = order[i:i + k]
            i += k
        self.plan = build_plan_py([ThreadStep([(0, 0), (t + 1, 0)], t + 1, 1) for t in range(n)], seg_len,
                                  seg_pages)
        self.k_pool = torch.randn(n_pages, PAGE, HKV, D, generator=g).to(dtype)
        self.v_pool = torch.randn(n_pages, PAGE, HKV, D, generator=g).to(dtype)
        self.q = torch.randn(n, HQ, D, generator=g).to(dtype)
        # (16-bit: outputs peak at ~0.1-0.2 here; a kernel that dropped each thread's own
        # tokens would be off by ~0.01, one that dropped a quarter of the prompt by ~0.04)
        self.tol = 1e-4 if dtype == torch.float32 else 3e-3
        self.inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2).float() / D)

        def tokens(pool, s):  # [L, Hkv, D] of segment s
            return pool[seg_pages[s]].reshape(-1, HKV, D)[: seg_len[s]]

        self.n, self.shared, self.own = n, shared, own
        kv_bytes = HKV * D * self.k_pool.element_size() * 2
        self.unique_bytes = (shared + n * own) * kv_bytes
        self.per_thread_bytes = n * (shared + own) * kv_bytes
        self.flops = 4 * HQ * D * n * (shared + own)  # QK and PV multiply-adds (x2) of every query
        if loom_only:  # (no inputs for the other methods)
            return
        # sdpa/thr: [N, Hkv, S+O, D] per-thread copies
        k_s, v_s = tokens(self.k_pool, 0), tokens(self.v_pool, 0)
        self.k_thr = torch.stack([torch.cat([k_s, tokens(self.k_pool, t + 1)]) for t in range(n)]).transpose(1, 2)
        self.v_thr = torch.stack([torch.cat([v_s, tokens(self.v_pool, t + 1)]) for t in range(n)]).transpose(1, 2)
        self.k_thr, self.v_thr = self.k_thr.contiguous(), self.v_thr.contiguous()
        self.q_thr = self.q[:, :, None, :]  # [N, Hq, 1, D]
        # sdpa+mask: all tokens once [1, Hkv, S + N*O, D], mask [1, 1, N, S + N*O]
        self.k_all = torch.cat([k_s] + [tokens(self.k_pool, t + 1) for t in range(n)]).transpose(0, 1)[None]
        self.v_all = torch.cat([v_s] + [tokens(self.v_pool, t + 1) for t in range(n)]).transpose(0, 1)[None]
        self.k_all, self.v_all = self.k_all.contiguous(), self.v_all.contiguous()
        mask = torch.zeros(n, shared + n * own, dtype=torch.bool)
        mask[:, :shared] = True
        for t in range(n):
            mask[t, shared + t * own: shared + (t + 1) * own] = True
        self.mask = mask[None, None]
        self.q_all = self.q.transpose(0, 1)[None]  # [1, Hq, N, D]
        self.mask_bytes = self.unique_bytes + self.mask.numel()

    def loom(self):
        return _ops.segment_attention_cpu(self.q, self.k_pool, self.v_pool, self.plan, self.inv_freq, SCALE)

    def torch_ref(self):
        return segment_attention_torch(self.q, self.k_pool, self.v_pool, self.plan, self.inv_freq, SCALE)

    def sdpa_threads(self):
        return F.scaled_dot_product_attention(self.q_thr, self.k_thr, self.v_thr, scale=SCALE, enable_gqa=True)

    def sdpa_mask(self):
        return F.scaled_dot_product_attention(self.q_all, self.k_all, self.v_all, attn_mask=self.mask, scale=SCALE,
                                              enable_gqa=True)

    def check(self):
        """All four agree (a benchmark of wrong answers is worthless)."""
        ref = self.torch_ref()
        for name, out in (("loom", self.loom()), ("sdpa/thr", self.sdpa_threads()[:, :, 0]),
                          ("sdpa+mask", self.sdpa_mask()[0].transpose(0, 1))):
            err = (out.float() - ref.float()).abs().max().item()
            assert err < self.tol, f"{name} differs from the reference by {err}"


def bench_plan_builder(repeats: int) -> str:
    """1,000 threads, each viewing 49 shared segments (random shifts) + its own."""
    rng = random.Random(0)
    n_threads, n_shared = 1000, 200
    seg_len = {s: rng.randint(1, 500) for s in range(n_shared + n_threads)}
    seg_pages, nxt = {}, 0
    for s, L in seg_len.items():
        seg_pages[s] = list(range(nxt, nxt + -(-L // PAGE)))
        nxt += len(seg_pages[s])
    threads = []
    for t in range(n_threads):
        own = n_shared + t
        view = [(s, rng.randint(-50, 50)) for s in rng.sample(range(n_shared), 49)] + [(own, 0)]
        threads.append(ThreadStep(view, own, 1))
    # the array entry point: what the C++ op itself costs
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    indptr = [0]
    for th in threads:
        indptr.append(indptr[-1] + len(th.view))
    page_indptr = [0]
    for s in range(len(seg_len)):
        page_indptr.append(page_indptr[-1] + len(seg_pages[s]))
    arrays = (i32(indptr), i32([s for th in threads for s, _ in th.view]),
              i32([x for th in threads for _, x in th.view]), i32([th.own for th in threads]),
              i32([th.num_new for th in threads]), i32([seg_len[s] for s in range(len(seg_len))]),
              i32(page_indptr), i32([p for s in range(len(seg_len)) for p in seg_pages[s]]))
    # The first calls of a process also fault in the pages of the plan's new arrays (they
    # take ~2x longer here); a runner building a plan every step sees the steady state.
    t0 = time.perf_counter()
    _ops.build_plan_arrays(*arrays)
    t_first = time.perf_counter() - t0
    t_op = timed(lambda: _ops.build_plan_arrays(*arrays), max(repeats, 100), warmup=20)
    t_cpp = timed(lambda: _ops.build_plan_cpp(threads, seg_len, seg_pages), max(repeats, 5))
    t_py = timed(lambda: build_plan_py(threads, seg_len, seg_pages), 3, warmup=1)
    t_run, t_run_first = runner_plan(threads, seg_len, repeats)
    return (f"plan builder, 1,000 threads x 50-segment views (50,000 entries): C++ op {t_op * 1e3:.3f} ms "
            f"(first call {t_first * 1e3:.2f} ms) | the engine's step plan (ModelRunner: flat arrays "
            f"from the threads' views, Python included) {t_run * 1e3:.2f} ms, {t_run_first * 1e3:.1f} ms "
            f"in a step after every view changed | from ThreadStep lists {t_cpp * 1e3:.2f} ms | "
            f"build_plan_py {t_py * 1e3:.1f} ms")


def runner_plan(threads, seg_len, repeats: int) -> tuple[float, float]:
    """The same threads as live engine objects (segments in a KVCache, views as the engine
    keeps them): seconds of ModelRunner's step plan, steady and in a step after every view
    was reassigned."""
    from engine import LLM
    from engine.demo import make_random_model
    from engine.step import StepBatch, StepItem

    with tempfile.TemporaryDirectory() as d:
        make_random_model(d, hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=64)
        total = sum(seg_len.values())
        llm = LLM(d, kv_cache_tokens=total + 16 * len(seg_len), page_size=PAGE)
    segs = {}
    for sid in sorted(seg_len):
        segs[sid] = llm.cache.new_segment(0)
        llm.cache.append_slots(segs[sid], seg_len[sid])
    def new_batch():  # every view a new tuple, as after every thread's view was reassigned
        return StepBatch([StepItem(segs[th.own], [1], tuple((segs[s], sh) for s, sh in th.view))
                          for th in threads])
    run = llm.runner._plan_flat
    fresh = [new_batch() for _ in range(6)]
    t_first = timed(lambda: run(fresh.pop()), 5, warmup=1)
    batch = new_batch()
    return timed(lambda: run(batch), max(repeats, 20), warmup=3), t_first


def bench_prefill(repeats: int, dtype=torch.float32) -> str:
    """One thread prefilling 1,024 tokens into its own segment (causal), 8 heads, D=128."""
    T, H = 1024, 8
    g = torch.Generator().manual_seed(1)
    seg_pages = {0: list(range(T // PAGE))}
    plan = build_plan_py([ThreadStep([(0, 0)], 0, T)], {0: T}, seg_pages)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k_pool = torch.randn(T // PAGE, PAGE, H, D, generator=g).to(dtype)
    v_pool = torch.randn(T // PAGE, PAGE, H, D, generator=g).to(dtype)
    qs, ks, vs = q.transpose(0, 1)[None], k_pool.reshape(T, H, D).transpose(0, 1)[None], \
        v_pool.reshape(T, H, D).transpose(0, 1)[None]
    t_loom = timed(lambda: _ops.segment_attention_cpu(q, k_pool, v_pool, plan, None, SCALE), repeats)
    t_ref = timed(lambda: segment_attention_torch(q, k_pool, v_pool, plan, None, SCALE), max(3, repeats // 3))
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=SCALE), repeats)
    flops = 4 * H * D * T * (T + 1) / 2  # QK and PV over the causal half
    return (f"prefill 1,024 rows x 1,024 keys causal, 8 heads, D=128, {str(dtype)[6:]}: loom {t_loom * 1e3:.1f} ms "
            f"({flops / t_loom / 1e9:.0f} GFLOP/s) | torch {t_ref * 1e3:.1f} ms | "
            f"sdpa causal (contiguous K/V) {t_sdpa * 1e3:.1f} ms")


def row_label(n: int, s: int, o: int) -> str:
    return f"N={n} x {s // 1024}k+{o}"


def parts_line(n: int, s: int, o: int, dtype, probe: MachineProbe, tiny: Case, repeats: int, peak: float) -> str:
    """A row against its shared prompt's and its own tokens' times alone: the three timed in
    turn, each from memory as in the table (in turn: this machine's speed drifts)."""
    cases = {"whole": Case(n, s, o, dtype=dtype, loom_only=True), "shared": Case(n, s, 1, dtype=dtype, loom_only=True),
             "own": Case(n, 16, o, dtype=dtype, loom_only=True)}
    times, bws = {k: [] for k in cases}, []
    for c in cases.values():
        c.loom()
    for r in range(max(repeats, 3)):
        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            t, bw = timed_paired(cases[k].loom, 1, probe.read, tiny.loom, warmup=0)
            times[k] += t
            bws += bw
    t_w, t_s, t_o = (statistics.median(times[k]) for k in cases)
    bw = statistics.median(bws)
    flops, own_bytes = cases["shared"].flops, cases["own"].unique_bytes
    # no overlap at all: every FLOP at the peak, then every byte at the read bandwidth
    serial = cases["whole"].flops / (peak * 1e9) + cases["whole"].unique_bytes / (bw * 1e9)
    return (f"{row_label(n, s, o)}: {t_w * 1e3:.2f} ms; shared prompt alone {t_s * 1e3:.2f} ms ({flops / t_s / 1e9:.0f} "
            f"GFLOP/s, {100 * flops / t_s / 1e9 / peak:.0f}% of the peak), own tokens alone {t_o * 1e3:.2f} ms "
            f"({own_bytes / t_o / 1e9:.1f} GB/s, {100 * own_bytes / t_o / 1e9 / bw:.0f}% of read bandwidth); "
            f"sum {(t_s + t_o) * 1e3:.2f} ms; the row takes {t_w / serial:.2f}x its time without overlap "
            f"(its FLOPs at the peak, then its bytes at the read bandwidth: {serial * 1e3:.2f} ms)")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu")
    dev, rest = pre.parse_known_args()
    if dev.device != "cpu":  # the GPU table lives in its own script, same arguments
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        sys.argv = [sys.argv[0], "--device", dev.device, *rest]
        import bench_attention_gpu  # parses sys.argv on import
        sys.exit(bench_attention_gpu.main())
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (this table) or cuda (bench_attention_gpu.py)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per method (median reported; default 10, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="of q, K/V and every method (bfloat16: the amx build's tiles where the CPU has them)")
    args = ap.parse_args()
    repeats = args.repeats if args.repeats is not None else 3 if args.quick else 10
    torch.manual_seed(0)

    dtype = getattr(torch, args.dtype)
    peak, peak_dtype = matmul_peak(repeats, dtype), dtype
    if dtype != torch.float32:
        # On a CPU without bfloat16 products torch.mm in bfloat16 is slow, and Loom's
        # kernels widen to float32 there: the float32 peak is the arithmetic limit then.
        peak32 = matmul_peak(repeats, torch.float32)
        if peak32 > peak:
            peak, peak_dtype = peak32, torch.float32
    probe = MachineProbe(peak_dtype)
    read_bw, copy_bw = machine_bandwidth(repeats, probe)
    probe.mm()
    # the probe's rate when peak was taken, measured as in the timed runs: after a read
    mm_ref = statistics.median(probe.both()[1] for _ in range(repeats))
    print(f"cpu: {cpu_model()} | cores: {os.cpu_count()} | torch threads: {torch.get_num_threads()} | "
          f"torch {torch.__version__} | loom kernel: {_ops.cpu_isa()}")
    print(f"measured bandwidth: read {read_bw:.1f} GB/s (sum of 512 MB), copy {copy_bw:.1f} GB/s "
          f"(read + write of 256 MB)")
    slow16 = peak_dtype != dtype
    print(f"measured {str(peak_dtype)[6:]} matmul peak: {peak:.0f} GFLOP/s (torch.mm 2048^3"
          f"{' and loom' + chr(39) + 's GEMM' if peak_dtype == torch.float32 else ''}"
          f"{'; faster here than torch.mm in ' + args.dtype if slow16 else ''}; scaled per run by a 1024^3 "
          f"torch.mm just before it: {mm_ref:.0f} GFLOP/s now)")
    print(f"decode, Hq={HQ} Hkv={HKV} D={D} {args.dtype}, page {PAGE}; ms = median of {repeats}; "
          f"MB = K/V bytes the method must read")
    configs = [(n, s, o) for n in (1, 8, 32) for s in (1024, 8192) for o in (64, 512)]
    if args.quick:
        configs = [(1, 1024, 64), (8, 8192, 512), (32, 8192, 512)]
    head = (f"{'N':>3} {'shared':>6} {'own':>4} | {'loom ms':>8} {'MB':>6} {'GB/s':>5} {'%bw':>4} "
            f"{'GFLOP/s':>7} {'%roof':>5} {'need':>5} | "
            f"{'torch ms':>8} | {'sdpa/thr ms':>11} {'MB':>6} {'GB/s':>5} | {'sdpa+mask ms':>12} {'GB/s':>5} | "
            f"{'speedup':>7} {'vs mask':>7}")
    print(head)
    print("-" * len(head))
    below = []  # rows under 50% of read bandwidth: (config, %bw, %roof, need)
    tiny = Case(1, 16, 1, dtype=dtype)  # re-warms each method's code after the probe
    for n, s, o in configs:
        case = Case(n, s, o, dtype=dtype)
        case.check()
        def cold(method: str, reps: int, before=probe.read, warmup: int = 2):
            """case.<method>'s times and probe samples, each run from memory (see the top)."""
            return timed_paired(getattr(case, method), reps, before, getattr(tiny, method), warmup)

        loom_times, speeds = cold("loom", repeats, before=probe.both)
        t_loom = statistics.median(loom_times)
        t_ref = statistics.median(cold("torch_ref", max(3, repeats // 3), warmup=1)[0])
        thr_times, thr_bw = cold("sdpa_threads", repeats)
        mask_times, mask_bw = cold("sdpa_mask", max(3, repeats // 3), warmup=1)
        t_thr, t_mask = statistics.median(thr_times), statistics.median(mask_times)
        # speedups from times scaled by the read bandwidth measured just before each run: the
        # methods run minutes apart, and this host's memory speed drifts in between
        scaled = lambda ts, bws: statistics.median(t * b for t, b in zip(ts, bws))  # noqa: E731
        s_loom = scaled(loom_times, [b for b, _ in speeds])
        speedup, vs_mask = scaled(thr_times, thr_bw) / s_loom, scaled(mask_times, mask_bw) / s_loom
        gbs = case.unique_bytes / t_loom / 1e9
        flops = case.flops
        pct_bw = statistics.median(case.unique_bytes / t / 1e9 / bw for t, (bw, _) in zip(loom_times, speeds))
        pct_roof = statistics.median(
            max(case.unique_bytes / (bw * 1e9), flops / (peak * mm / mm_ref * 1e9)) / t
            for t, (bw, mm) in zip(loom_times, speeds))
        need = statistics.median(  # time at the scaled peak / time at 50% of the read bandwidth
            flops / (peak * mm / mm_ref * 1e9) / (case.unique_bytes / (0.5 * bw * 1e9)) for bw, mm in speeds)
        print(f"{n:>3} {s:>6} {o:>4} | {t_loom * 1e3:>8.2f} {case.unique_bytes / 1e6:>6.0f} {gbs:>5.1f} "
              f"{100 * pct_bw:>3.0f}% {flops / t_loom / 1e9:>7.0f} {100 * pct_roof:>4.0f}% {100 * need:>4.0f}% | "
              f"{t_ref * 1e3:>8.2f} | {t_thr * 1e3:>11.2f} "
              f"{case.per_thread_bytes / 1e6:>6.0f} {case.per_thread_bytes / t_thr / 1e9:>5.1f} | "
              f"{t_mask * 1e3:>12.2f} {case.mask_bytes / t_mask / 1e9:>5.1f} | {speedup:>6.1f}x "
              f"{vs_mask:>6.1f}x")
        if pct_bw < 0.5:
            below.append(((n, s, o), pct_bw, pct_roof, need))
        del case
    print(f"rows at >= 50% of read bandwidth: {len(configs) - len(below)} of {len(configs)}"
          + ("" if not below else "; below: " + ", ".join(
              f"{row_label(*c)} {100 * b:.0f}% ({100 * r:.0f}% of its roofline, need {100 * nd:.0f}%"
              f"{': arithmetic-bound' if nd > 0.8 else ''})" for c, b, r, nd in below)))
    if below:
        print("the rows below, timed again in turn with their two parts alone (the shared prompt with one own "
              "token per thread; the own tokens over a 16-token prompt), each from memory:")
        for c, *_ in below:
            print("  " + parts_line(*c, dtype, probe, tiny, repeats, peak))
    print(bench_prefill(repeats, dtype))
    print(bench_plan_builder(repeats))


if __name__ == "__main__":
    main()
