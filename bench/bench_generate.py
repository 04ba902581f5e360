"""End-to-end generation: Loom vs Hugging Face transformers, in one run.

Same model in every engine: a random Qwen3-shaped one (~58M parameters), or with
``--model DIR`` a local Hugging Face checkpoint (Llama, Qwen2, Qwen3, Mistral;
safetensors), in float32 (``--dtype bfloat16``: bfloat16 in every engine). Same prompt
token ids (random ids of the model's vocabulary), same number of new tokens (sampling,
EOS ignored); n in {1, 8}. Loom prefills the prompt once for all n threads; transformers'
``generate(num_return_sequences=n)`` prefills it n times and keeps n caches.
llama.cpp (when ``llama-cpp-python`` and ``gguf`` are installed; see
bench/llamacpp_baseline.py) runs the same weights from a GGUF written in the run's dtype,
prefills once and shares the prompt's cache cells between its n sequences; it is run with
flash attention on (its CPU default) and off, and checked to compute the same next-token
distribution as Loom first.

    python bench/bench_generate.py [--model DIR] [--dtype float32] [--prompt-len 1024]
                                   [--new-tokens 64] [--n 1 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import _loom_path  # noqa: E402,F401  (which Loom: the checkout's, or an installed one)

from engine import LLM, SamplingParams  # noqa: E402
from engine.cache import kv_token_bytes  # noqa: E402
from engine.demo import make_random_model  # noqa: E402

MODEL = dict(hidden=512, layers=13, heads=8, kv_heads=4, head_dim=64, intermediate=1536,
             vocab_size=32768, tie_word_embeddings=True, max_pos=32768)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"cpu: {cpu} | cores: {os.cpu_count()} | torch threads: {torch.get_num_threads()} | "
            f"torch {torch.__version__} | python {platform.python_version()}")


def read_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Measured memory read bandwidth (bytes/s): a large float32 sum, median of repeats."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts)


def matmul_rate(m: int, k: int, n: int, repeats: int = 5, dtype=torch.float32) -> float:
    """FLOP/s of torch.mm on [m, k] x [k, n] in dtype, median of repeats."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts)


