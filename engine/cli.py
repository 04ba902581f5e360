"""``loom`` command line: ``loom generate`` and ``loom demo``."""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time


def _print_outputs(outs, show_tokens: bool = False):
    for out in outs:
        m = out.metrics
        for c in out.outputs:
            print(f"--- completion {c.index} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print(c.text)
            if show_tokens:
                print(f"token ids: {c.token_ids}")
        print(f"=== metrics: forward_steps={m.forward_steps} generated_tokens={m.generated_tokens} "
              f"kv_pages_peak={m.kv_pages_peak} wall_s={m.wall_s:.3f} "
              f"tokens/s={m.generated_tokens / max(m.wall_s, 1e-9):.1f}")


def _cmd_generate(a) -> int:
    from . import LLM, SamplingParams
    try:
        params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                max_tokens=a.max_tokens, seed=a.seed, stop=a.stop or None)
        llm = LLM(a.model, dtype=a.dtype, kv_cache_tokens=a.kv_cache_tokens, page_size=a.page_size,
                  attention_backend=a.attention_backend, seed=a.seed)
        prompts = a.prompt or [sys.stdin.read()]
        outs = llm.generate(prompts, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    _print_outputs(outs)
    return 0


def _cmd_demo(a) -> int:
    from . import LLM, SamplingParams
    from .demo import make_random_model
    print("loom demo: a tiny RANDOM-WEIGHT Qwen3-shaped model built on the fly (no trained demo "
          "model ships yet), so the text is gibberish; what it shows is the engine: n threads "
          "sampled from one shared prompt in one batched forward pass per step.")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as d:
        make_random_model(d, seed=a.seed)
        llm = LLM(d, seed=a.seed)
        prompt = "Loom runs many reasoning threads over one shared KV cache. " * 4
        params = SamplingParams(n=a.n, temperature=0.8, max_tokens=a.max_tokens, ignore_eos=True,
                                seed=a.seed)
        t0 = time.perf_counter()
        out = llm.generate(prompt, params)[0]
        wall = time.perf_counter() - t0
        for c in out.outputs:
            print(f"[thread {c.index}] {c.text!r}")
        m = out.metrics
        prompt_pages = llm.cache.pages_for(len(out.prompt_token_ids))
        print(f"attention backend: {llm.attention_backend}")
        print(f"threads: {a.n}, prompt tokens: {len(out.prompt_token_ids)} (prefilled once, "
              f"{prompt_pages} pages shared by all threads)")
        print(f"forward steps: {m.forward_steps} (one thread at a time would take "
              f"{a.n * m.forward_steps}); kv pages peak: {m.kv_pages_peak}")
        print(f"generated tokens: {m.generated_tokens} in {wall:.2f}s = "
              f"{m.generated_tokens / wall:.1f} tokens/s")
        print(f"pages in use after generate: {llm.cache_stats()['pages_used']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loom", description="Loom parallel decoding engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate completions from a local Hugging Face model")
    g.add_argument("--model", required=True, help="local model directory (config.json, *.safetensors)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable; default: stdin)")
    g.add_argument("-n", type=int, default=1, help="completions per prompt (threads)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--attention-backend", default="auto")
    g.set_defaults(fn=_cmd_generate)
    d = sub.add_parser("demo", help="run the built-in demo")
    d.add_argument("-n", type=int, default=4)
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
