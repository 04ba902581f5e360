"""A float32 model over a bfloat16 / float16 KV cache (``LLM(kv_cache_dtype=...)``).

The cache rounds each K/V row once when it is written; queries, scores and everything
else stay float32. The kernel itself is checked at float32 tolerance over a 16-bit cache in
test_ops_cpu.py. Here the engine: the ``cpu`` backend against the ``torch`` reference
backend, each writing its own cache. Their float32 K/V differ in the last bits before
rounding, so now and then one element rounds to the neighbouring 16-bit value (an ulp of
float16 is ~1e-3 relative): the tolerance is 2e-3, not 1e-4. Both stay close to the float32
transformers model (the rounding is the only difference).
"""
from __future__ import annotations

import pytest
import torch

from conftest import hf_logprobs, random_ids

pytest.importorskip("engine._ops", reason="engine._C is not built (pip install -e .)")

KV = 2048
TOL = 2e-3


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["qwen3", "llama3_rope"])
def test_cpu_matches_reference_over_16bit_cache(name, kv_dtype, make_llm, hf_ref):
    from engine import SamplingParams
    llm = make_llm(name, kv_cache_tokens=KV, kv_cache_dtype=kv_dtype, attention_backend="cpu")
    ref = make_llm(name, kv_cache_tokens=KV, kv_cache_dtype=kv_dtype, attention_backend="torch")
    assert llm.cache.k[0].dtype == getattr(torch, kv_dtype) and llm.dtype == torch.float32
    assert llm.cache.bytes_per_token * 2 == make_llm(name, kv_cache_tokens=KV).cache.bytes_per_token
    ids = random_ids(37, llm.config.vocab_size, seed=5)
    got, want = llm.score(ids)[0], ref.score(ids)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # Rounding K/V to 16 bits moves the log-probs a little, not a lot.
    hf = hf_logprobs(hf_ref(name), ids)
    err = (got - hf).abs().max().item()
    assert 0 < err < 0.1, f"max |log-prob diff| vs float32 transformers: {err}"
    # Decode: 4 threads over the shared prompt, greedy, with log-probs, in both backends.
    p = SamplingParams(n=4, temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    a, b = llm.generate([ids], p)[0], ref.generate([ids], p)[0]
    for ca, cb in zip(a.outputs, b.outputs):
        assert ca.token_ids == cb.token_ids
        for la, lb in zip(ca.logprobs, cb.logprobs):
            (ta, va), = la.items()
            (tb, vb), = lb.items()
            assert ta == tb and abs(va - vb) < TOL


def test_kv_cache_dtype_errors(model_dir):
    from engine import LLM
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported"):
        LLM(model_dir("qwen3"), kv_cache_tokens=KV, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="keeps the model's dtype"):
        LLM(model_dir("qwen3"), kv_cache_tokens=KV, dtype="bfloat16", kv_cache_dtype="float16")
    llm = LLM(model_dir("qwen3"), kv_cache_tokens=KV, dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert llm.cache.k[0].dtype == torch.bfloat16
