"""The benchmark scripts run end to end (smallest settings) and print their tables: a
smoke test of the deliverable, not a measurement (no timing is asserted)."""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench_attention's line for a row below 50% of read bandwidth, after the row's label
PARTS = (r": [\d.]+ ms; shared prompt alone ([\d.]+) ms \(\d+ GFLOP/s, \d+% of the peak\), own tokens alone "
         r"([\d.]+) ms \([\d.]+ GB/s, \d+% of read bandwidth\); sum ([\d.]+) ms; the row takes [\d.]+x its time "
         r"without overlap \(its FLOPs at the peak, then its bytes at the read bandwidth: [\d.]+ ms\)")


def _bench_module(name: str):
    """bench/<name>.py imported (the scripts are not a package)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def run(*args: str, code: int = 0) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout + p.stderr


def test_bench_attention_quick():
    out = run("bench/bench_attention.py", "--quick", "--repeats", "1")
    assert re.search(r"^measured bandwidth: read [\d.]+ GB/s", out, flags=re.M), out
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+) \|\s+[\d.]+ ", out, flags=re.M)
    assert rows == [("1", "1024", "64"), ("8", "8192", "512"), ("32", "8192", "512")], out
    assert re.search(r"^rows at >= 50% of read bandwidth: \d of 3", out, flags=re.M), out
    assert "plan builder, 1,000 threads x 50-segment views" in out and "prefill 1,024 rows" in out, out
    for label in re.findall(r"(N=\d+ x \d+k\+\d+) \d+% \(", out):  # the rows below 50%: their parts
        assert re.search("^  " + re.escape(label) + PARTS + "$", out, flags=re.M), out


def test_bench_attention_parts_line():
    """The line that splits a row below 50% of read bandwidth into its two parts, on a
    small case (the table's rows may all pass on a given machine)."""
    B = _bench_module("bench_attention")
    probe, tiny = B.MachineProbe(), B.Case(1, 16, 1)
    line = B.parts_line(3, 100, 17, torch.float32, probe, tiny, 1, 100.0)
    m = re.fullmatch(r"N=3 x 0k\+17" + PARTS, line)
    assert m, line
    t_s, t_o, total = map(float, m.groups())
    assert t_s > 0 and t_o > 0 and abs(t_s + t_o - total) <= 0.011, line


def test_bench_generate_smallest():
    out = run("bench/bench_generate.py", "--prompt-len", "32", "--new-tokens", "3", "--n", "1", "2",
              "--repeats", "1", "--no-hf", "--llama-cpp", "off", "--limits")
    assert re.findall(r"^\s+(\d+)\s+loom\s", out, flags=re.M) == ["1", "2"], out
    assert re.search(r"^prefill 32 tokens: .* of torch.mm", out, flags=re.M), out
    assert re.search(r"^decode step \(n=2\): [\d.]+ ms vs floor [\d.]+ ms", out, flags=re.M), out


def test_bench_generate_model_dir(model_dir):
    """--model runs a local checkpoint (here a tiny Mistral: another architecture than the
    random Qwen3-shaped default) through the same table."""
    out = run("bench/bench_generate.py", "--model", model_dir("mistral"), "--prompt-len", "24",
              "--new-tokens", "3", "--n", "2", "--repeats", "1", "--no-hf", "--llama-cpp", "off")
    assert re.search(r"^model: .* \(MistralForCausalLM\), [\d.]+M params, float32 ", out, flags=re.M), out
    assert re.findall(r"^\s+(\d+)\s+loom\s", out, flags=re.M) == ["2"], out


def _baseline_module():
    pytest.importorskip("gguf", reason="the llama.cpp baseline's optional packages (pip install -e '.[bench]')")
    return _bench_module("llamacpp_baseline")


def _with_rope(src: str, dst, rope: dict) -> str:
    """A copy of the checkpoint in ``src`` whose config.json has the RoPE parameters ``rope``."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **rope}
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.5}


@pytest.mark.parametrize("name", ["llama3_rope", "llama_bias", "llama_linear", "mistral", "qwen2", "qwen2_yarn",
                                  "qwen3", "qwen3_yarn"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_export_matches_loom(model_dir, tmp_path, name, dtype):
    """bench/llamacpp_baseline.py's GGUF of each architecture computes in llama.cpp the
    next-token distribution Loom computes (the check bench_generate.py makes before it
    times llama.cpp): q / k rows reordered for llama.cpp's Llama graph, llama3 / linear RoPE
    as frequency factors, yarn as llama.cpp's own scaling on the qwen graphs (its attention
    factor folded into q / k, or into the q / k norms), biases, tied and untied heads,
    bfloat16 matrices."""
    lb = _baseline_module()
    pytest.importorskip("llama_cpp", reason="the llama.cpp baseline's optional packages (pip install -e '.[bench]')")
    from engine import LLM
    src = _with_rope(model_dir("qwen3"), tmp_path / "src", QWEN3_YARN) if name == "qwen3_yarn" else model_dir(name)
    path = lb.write_gguf(src, str(tmp_path / "m.gguf"), dtype)
    llm = LLM(src, dtype=dtype)
    prompt = torch.randint(0, llm.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = llm.score(prompt)[0][-1].float()
    r = lb.LlamaCppRunner(path, n_ctx=256, n_seq=1, n_threads=2, flash_attn=False)
    try:
        got = torch.from_numpy(r.prefill_logits(prompt)).log_softmax(-1)
    finally:
        r.close()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < (5e-3 if dtype == "float32" else 5e-2), err
    assert ref.argmax().item() in got.topk(3).indices.tolist()


def test_gguf_export_refuses_what_llama_cpp_cannot_run(model_dir, tmp_path):
    lb = _baseline_module()
    llama3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    src = _with_rope(model_dir("qwen2"), tmp_path / "src", llama3)
    with pytest.raises(ValueError, match="qwen2 graph takes no RoPE frequency factors and has no 'llama3' scaling"):
        lb.write_gguf(src, str(tmp_path / "m.gguf"))
    assert not os.path.exists(tmp_path / "m.gguf")


def test_bench_linear_help():
    assert "packed-panel GEMM" in run("bench/bench_linear.py", "--help")


def test_bench_attention_gpu_smoke():
    """The GPU table's script on the CPU under the Triton interpreter (tiny sizes): every
    method agrees with SDPA on per-thread K/V (it exits 1 when they do not)."""
    out = run("bench/bench_attention_gpu.py", "--smoke")
    assert len(re.findall(r"^\s+\d+\s+40\s+\d+\s+triton\s+[\d.]+", out, flags=re.M)) == 4, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_attention_cuda_without_a_gpu():
    out = run("bench/bench_attention.py", "--device", "cuda", code=2)
    assert "needs a CUDA GPU" in out and "--smoke" in out, out
    # the CPU table's flags are the GPU table's too (they were refused by its parser)
    out = run("bench/bench_attention.py", "--device", "cuda", "--quick", "--dtype", "float32", code=2)
    assert "needs a CUDA GPU" in out and "unrecognized" not in out and "invalid choice" not in out, out


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (the probe is built by hand, not by setup.py)")
def test_overlap_probe_builds(tmp_path):
    """bench/overlap_probe.cpp (a one-core machine probe, run by hand) compiles as its header says."""
    exe = tmp_path / "overlap_probe"
    p = subprocess.run(["g++", "-O2", "-Wall", "-Werror", "-mavx512f", "-mfma", "bench/overlap_probe.cpp", "-o",
                        str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and exe.exists(), p.stderr[-4000:]


def test_bench_prefill_smallest():
    out = run("bench/bench_prefill.py", "--prompt-len", "40", "--chunks", "16", "--repeats", "1")
    rows = re.findall(r"^\s+(one pass \(40\)|chunks of 16)\s+[\d.]+\s+[\d.]+x\s+(\d+|n/a)\s+\d+$", out, flags=re.M)
    assert [r[0] for r in rows] == ["one pass (40)", "chunks of 16"], out
    assert "same first token from every method: yes" in out, out


def test_bench_sampler_smallest():
    """bench_sampler.py prints one row per setting, row kind and n, with both paths' times,
    and its two paths draw the same tokens (else the row says so)."""
    out = run("bench/bench_sampler.py", "--vocab", "3000", "--n", "1", "3", "--repeats", "1")
    rows = re.findall(r"^(.+?)\s+(peaked|flat)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+x(.*)$", out, flags=re.M)
    assert len(rows) == 4 * 2 * 2 and {r[2] for r in rows} == {"1", "3"}, out
    assert all(r[3] == "" for r in rows), out


def test_bench_prefix_smallest():
    """bench_prefix.py: both settings' rows; shared feeds the preamble once (3 x 16 + 40 own and
    prompt tokens + 3 x 3 decode tokens, vs 3 x 56 + 9) and both give the same tokens."""
    out = run("bench/bench_prefix.py", "--prefix-len", "40", "--requests", "3", "--new-tokens", "4",
              "--repeats", "1")
    rows = re.findall(r"^\s+(shared|per request)\s+[\d.]+\s+[\d.]+\s+([\d,]+)\s+\d+$", out, flags=re.M)
    assert rows == [("shared", str(40 + 3 * 16 + 3 * 3)), ("per request", str(3 * 56 + 3 * 3))], out
    assert re.search(r"^shared / per request: [\d.]+x faster; same tokens: True$", out, flags=re.M), out


def test_bench_prefix_hogwild():
    """bench_prefix.py --protocol hogwild: the workers read the preamble written once (the
    per-request setting feeds it twice more for three requests), the same tokens."""
    out = run("bench/bench_prefix.py", "--prefix-len", "40", "--requests", "3", "--new-tokens", "3",
              "--repeats", "1", "--protocol", "hogwild")
    rows = dict(re.findall(r"^\s+(shared|per request)\s+[\d.]+\s+[\d.]+\s+([\d,]+)\s+\d+$", out, flags=re.M))
    assert int(rows["per request"].replace(",", "")) - int(rows["shared"].replace(",", "")) == 2 * 40, out
    assert re.search(r"^shared / per request: [\d.]+x faster; same tokens: True$", out, flags=re.M), out