def prefill_flops(cfg, P: int) -> float:
    """Matmul FLOPs of prefilling P tokens: the layers' linears for every token, causal
    attention (token i reads i + 1 keys: QK and PV), the LM head for the last token only."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lin = L * (H * (qd + 2 * kvd) + qd * H + 3 * H * I)
    attn_keys = P * (P + 1) / 2
    return 2 * (P * lin + L * 2 * cfg.num_heads * cfg.head_dim * attn_keys + H * cfg.vocab_size)


def physical_limits(llm: LLM, prompt: list[int], n: int, new: int, repeats: int):
    """Loom's prefill against the matmul rate and its decode step against the
    bandwidth floor, measured in this run. This machine's speed drifts by 2x over
    minutes, so each prefill is paired with a torch.mm reading and each decode timing
    with a bandwidth reading taken just before it, and the ratios are reported per pair
    (median and range)."""
    cfg, P = llm.config, len(prompt)
    # Each prefill right after a same-shape torch.mm reading, as the decode steps below; a
    # 16-bit model against the faster of torch.mm in its dtype and in float32 (on a CPU
    # without 16-bit products torch.mm in bfloat16 runs at a fraction of float32's rate:
    # a prefill read 270% of it)
    dtypes = [llm.dtype] + ([torch.float32] if llm.dtype != torch.float32 else [])
    pre_pairs = []  # (torch.mm FLOP/s, prefill seconds)
    mm_dtype = {}
    for r in range(max(repeats, 3)):
        rates = {dt: matmul_rate(P, cfg.hidden_size, cfg.intermediate_size, repeats=3, dtype=dt) for dt in dtypes}
        best = max(rates, key=rates.get)
        mm_dtype[best] = mm_dtype.get(best, 0) + 1
        pre_pairs.append((rates[best], run_loom(llm, prompt, 1, 1, r)[0]))
    mm = statistics.median(m for m, _ in pre_pairs)
    pre = statistics.median(t for _, t in pre_pairs)
    pre_flops = prefill_flops(cfg, P)
    pre_ratios = sorted(pre_flops / t / m for m, t in pre_pairs)
    weights = llm.model.weight_bytes()
    kv_step = (P + n * new / 2) * llm.cache.bytes_per_token  # prompt once + own tokens, mid-run
    pairs = []  # (bandwidth, decode step)
    for r in range(max(repeats, 5)):
        bw = read_bandwidth(repeats=3)
        pairs.append((bw, decode_step(llm, prompt, n, new, 1)))
    ratios = sorted(step * bw / (weights + kv_step) for bw, step in pairs)
    bw = statistics.median(b for b, _ in pairs)
    step = statistics.median(s for _, s in pairs)
    print(f"machine: read bandwidth {bw / 1e9:.1f} GB/s (median of {len(pairs)} readings, "
          f"{min(b for b, _ in pairs) / 1e9:.1f}-{max(b for b, _ in pairs) / 1e9:.1f}) | torch.mm "
          f"[{P}x{cfg.hidden_size}]x[{cfg.hidden_size}x{cfg.intermediate_size}] "
          f"{' / '.join(f'{str(dt)[6:]} x{k}' for dt, k in mm_dtype.items())} (the faster dtype per reading) "
          f"{mm / 1e9:.0f} GFLOP/s (median of {len(pre_pairs)} readings, "
          f"{min(m for m, _ in pre_pairs) / 1e9:.0f}-{max(m for m, _ in pre_pairs) / 1e9:.0f})")
    print(f"prefill {P} tokens: {pre * 1e3:.0f} ms = {pre_flops / pre / 1e9:.0f} GFLOP/s: "
          f"{100 * statistics.median(pre_ratios):.0f}% of torch.mm, {100 * pre_ratios[0]:.0f}-"
          f"{100 * pre_ratios[-1]:.0f}% over {len(pre_ratios)} (torch.mm, prefill) pairs (goal >= 50%)")
    print(f"decode step (n={n}): {step * 1e3:.1f} ms vs floor {(weights + kv_step) / bw * 1e3:.1f} ms "
          f"(weights {weights / 2**20:.0f} MB + KV {kv_step / 2**20:.0f} MB at {bw / 1e9:.1f} GB/s): "
          f"{statistics.median(ratios):.2f}x the floor, {ratios[0]:.2f}-{ratios[-1]:.2f} over "
          f"{len(ratios)} (bandwidth, step) pairs (goal <= 1.5x)")


def run_loom(llm: LLM, prompt: list[int], n: int, new: int, seed: int):
    p = SamplingParams(n=n, temperature=1.0, max_tokens=new, ignore_eos=True, seed=seed)
    t0 = time.perf_counter()
    out = llm.generate([prompt], p)[0]
    dt = time.perf_counter() - t0
    assert all(len(c.token_ids) == new for c in out.outputs)
    page_bytes = llm.cache.page_size * llm.cache.bytes_per_token
    return dt, out.metrics.kv_pages_peak * page_bytes


def decode_step(llm: LLM, prompt: list[int], n: int, steps: int, repeats: int) -> float:
    """Seconds of one decode step of n threads over the prompt, timed apart from the
    prefill: a session prefills and samples a first token, then ``steps`` more are timed."""
    ts = []
    for r in range(repeats):
        with llm.session(prompt) as s:
            kids = s.fork(s.root, [""] * n)
            s.generate(kids, SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True, seed=r))
            t0 = time.perf_counter()
            s.generate(kids, SamplingParams(temperature=1.0, max_tokens=steps, ignore_eos=True, seed=r))
            ts.append((time.perf_counter() - t0) / steps)
    return statistics.median(ts)


def run_llama(runner, kv_token: int, prompt: list[int], n: int, new: int, seed: int):
    steps: list[float] = []
    t0 = time.perf_counter()
    out = runner.generate(prompt, n, new, seed, steps)
    dt = time.perf_counter() - t0
    assert all(len(o) == new for o in out)
    cells = len(prompt) + n * (new - 1)  # unified cache: the prompt once, then n rows per step
    # its decode step as Loom's (decode_step): the mean over the run's steps, whose median
    # over runs is reported (a median over steps left its slow steps out)
    return dt, cells * kv_token, sum(steps) / len(steps)


def start_llama(model_dir: str, gguf_path: str, dtype: str, cfg, prompt_len: int, n_max: int, new: int,
                mode: str):
    """{row name: (LlamaCppRunner, its K/V bytes per token)} for llama.cpp with flash
    attention on and off, or {} (saying why) when it is not installed or not wanted."""
    if mode == "off":
        return {}
    import llamacpp_baseline as lb
    why = lb.available()
    if why is not None:
        if mode == "on":
            raise SystemExit(f"--llama-cpp on: {why}")
        print(f"llama.cpp: skipped, {why}")
        return {}
    runners = {}
    try:
        path = lb.write_gguf(model_dir, gguf_path, dtype)
        for name, fa in (("llama.cpp", True), ("llama.cpp -fa off", False)):
            r = lb.LlamaCppRunner(path, n_ctx=prompt_len + n_max * new + 16, n_seq=n_max,
                                  n_threads=torch.get_num_threads(), flash_attn=fa)
            kv_dtype = torch.float16 if r.kv_elem_bytes == 2 else torch.float32
            runners[name] = (r, kv_token_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype))
    except (AttributeError, RuntimeError, ValueError) as e:  # another llama-cpp-python API, a model
        for r, _ in runners.values():                        # llama.cpp cannot take as written
            r.close()
        if mode == "on":
            raise
        print(f"llama.cpp: skipped, could not set it up ({type(e).__name__}: {e}); this script "
              f"was written against llama-cpp-python 0.3.36")
        return {}
    return runners


def check_same_model(llm: LLM, runners: dict, prompt: list[int]):
    """llama.cpp's next-token log-probs after the prompt's first 512 tokens against Loom's,
    within the rounding of the run's dtype (llama.cpp keeps its K/V in float16), and Loom's
    most likely token among llama.cpp's three most likely. (512: score() returns every
    position's log-probs, 5 GB for an 8k prompt at a 150k vocabulary.)"""
    prompt = prompt[:512]
    ref = llm.score(prompt)[0][-1].float()  # log-probs
    tol = 5e-3 if llm.dtype == torch.float32 else 5e-2
    for name, (r, _) in runners.items():
        got = torch.from_numpy(r.prefill_logits(prompt)).log_softmax(-1)
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        top = ref.argmax().item() in got.topk(3).indices.tolist()
        print(f"{name}: next-token log-probs after {len(prompt)} prompt tokens vs Loom's: max |diff| / max |log-prob| "
              f"= {err:.1e} (limit {tol:g}), Loom's top token in its top 3: {top}")
        if err > tol or not top:
            raise SystemExit(f"{name} does not compute the same model as Loom (GGUF export bug?)")


