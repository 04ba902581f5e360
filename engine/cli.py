"""``loom`` command line: ``loom generate`` and ``loom demo``."""
from __future__ import annotations

import argparse
import os
import platform
import sys

from .runner import DEFAULT_MAX_FORWARD_TOKENS


# --protocol NAME -> how to build it from the command's arguments (engine.protocols)
PROTOCOLS = {
    "sampling": lambda p, a: p.ParallelSampling(**_given(select=a.select)),
    "multiverse": lambda p, a: p.Multiverse(),
    "threadweaver": lambda p, a: p.ThreadWeaver(),
    "parallel-r1": lambda p, a: p.ParallelR1(**_given(num_paths=a.paths)),
    "parathinker": lambda p, a: p.ParaThinker(**_given(paths=a.paths)),
    "hogwild": lambda p, a: p.Hogwild(**_given(workers=a.workers), **({"collab_prompt": None}
                                                                      if a.no_collab_prompt else {})),
}
# the protocols each protocol option applies to
PROTOCOL_OPTIONS = {"select": ("sampling",), "paths": ("parallel-r1", "parathinker"), "workers": ("hogwild",),
                    "no_collab_prompt": ("hogwild",)}


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _protocol(a):
    """The protocol --protocol names, built with its options; None without --protocol."""
    for opt, names in PROTOCOL_OPTIONS.items():
        if getattr(a, opt) is not None and a.protocol not in names:
            raise ValueError(f"--{opt.replace('_', '-')} applies to --protocol {' / '.join(names)}, not to "
                             f"{'--protocol ' + a.protocol if a.protocol else 'plain sampling'}.")
    if a.protocol is None:
        return None
    from . import protocols
    return PROTOCOLS[a.protocol](protocols, a)


def _json_object(text: str | None) -> dict | None:
    if text is None:
        return None
    import json
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # (nested too deeply: json's parser recurses)
        obj = e
    if not isinstance(obj, dict):
        raise ValueError(f"--chat-template-kwargs {text!r:.80} must be a JSON object, e.g. "
                         "'{\"enable_thinking\": false}'.")
    return obj


def _print_outputs(outs, show_tokens: bool = False, streamed: bool = False):
    for out in outs:
        m = out.metrics
        for c in out.outputs:
            if not streamed:  # (else its header and text are out already)
                print(f"--- completion {c.index}")
                print(c.text)
            print(f"--- end of completion {c.index} ({c.finish_reason}, {len(c.token_ids)} tokens)")
            if c.answer is not None:
                print(f"answer: {c.answer}")
            if c.metrics:  # a protocol's run: its tree / workers
                print("protocol: " + " ".join(f"{k}={v}" for k, v in c.metrics.items()) +
                      f" events={len(c.events or [])}")
            if show_tokens:
                print(f"token ids: {c.token_ids}")
        shared = f" shared_prompt_tokens={m.shared_prompt_tokens}" if m.shared_prompt_tokens else ""
        print(f"=== metrics: forward_steps={m.forward_steps} generated_tokens={m.generated_tokens} "
              f"kv_pages_peak={m.kv_pages_peak}{shared} wall_s={m.wall_s:.3f} "
              f"tokens/s={m.generated_tokens / max(m.wall_s, 1e-9):.1f}")


