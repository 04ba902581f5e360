"""The whole engine through the Triton kernels must match the ``torch`` backend.

On a machine without CUDA the kernels run on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before triton is first imported; importing
``engine`` does not import triton). Every attention call and every K/V append of
the model goes through ``triton_kernels``: prefill (extend), decode, fork/join
with sequential shifts and live Hogwild!-style views.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import _triton_env  # noqa: E402,F401  (TRITON_INTERPRET=1 without CUDA, before triton is imported)

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import get_backend, get_append_kv  # noqa: E402
from engine.demo import make_random_model  # noqa: E402

import triton_kernels as tk  # noqa: E402

DEVICE = "cpu" if tk.INTERPRET else "cuda"
ATOL = 1e-4


def _make_pair(tmp_path_factory, head_dim: int):
    """(torch-backend LLM, triton-backend LLM) over one tiny random float32 model."""
    d = str(tmp_path_factory.mktemp(f"tiny_triton_{head_dim}"))
    make_random_model(d, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=head_dim,
                      intermediate=128, seed=head_dim)
    kw = dict(device=DEVICE, dtype="float32", kv_cache_tokens=2048, page_size=16)
    ref = LLM(d, attention_backend="torch", **kw)
    tri = LLM(d, attention_backend="triton", **kw)
    assert tri.attention_backend == "triton"
    # the K/V append through Triton too (the engine picks it itself only on CUDA)
    tri.model.append_kv = tk.append_kv
    return ref, tri


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _make_pair(tmp_path_factory, 64)


@pytest.fixture(scope="module")
def pair16(tmp_path_factory):
    """head_dim 16: RoPE halves of 8 padded to the 16 that tl.dot needs."""
    return _make_pair(tmp_path_factory, 16)


def test_triton_is_not_imported_by_engine():
    import subprocess
    code = "import sys, engine; from engine.attention import get_backend; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("which", ["pair", "pair16"])
def test_score_matches_torch_backend(which, request):
    ref, tri = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 5)]
    for a, b in zip(ref.score(seqs), tri.score(seqs)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_greedy_generate_matches_torch_backend(pair):
    ref, tri = pair
    prompts = ["The loom weaves", "a", "Parallel threads of one model share"]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a, b = ref.generate(prompts, sp), tri.generate(prompts, sp)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
    # n samples sharing one prompt's pages: decode rows grouped on the shared prompt job
    sp = SamplingParams(n=3, temperature=0, max_tokens=3, ignore_eos=True)
    a, b = ref.generate(["shared prompt, three threads"], sp), tri.generate(["shared prompt, three threads"], sp)
    assert [c.token_ids for c in a[0].outputs] == [c.token_ids for c in b[0].outputs]


def test_shared_prompt_prefixes_match_torch_backend(pair):
    """Requests whose prompts begin alike read their common prefix from segments written
    once (nested: 21 bytes shared by three prompts, 22 more by two): the roots' views
    start with them, through the Triton kernels as through torch's (tests/test_prefix_sharing.py:
    as unshared)."""
    ref, tri = pair
    head = "a preamble all three "
    prompts = [head + "share, then more two do", head + "share, then more two do!", head + "end"]
    sp = SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True)
    a, b = ref.generate(prompts, sp), tri.generate(prompts, sp)
    # (byte tokens, no BOS: the first prompt keeps its last byte, the third shares the head)
    assert [o.metrics.shared_prompt_tokens for o in b] == [len(prompts[0]) - 1, len(prompts[0]) - 1, len(head)]
    for x, y in zip(a, b):
        assert [o.token_ids for o in x.outputs] == [o.token_ids for o in y.outputs]


def _fork_join_run(llm):
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    s = llm.session("Write two drafts.")
    a, b = s.fork(s.root, ["\nA:", "\nB, longer:"])
    toks = [o.token_ids for o in s.generate([a, b], sp)]
    c = s.join([a, b], header="\nBoth:", positions="sequential")  # non-zero shifts
    toks.append(s.generate([c], sp)[0].token_ids)
    w = s.spawn(view=[a, b], header="\nLive:")                        # live view, shifted
    toks.append(s.generate([w], sp)[0].token_ids)
    s.close()
    return toks


def test_fork_join_shifts_match_torch_backend(pair):
    ref, tri = pair
    assert _fork_join_run(tri) == _fork_join_run(ref)


def test_dispatch():
    dev = torch.device(DEVICE)
    name, fn = get_backend("triton", dev)
    assert name == "triton" and fn is tk.attention
    if DEVICE == "cuda":
        assert get_backend("auto", dev)[0] == "triton"
        assert get_append_kv(dev) is tk.append_kv
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "engine._C is not built" when it is not
            assert get_backend("auto", dev)[0] in ("cpu", "torch")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_backend("triton", torch.device("cpu"))