def run_hf(hf, cfg, prompt: list[int], n: int, new: int, seed: int):
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    from transformers import GenerationConfig
    # an explicit config: a checkpoint's generation_config.json (top_p, top_k, repetition
    # penalty of instruct models) would otherwise filter every step, as Loom and llama.cpp do not
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                           repetition_penalty=1.0, max_new_tokens=new, min_new_tokens=new,
                           num_return_sequences=n, pad_token_id=0)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    dt = time.perf_counter() - t0
    assert out.shape == (n, len(prompt) + new)
    # DynamicCache: n sequences of (prompt + new - 1) tokens, K and V, every layer, in the
    # dtype transformers runs (the checkpoint's is float32; --dtype bfloat16 halves it).
    kv = n * (len(prompt) + new - 1) * kv_token_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                       hf.dtype)
    return dt, kv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--model", help="a local Hugging Face checkpoint directory (Llama / Qwen2 / Qwen3 / "
                                    "Mistral, safetensors) instead of the random Qwen3-shaped model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's weights and activations, in every engine")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="Loom's KV cache: auto (the model's, --dtype) or, with a float32 model, "
                         "bfloat16 / float16")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--limits", action="store_true", help="also compare with the machine's limits")
    ap.add_argument("--llama-cpp", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp rows: when installed (auto), required (on) or skipped (off)")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(machine_info())
    with tempfile.TemporaryDirectory() as d:
        model_dir = a.model or make_random_model(d, **MODEL)
        llm = LLM(model_dir, attention_backend=a.backend, seed=0, dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype)
        elem = torch.empty(0, dtype=llm.dtype).element_size()
        nparams = (llm.model.weight_bytes() // elem + (0 if llm.config.tie_word_embeddings
                                                       else llm.model.embed.numel()))
        what = (f"{a.model} ({llm.config.architecture})" if a.model else "Qwen3-shaped random")
        print(f"model: {what}, {nparams / 1e6:.1f}M params, {a.dtype} | "
              f"loom backend: {llm.attention_backend}, KV cache {str(llm.kv_cache_dtype).removeprefix('torch.')} | prompt {a.prompt_len} tokens, "
              f"{a.new_tokens} new tokens per sequence, median of {a.repeats}")
        hf = None
        if not a.no_hf:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=llm.dtype).eval()
        prompt = torch.randint(0, llm.config.vocab_size, (a.prompt_len,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        llama = start_llama(model_dir, os.path.join(d, f"model-{a.dtype}.gguf"), a.dtype, llm.config,
                            a.prompt_len, max(a.n), a.new_tokens, a.llama_cpp)
        if llama:
            check_same_model(llm, llama, prompt)
        base_name = "transformers" if hf is not None else "loom"
        print(f"{'n':>3} {'engine':>17} {'median s':>9} {'tok/s':>8} {'peak KV MB':>11} "
              f"{'speedup vs ' + base_name:>24} {'decode ms/step':>15}")
        for n in a.n:
            run_loom(llm, prompt[:32], n, 4, 0)  # warm-ups: every engine once, on a short prompt
            if hf is not None:
                run_hf(hf, llm.config, prompt[:32], n, 4, 0)
            for r, kv_token in llama.values():
                run_llama(r, kv_token, prompt[:32], n, 4, 0)
            rows = {}
            lt = [run_loom(llm, prompt, n, a.new_tokens, r) for r in range(a.repeats)]
            rows["loom"] = (statistics.median(t for t, _ in lt), lt[0][1])
            step = {"loom": decode_step(llm, prompt, n, a.new_tokens, a.repeats)}
            if hf is not None:
                ht = [run_hf(hf, llm.config, prompt, n, a.new_tokens, r) for r in range(a.repeats)]
                rows["transformers"] = (statistics.median(t for t, _ in ht), ht[0][1])
            for name, (r, kv_token) in llama.items():
                runs = [run_llama(r, kv_token, prompt, n, a.new_tokens, s) for s in range(a.repeats)]
                rows[name] = (statistics.median(t for t, _, _ in runs), runs[0][1])
                step[name] = statistics.median(st for _, _, st in runs)
            base = rows[base_name][0]
            for name, (t, kv) in rows.items():
                tps = n * a.new_tokens / t
                st = f"{step[name] * 1e3:.2f}" if name in step else "-"
                print(f"{n:>3} {name:>17} {t:>9.3f} {tps:>8.1f} {kv / 2**20:>11.1f} {base / t:>23.2f}x {st:>15}")
            sys.stdout.flush()
        for r, _ in llama.values():
            r.close()
        if a.limits:
            physical_limits(llm, prompt, max(a.n), a.new_tokens, a.repeats)


if __name__ == "__main__":
    main()