def _cmd_generate(a) -> int:
    stream = None
    try:
        from . import LLM, SamplingParams
        params = SamplingParams(n=a.n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                                max_tokens=a.max_tokens, min_tokens=a.min_tokens, seed=a.seed, stop=a.stop or None,
                                ignore_eos=a.ignore_eos,
                                presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                                repetition_penalty=a.repetition_penalty)
        llm = LLM(a.model, device=a.device, dtype=a.dtype, kv_cache_tokens=a.kv_cache_tokens, page_size=a.page_size,
                  attention_backend=a.attention_backend, seed=None if a.seed == -1 else a.seed,  # (-1: none, as vLLM)
                  kv_cache_dtype=a.kv_cache_dtype,
                  max_forward_tokens=a.max_forward_tokens)
        if not a.prompt and sys.stdin.isatty():
            print("loom: reading the prompt from standard input (end it with Ctrl-D), or pass --prompt",
                  file=sys.stderr)
        prompts = a.prompt or [sys.stdin.read()]
        protocol = _protocol(a)
        # one completion of plain sampling: its text printed as it is generated
        if len(prompts) == 1 and a.n == 1 and a.protocol in (None, "sampling") and a.select in (None, "all"):
            stream = _stream_printer()
        if a.chat or a.system is not None or a.chat_template_kwargs is not None:
            # each prompt: a user message, in the model's chat template
            system = [] if a.system is None else [{"role": "system", "content": a.system}]
            outs = llm.chat([system + [{"role": "user", "content": p}] for p in prompts], params,
                            protocol=protocol, chat_template_kwargs=_json_object(a.chat_template_kwargs),
                            stream=stream)
        else:
            outs = llm.generate(prompts, params, protocol=protocol, stream=stream)
    except BrokenPipeError:
        raise  # (main: the reader of our streamed output has gone)
    except (ValueError, OSError, FloatingPointError) as e:  # (OSError: FileNotFoundError, ...; FloatingPointError:
        if stream is not None and stream.started:                 # the model's logits are NaN / inf)
            print()  # (the streamed text's end)
        print(f"loom: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2
    if stream is not None:
        if not stream.started:
            print("--- completion 0", flush=True)
        print()  # (the text's end)
    _print_outputs(outs, streamed=stream is not None)
    return 0


class _stream_printer:
    """generate(stream=...) for the command line: the completion's header, then its text as
    it comes."""
    def __init__(self):
        self.started = False

    def __call__(self, i, j, piece):
        if not self.started:
            print("--- completion 0", flush=True)
            self.started = True
        print(piece, end="", flush=True)


MAX_DEMO_PROBLEMS = 10_000


def _cmd_demo(a) -> int:
    if not 1 <= a.problems <= MAX_DEMO_PROBLEMS:
        print(f"loom: error: --problems must be between 1 and {MAX_DEMO_PROBLEMS:,}.", file=sys.stderr)
        return 2
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    try:
        from .demo_run import run_demo
        run_demo(a.problems, a.seed, live=False if a.plain else None)
    except BrokenPipeError:
        raise  # (main: the reader of our output has gone)
    except (ValueError, OSError) as e:  # e.g. a bad LOOM_CPU_ISA, a missing demo model file
        print(f"loom: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loom", description="Loom parallel decoding engine")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{generate,demo}")
    g = sub.add_parser("generate", help="generate completions from a local Hugging Face model")
    g.add_argument("--model", required=True, help="local model directory (config.json, *.safetensors)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable; default: stdin)")
    g.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered by the model's chat template")
    g.add_argument("--system", help="a system message before each prompt (implies --chat)")
    g.add_argument("--chat-template-kwargs", metavar="JSON",
                   help="more variables for the chat template (implies --chat), e.g. '{\"enable_thinking\": false}'")
    g.add_argument("-n", type=int, default=1, help="completions per prompt (threads; default 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="default 1.0: off")
    g.add_argument("--top-k", type=int, default=-1, help="default -1: off")
    g.add_argument("--min-p", type=float, default=0.0, help="default 0: off")
    g.add_argument("--max-tokens", type=int, default=128, help="per completion (default 128)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="no end-of-sequence, stop token or stop string before this many tokens (default 0)")
    g.add_argument("--ignore-eos", action="store_true", help="sample on past end-of-sequence tokens")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="default 0: off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="default 0: off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1: off")
    g.add_argument("--seed", type=int, default=None, help="default none (-1 too)")
    g.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (the Triton kernels)")
    g.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    g.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="default 2 GiB of K/V or 262,144 tokens, whichever is fewer (and on the CPU at most half "
                        "the available memory)")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model's dtype), or bfloat16 / float16 for a float32 model")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    g.add_argument("--attention-backend", default="auto", help="auto, cpu, torch or triton (default auto)")
    g.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="run the threads by a protocol (engine.protocols): n samples with a vote (sampling, "
                        "-n and --select), model-written fork / join (multiverse, threadweaver, parallel-r1 "
                        "and parathinker with --paths), collaborating workers (hogwild, --workers)")
    g.add_argument("--select", help="sampling: all (default), first_finish or majority (on the last \\boxed{} "
                                    "answer)")
    g.add_argument("--paths", type=int, help="parallel-r1 / parathinker: paths per fork (default 2 / 4)")
    g.add_argument("--workers", type=int, help="hogwild: workers (default 2)")
    g.add_argument("--no-collab-prompt", action="store_const", const=True, default=None,
                   help="hogwild: the prompt as it is, without the collaboration instructions put around it")
    g.add_argument("--max-forward-tokens", type=int, default=DEFAULT_MAX_FORWARD_TOKENS,
                   help=f"tokens per forward pass; a longer prompt is prefilled in chunks (default "
                        f"{DEFAULT_MAX_FORWARD_TOKENS})")
    g.set_defaults(fn=_cmd_generate)
    d = sub.add_parser("demo", help="the shipped demo model solves problems with fork/join threads")
    d.add_argument("--problems", type=int, default=5, help="fresh problems, solved together (as the cache allows)")
    d.add_argument("--seed", type=int, default=0, help="draws the problems")
    d.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    d.set_defaults(fn=_cmd_demo)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # (bare `loom`: the commands, not argparse's complaint)
        ap.print_help(sys.stderr)
        return 2
    args = ap.parse_args(argv)
    out, errors = sys.stdout, getattr(sys.stdout, "errors", None)
    if hasattr(out, "reconfigure"):
        # (the model's text on an output that cannot encode all of it, e.g. a pipe in a latin-1 locale:
        # those characters as escapes; a UnicodeEncodeError ended the command, a traceback or the
        # streamed text cut off, after the whole generation). Put back at the end: main() called
        # from Python leaves the process's stdout as it found it.
        out.reconfigure(errors="backslashreplace")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\nloom: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The output's reader closed it (`loom demo | head`): stop quietly, as other CLIs do;
        # stdout goes to /dev/null so that Python's flush at exit does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        if hasattr(out, "reconfigure") and errors is not None:
            try:
                out.reconfigure(errors=errors)
            except (ValueError, OSError):  # (closed)
                pass


if __name__ == "__main__":
    sys.exit(main())
