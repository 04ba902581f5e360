"""The ``loom`` command line, run in-process (engine.cli.main) on a random tiny model."""
from __future__ import annotations

import io
import os
import re

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cli import main

NAME = "qwen3"


@pytest.fixture(scope="module")
def model(model_dir):
    return model_dir(NAME)


def completions(text: str) -> list[tuple[str, int, str]]:
    """(finish reason, token count, text) of each completion the command printed, with the
    lines after its end (answer, protocol)."""
    found = re.findall(r"^--- completion (\d+)\n(.*?)\n--- end of completion \1 \((\w+), (\d+) tokens\)\n"
                       r"(.*?)(?=^--- completion |^=== metrics)", text, flags=re.M | re.S)
    return [(reason, int(n), body + ("\n" + after.rstrip("\n") if after.strip() else ""))
            for _, body, reason, n, after in found]


def test_generate_prints_what_the_api_returns(model, capsys):
    prompt = "Once upon a time"
    assert main(["generate", "--model", model, "--prompt", prompt, "-n", "2", "--temperature", "0.9",
                 "--max-tokens", "7", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    got = completions(out)
    want = LLM(model).generate([prompt], SamplingParams(n=2, temperature=0.9, max_tokens=7, seed=3))[0].outputs
    assert [(r, n, t) for r, n, t in got] == [(c.finish_reason, len(c.token_ids), c.text) for c in want], out
    assert re.search(r"=== metrics: forward_steps=\d+ generated_tokens=\d+ kv_pages_peak=\d+", out), out


def test_generate_prints_a_shared_prompt_prefix(model, capsys):
    """Prompts that begin alike: each request's metrics line says how many of its prompt's
    tokens it read from the prefix written once."""
    head = "a preamble every prompt of this call begins with, long enough to share. "
    args = ["generate", "--model", model, "--max-tokens", "3", "--temperature", "0",
            "--prompt", head + "One", "--prompt", head + "Two", "--prompt", "Alone"]
    assert main(args) == 0
    out = capsys.readouterr().out
    shared = [int(m) if m else 0 for m in re.findall(r"^=== metrics: .*?kv_pages_peak=\d+(?: shared_prompt_tokens=(\d+))? wall_s",
                                                   out, flags=re.M)]
    assert len(shared) == 3 and shared[0] == shared[1] >= 16 and shared[2] == 0, out


def test_generate_in_chunked_passes_prints_the_same(model, capsys):
    prompt = "a prompt of more tokens than one pass takes " * 3
    args = ["generate", "--model", model, "--prompt", prompt, "--max-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--max-forward-tokens", "4"]) == 0
    assert completions(capsys.readouterr().out) == completions(one) != []


def test_generate_reads_stdin(model, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a prompt from a pipe"))
    assert main(["generate", "--model", model, "--max-tokens", "3", "--temperature", "0"]) == 0
    want = LLM(model).generate(["a prompt from a pipe"], SamplingParams(max_tokens=3, temperature=0))
    assert completions(capsys.readouterr().out)[0][2] == want[0].outputs[0].text


def test_generate_chat_prints_what_the_api_returns(model, capsys):
    """--chat / --system: each prompt as a user message (after a system one) in the model's
    chat template, as LLM.chat; with a protocol too."""
    from engine import protocols as P
    llm = LLM(model)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    for extra, conv, proto in (
            (["--chat"], [{"role": "user", "content": "hi"}], None),
            (["--system", "be brief"], [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
             None),
            (["--chat", "--protocol", "multiverse"], [{"role": "user", "content": "hi"}], P.Multiverse()),
            (["--chat-template-kwargs", '{"x": 1}'], [{"role": "user", "content": "hi"}], None)):
        assert main(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "6", "--temperature", "0",
                     *extra]) == 0
        got = completions(capsys.readouterr().out)
        want = llm.chat(conv, greedy, protocol=proto)[0].outputs
        plain = llm.generate(["hi"], greedy, protocol=proto)[0].outputs
        assert want[0].token_ids != plain[0].token_ids or want[0].text != plain[0].text  # (the template counts)
        assert [(r, n, t.split("\nprotocol: ")[0]) for r, n, t in got] == \
            [(c.finish_reason, len(c.token_ids), c.text) for c in want]


def test_generate_chat_template_kwargs_reach_the_template(model, capsys, monkeypatch):
    from engine.tokenizer import Tokenizer
    seen, render = [], Tokenizer.apply_chat_template

    def spy(self, messages, add_generation_prompt=True, chat_template_kwargs=None, **kw):
        seen.append(chat_template_kwargs)
        return render(self, messages, add_generation_prompt, chat_template_kwargs, **kw)
    monkeypatch.setattr(Tokenizer, "apply_chat_template", spy)
    assert main(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "2",
                 "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert seen == [{"enable_thinking": False}]


def test_generate_chat_without_a_template(model_dir, capsys):
    path = model_dir("mistral")
    capsys.readouterr()
    assert main(["generate", "--model", path, "--prompt", "x", "--chat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom: error: This model has no chat template") and "without --chat" in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("proto,args", [
    ("sampling", ["-n", "3", "--select", "majority"]), ("multiverse", []), ("parallel-r1", ["--paths", "3"]),
    ("hogwild", ["--workers", "3"]),
])
def test_generate_with_a_protocol_prints_what_the_api_returns(model, capsys, proto, args):
    from engine import protocols as P
    want_proto = {"sampling": lambda: P.ParallelSampling(select="majority"), "multiverse": P.Multiverse,
                  "parallel-r1": lambda: P.ParallelR1(num_paths=3), "hogwild": lambda: P.Hogwild(workers=3)}[proto]()
    n = 3 if proto == "sampling" else 1
    assert main(["generate", "--model", model, "--prompt", "2+2=", "--max-tokens", "6", "--temperature", "0",
                 "--protocol", proto, *args]) == 0
    out = capsys.readouterr().out
    want = LLM(model).generate(["2+2="], SamplingParams(n=n, max_tokens=6, temperature=0), protocol=want_proto)
    got = completions(out)
    assert [(r, k) for r, k, _ in got] == [(c.finish_reason, len(c.token_ids)) for c in want[0].outputs], out
    assert [t.split("\nanswer: ")[0].split("\nprotocol: ")[0] for _, _, t in got] == \
        [c.text for c in want[0].outputs], out
    if proto == "sampling":  # (a random model writes no \\boxed{} answer: none printed)
        ans = want[0].outputs[0].answer
        assert (f"answer: {ans}" in out) if ans is not None else ("answer:" not in out), out
    else:
        m = want[0].outputs[0].metrics
        assert f"protocol: {' '.join(f'{k}={v}' for k, v in m.items())} events=" in out, out


@pytest.fixture
def api_calls(monkeypatch):
    """What the command passed to LLM(...) and to generate / chat: {"llm": kwargs, "params":
    SamplingParams, "how": "generate" | "chat"} (the real calls run underneath)."""
    seen = {}
    init, generate, chat = LLM.__init__, LLM.generate, LLM.chat

    def spy_init(self, *args, **kw):
        seen["llm"] = kw
        init(self, *args, **kw)

    def spy_generate(self, prompts, params=None, *args, **kw):
        seen.setdefault("how", "generate")
        seen["params"] = params
        return generate(self, prompts, params, *args, **kw)

    def spy_chat(self, *args, **kw):
        seen["how"] = "chat"
        return chat(self, *args, **kw)
    monkeypatch.setattr(LLM, "__init__", spy_init)
    monkeypatch.setattr(LLM, "generate", spy_generate)
    monkeypatch.setattr(LLM, "chat", spy_chat)
    return seen


def test_every_flag_reaches_the_api(model, capsys, api_calls):
    """Each sampling and engine flag is passed on with its value (a flag parsed and dropped
    shows nowhere else: a random model's output looks the same), and with no flags the
    command's defaults are the ones its help states."""
    assert main(["generate", "--model", model, "--prompt", "hi", "-n", "2", "--temperature", "0.7", "--top-p", "0.9",
                 "--top-k", "5", "--min-p", "0.05", "--max-tokens", "4", "--min-tokens", "2", "--ignore-eos",
                 "--stop", "zz", "--stop", "yy", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
                 "--repetition-penalty", "1.1", "--seed", "7", "--dtype", "float32", "--kv-cache-tokens", "2048",
                 "--kv-cache-dtype", "bfloat16", "--page-size", "8", "--attention-backend", "torch",
                 "--max-forward-tokens", "64"]) == 0
    assert api_calls["params"] == SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, max_tokens=4, min_tokens=2, ignore_eos=True,
        stop=["zz", "yy"], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1, seed=7)
    assert api_calls["llm"] == dict(device="cpu", dtype="float32", kv_cache_tokens=2048, kv_cache_dtype="bfloat16",
                                    page_size=8, attention_backend="torch", seed=7, max_forward_tokens=64)
    assert [(r, n) for r, n, _ in completions(capsys.readouterr().out)] == [("length", 4)] * 2
    api_calls.clear()
    assert main(["generate", "--model", model, "--prompt", "hi", "--seed", "-1", "--temperature", "0"]) == 0
    assert api_calls["params"] == SamplingParams(max_tokens=128, temperature=0.0)  # (--help: default 128)
    assert api_calls["llm"]["seed"] is None and api_calls["how"] == "generate"  # (--seed -1: none, as vLLM)
    api_calls.clear()
    assert main(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "2", "--system", ""]) == 0
    assert api_calls["how"] == "chat"  # (an empty system message is still one)


def test_answers_are_printed_and_bad_logits_exit_1(model, capsys, monkeypatch):
    """An extracted answer gets its line (a random model writes no \\boxed{}: one is planted);
    logits that are not finite end the command with status 1 (the model's fault, not the
    arguments': those are 2) and one line."""
    generate = LLM.generate

    def planted(self, *args, **kw):
        outs = generate(self, *args, **kw)
        outs[0].outputs[0].answer = "42"
        return outs
    monkeypatch.setattr(LLM, "generate", planted)
    assert main(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "2", "-n", "2",
                 "--protocol", "sampling", "--select", "majority"]) == 0
    got = completions(capsys.readouterr().out)
    assert got[0][2].endswith("\nanswer: 42") and "answer:" not in got[1][2], got

    def non_finite(self, *args, **kw):
        raise FloatingPointError("The model's logits are not finite (NaN or inf) in batch rows [0]")
    monkeypatch.setattr(LLM, "generate", non_finite)
    assert main(["generate", "--model", model, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == "loom: error: The model's logits are not finite (NaN or inf) in batch rows [0]\n", err


@pytest.mark.parametrize("args,message", [
    (["--paths", "3"], "--paths applies to --protocol parallel-r1 / parathinker, not to plain sampling"),
    (["--protocol", "multiverse", "--workers", "2"],
     "--workers applies to --protocol hogwild, not to --protocol multiverse"),
    (["--protocol", "multiverse", "--no-collab-prompt"],
     "--no-collab-prompt applies to --protocol hogwild, not to --protocol multiverse"),
    (["--protocol", "hogwild", "--workers", "300"],  # (the collaboration prompt lists 300 names)
     "with the text Hogwild puts around it, but the model's context is 2048"),
    (["--protocol", "hogwild", "--workers", "300"], "loom generate --no-collab-prompt, leaves the prompt as it is"),
    (["--protocol", "sampling", "--select", "best"], "select='best' must be one of"),
    (["--protocol", "parathinker", "--paths", "0"], "paths=0 must be an integer >= 1"),

    (["-n", "0"], "SamplingParams.n=0 is invalid"),
    (["--temperature", "-1"], "SamplingParams.temperature=-1.0 is invalid"),
    (["--min-p", "2"], "SamplingParams.min_p=2.0 is invalid"),
    (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs '[1]' must be a JSON object"),
    (["--chat-template-kwargs", "{bad"], "--chat-template-kwargs '{bad' must be a JSON object"),
    (["--chat-template-kwargs", "[" * 100_000 + "]" * 100_000], "must be a JSON object"),  # (a RecursionError)
    (["--dtype", "float8"], "dtype='float8' is not supported"),
    (["--page-size", "0"], "page_size=0 must be an integer >= 1"),
    (["--kv-cache-tokens", "4"], "kv_cache_tokens=4 must be an integer >= page_size"),
    (["--attention-backend", "flash"], "attention_backend='flash' is not available"),
    (["--device", "tpu"], "device='tpu' is not supported"),
    (["--max-forward-tokens", "0"], "max_forward_tokens=0 must be an integer >= 1"),
    (["--repetition-penalty", "0"], "SamplingParams.repetition_penalty=0.0 is invalid"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "torch sees no CUDA device")]))
def test_generate_errors_exit_2_with_one_line(model, capsys, args, message):
    assert main(["generate", "--model", model, "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom: error: ") and message in err and err.count("\n") == 1, err


def test_hogwild_without_its_collaboration_prompt(model, capsys, monkeypatch):
    """--no-collab-prompt is Hogwild(collab_prompt=None) (the error for a prompt that the
    collaboration text makes too long named only that Python argument: the CLI had no way)."""
    from engine import LLM
    seen = []
    real = LLM.generate

    def spy(self, prompts, params=None, *args, protocol=None, **kw):
        seen.append(protocol.collab_prompt)
        return real(self, prompts, params, *args, protocol=protocol, **kw)
    monkeypatch.setattr(LLM, "generate", spy)
    for flag in ([], ["--no-collab-prompt"]):
        assert main(["generate", "--model", model, "--prompt", "hi", "--protocol", "hogwild", "--max-tokens", "3",
                     *flag]) == 0
    assert seen[0] and seen[1] is None, seen


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for opt, default in (("--max-tokens", "128"), ("--temperature", "1.0"), ("--page-size", "16"),
                         ("--top-k", "-1"), ("--kv-cache-tokens", "2 GiB"), ("-n", "1"),
                         ("--max-forward-tokens", "2048")):
        assert re.search(rf"{opt} \S+\s+[^-]*default {re.escape(default)}", out), (opt, out)


def test_bare_loom_and_python_m_engine_show_the_commands():
    """`loom` alone prints the help (it said 'the following arguments are required: cmd'),
    and `python -m engine` is the loom command (it had no __main__)."""
    import subprocess
    import sys
    for argv in ([sys.executable, "-m", "engine"], [sys.executable, "-m", "engine.cli"]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "{generate,demo}" in p.stderr and "generate completions" in p.stderr, p
        assert "Traceback" not in p.stderr and "cmd" not in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "engine", "generate", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--max-tokens" in p.stdout, p


def test_missing_model_dir(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_interrupt_exits_130(model, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(LLM, "generate", interrupted)
    assert main(["generate", "--model", model, "--prompt", "x"]) == 130
    assert "loom: interrupted" in capsys.readouterr().err


def test_demo_one_problem(capsys):
    assert main(["demo", "--problems", "1", "--plain", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^accuracy\s+\d/1\s+\d/1", out, flags=re.M), out
    for bad in ("0", "10001"):
        assert main(["demo", "--problems", bad]) == 2
        assert "--problems must be between 1 and 10,000" in capsys.readouterr().err


def test_demo_problems_by_seed():
    """A negative seed draws its own problems (random.Random takes an int seed's absolute value)."""
    from engine.demo_task import make_problems
    nums = lambda seed: [p.prompt for p in make_problems(4, seed)]  # noqa: E731
    assert nums(5) == nums(5) and nums(5) != nums(-5) and nums(-5) == nums(-5)


def _loom(args, env_extra=None, **kw):
    import os
    import subprocess
    import sys
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_demo_bad_kernel_build_setting_is_one_line():
    """A bad LOOM_CPU_ISA (read when the kernels load): one line and exit 2, no traceback."""
    p = _loom(["demo", "--problems", "1", "--plain"], {"LOOM_CPU_ISA": "bogus"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, (out, err)
    assert err.startswith("loom: error: LOOM_CPU_ISA='bogus'") and "Traceback" not in err, err


def test_output_closed_by_its_reader_exits_quietly():
    """`loom demo | head -1`: the reader closes the pipe; the command stops without a
    BrokenPipeError traceback."""
    p = _loom(["demo", "--problems", "2", "--plain"])
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=300)
    assert first.startswith("machine:"), first
    assert p.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_streamed_output_closed_by_its_reader_is_not_an_error(model, monkeypatch, capsys):
    """`loom generate ... | head -1` while the completion streams: the streaming printer's
    BrokenPipeError reaches main's quiet handler (it was reported as 'loom: error: [Errno 32]
    Broken pipe', exit 2)."""
    import engine.cli as cli

    def closed(self, i, j, piece):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli._stream_printer, "__call__", closed)
    args = cli.build_parser().parse_args(["generate", "--model", model, "--prompt", "x", "--max-tokens", "5"])
    with pytest.raises(BrokenPipeError):
        cli._cmd_generate(args)
    assert "loom: error" not in capsys.readouterr().err


@pytest.mark.parametrize("n", ["1", "2"])  # (streamed, printed at the end)
def test_text_an_output_cannot_encode_is_printed_escaped(tmp_path, monkeypatch, n):
    """An output whose encoding cannot write every character of the text (a pipe in a latin-1
    locale; here U+FFFD and CJK from a byte tokenizer's random model): those characters are
    printed as escapes. A UnicodeEncodeError ended the command: a traceback after the whole
    generation, or, streamed, 'loom: error: ...' and the text cut off."""
    from engine.demo import make_random_model
    d = make_random_model(str(tmp_path / "bytes"), hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                          intermediate=64)
    sp = SamplingParams(n=int(n), temperature=1.5, max_tokens=12, seed=0)
    want = LLM(d).generate(["x"], sp)[0].outputs
    assert any(max(map(ord, c.text), default=0) > 0xFF for c in want)  # (latin-1 cannot write them)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="latin-1")
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", "--model", d, "--prompt", "x", "-n", n, "--temperature", "1.5",
                 "--max-tokens", "12", "--seed", "0"]) == 0
    out.flush()
    got = completions(raw.getvalue().decode("latin-1"))
    assert [t for _, _, t in got] == [c.text.encode("latin-1", "backslashreplace").decode("latin-1") for c in want]
    assert out.errors == "strict"  # (main() called from Python leaves stdout's error handler as it was)


def test_interrupt_while_the_command_loads_exits_130_quietly():
    """A Ctrl-C in the ~2 s the `loom` command spends importing torch (before its own
    handler runs) ends it as one later would: 'loom: interrupted', exit 130, no traceback.
    (The interrupt is raised by an import hook at engine.llm's import, where a real one
    lands: a signal's timing would make the test flaky.)"""
    import subprocess
    import sys
    code = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "engine.llm":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv[0] = "/some/venv/bin/{argv0}"
from engine.cli import main
"""
    # (elsewhere Python's own ending: the traceback, then killed by SIGINT: -2)
    for argv0, code_want, err_want in (("loom", 130, "\nloom: interrupted\n"), ("other", -2, "KeyboardInterrupt")):
        p = subprocess.run([sys.executable, "-c", code.format(argv0=argv0)], capture_output=True, text=True,
                           timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert p.returncode == code_want and err_want in p.stderr, (argv0, p.returncode, p.stderr)
        assert ("Traceback" in p.stderr) == (argv0 != "loom"), p.stderr
