"""Every supported architecture against Hugging Face transformers on random tiny checkpoints.

Float32 teacher-forced log-probabilities must agree within 1e-4, greedy generation token for
token, generate's own log-probabilities with the teacher-forced ones, a batch with each of
its requests alone; bfloat16 must run and agree loosely.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import VARIANTS, hf_greedy, hf_logprobs, random_ids

BACKENDS = ["torch", "cpu"]
ATOL = 1e-4
KV_TOKENS = 4096


def _sp(**kw):
    from engine import SamplingParams
    return SamplingParams(**kw)


def _greedy(max_tokens=32, **kw):
    return _sp(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, **kw)


def _assert_close_logprobs(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: score returned {type(got)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}, want float32"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()
    err = diff.max().item()
    if not err <= ATOL:
        pos, tok = divmod(int(diff.argmax()), want.shape[1])
        per_pos = diff.max(dim=1).values
        bad_rows = (per_pos > ATOL).nonzero().flatten().tolist()
        raise AssertionError(
            f"{what}: max |logprob diff| = {err:.3e} > {ATOL} at position {pos}, token {tok} "
            f"(engine {got[pos, tok].item():.6f}, HF {want[pos, tok].item():.6f}); "
            f"positions over tolerance: {bad_rows}")


def _assert_same_tokens(got: list[int], want: list[int], ref, prompt: list[int], what: str) -> None:
    """Token equality; on failure say where and how close the reference's top-2 were there."""
    if got == want:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    note = ""
    if i < min(len(got), len(want)):
        lp = hf_logprobs(ref, prompt + want[:i])[-1]
        top2 = lp.topk(2)
        note = (f"; HF at that step: top-2 {top2.indices.tolist()} logprobs "
                f"{[round(v, 6) for v in top2.values.tolist()]}, engine's token {got[i]} has HF "
                f"logprob {lp[got[i]].item():.6f}")
    raise AssertionError(f"{what}: first difference at generated token {i} "
                         f"(engine {got[i] if i < len(got) else 'END'}, HF {want[i] if i < len(want) else 'END'}); "
                         f"lengths {len(got)} vs {len(want)}{note}\nengine {got}\nHF     {want}")


@pytest.fixture(scope="module")
def greedy_ref(hf_ref):
    """``greedy_ref(name, prompt, n)`` -> HF greedy continuation, cached."""
    cache: dict = {}

    def get(name, prompt, n):
        key = (name, tuple(prompt), n)
        if key not in cache:
            cache[key] = hf_greedy(hf_ref(name), list(prompt), n)
        return cache[key]
    return get


# ---------------------------------------------------------------------------------------------
# teacher-forced log-probabilities
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_score_matches_hf(name, backend, make_llm, hf_ref):
    vocab = VARIANTS[name]["vocab"]
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS)
    ids = random_ids(41, vocab, seed=11)
    out = llm.score(ids)
    assert isinstance(out, list) and len(out) == 1
    _assert_close_logprobs(out[0], hf_logprobs(hf_ref(name), ids), f"{name}/{backend} score(41 tokens)")
    # several sequences in one call, each against its own reference
    seqs = [random_ids(17, vocab, seed=12), random_ids(3, vocab, seed=13), ids[:33]]
    outs = llm.score(seqs)
    assert len(outs) == len(seqs)
    for s, o in zip(seqs, outs):
        _assert_close_logprobs(o, hf_logprobs(hf_ref(name), s), f"{name}/{backend} batched score({len(s)} tokens)")
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 5])
def test_score_and_greedy_odd_page_sizes(page_size, backend, make_llm, hf_ref, greedy_ref):
    name = "qwen2"
    vocab = VARIANTS[name]["vocab"]
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS, page_size=page_size)
    assert llm.cache_stats()["page_size"] == page_size
    ids = random_ids(41, vocab, seed=11)
    _assert_close_logprobs(llm.score(ids)[0], hf_logprobs(hf_ref(name), ids),
                           f"{name}/{backend}/page_size={page_size} score")
    prompt = random_ids(23, vocab, seed=21)
    out = llm.generate([prompt], _greedy(32))[0].outputs[0]
    _assert_same_tokens(list(out.token_ids), greedy_ref(name, prompt, 32), hf_ref(name), prompt,
                        f"{name}/{backend}/page_size={page_size} greedy")
    assert llm.cache_stats()["pages_used"] == 0


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_hf(name, backend, make_llm, hf_ref, greedy_ref):
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS)
    prompt = random_ids(23, VARIANTS[name]["vocab"], seed=21)
    res = llm.generate([prompt], _greedy(32))
    assert len(res) == 1 and len(res[0].outputs) == 1
    assert list(res[0].prompt_token_ids) == prompt
    out = res[0].outputs[0]
    _assert_same_tokens(list(out.token_ids), greedy_ref(name, prompt, 32), hf_ref(name), prompt,
                        f"{name}/{backend} greedy")
    assert out.finish_reason == "length"
    assert out.logprobs is None
    assert res[0].metrics.generated_tokens == 32
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_logprobs_match_hf(name, backend, make_llm, hf_ref, greedy_ref):
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS)
    prompt = random_ids(23, VARIANTS[name]["vocab"], seed=21)
    out = llm.generate([prompt], _greedy(32, logprobs=3))[0].outputs[0]
    toks = list(out.token_ids)
    _assert_same_tokens(toks, greedy_ref(name, prompt, 32), hf_ref(name), prompt,
                        f"{name}/{backend} greedy with logprobs=3")
    assert out.logprobs is not None and len(out.logprobs) == len(toks)
    ref = hf_logprobs(hf_ref(name), prompt + toks[:-1])[len(prompt) - 1:]  # [32, vocab]
    for i, (t, lp) in enumerate(zip(toks, out.logprobs)):
        assert t in lp, f"step {i}: chosen token {t} missing from logprobs {lp}"
        top3 = ref[i].topk(3).indices.tolist()
        assert set(top3) <= set(lp), f"step {i}: HF top-3 {top3} not all in returned keys {sorted(lp)}"
        assert len(lp) <= 4, f"step {i}: {len(lp)} entries for logprobs=3 (top-3 plus the chosen at most)"
        for tok, v in lp.items():
            assert isinstance(v, float), f"step {i}: logprob of {tok} is {type(v)}, want float"
            want = ref[i, tok].item()
            assert abs(v - want) <= ATOL, (f"{name}/{backend} step {i} token {tok}: engine logprob "
                                           f"{v:.6f}, HF {want:.6f} (diff {abs(v - want):.2e})")
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_batching_invariance(name, backend, make_llm, hf_ref, greedy_ref):
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS)
    vocab = VARIANTS[name]["vocab"]
    # lengths around page boundaries (page_size 16)
    prompts = [random_ids(n, vocab, seed=100 + n) for n in (1, 7, 16, 17, 33)]
    sp = _greedy(16)
    together = [r.outputs[0].token_ids for r in llm.generate(prompts, sp)]
    assert len(together) == len(prompts)
    for p, got in zip(prompts, together):
        alone = llm.generate([p], sp)[0].outputs[0].token_ids
        assert list(got) == list(alone), (f"{name}/{backend}: prompt of {len(p)} tokens: batched "
                                           f"{list(got)} != alone {list(alone)}")
        _assert_same_tokens(list(got), greedy_ref(name, p, 16), hf_ref(name), p,
                            f"{name}/{backend} batched prompt of {len(p)} tokens")
    assert llm.cache_stats()["pages_used"] == 0


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_bfloat16_runs_and_agrees_loosely(name, backend, make_llm, hf_ref):
    dtype = torch.bfloat16 if name == "llama" else "bfloat16"  # both spellings
    llm = make_llm(name, attention_backend=backend, kv_cache_tokens=KV_TOKENS, dtype=dtype)
    vocab = VARIANTS[name]["vocab"]
    ids = random_ids(41, vocab, seed=11)
    got = llm.score(ids)[0]
    want = hf_logprobs(hf_ref(name), ids)
    assert tuple(got.shape) == tuple(want.shape)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    err = (got - want).abs().max().item()
    assert agree >= 0.8, f"{name}/{backend} bf16: top-1 agreement {agree:.2f} < 0.8 (max |diff| {err:.3f})"
    assert err < 1.0, f"{name}/{backend} bf16: max |logprob diff| {err:.3f} >= 1.0 (top-1 agreement {agree:.2f})"
    out = llm.generate([ids[:20]], _greedy(8))[0].outputs[0]
    assert len(out.token_ids) == 8 and all(0 <= t < vocab for t in out.token_ids)
    assert llm.cache_stats()["pages_used"] == 0


# ---------------------------------------------------------------------------------------------
# RoPE schemes against transformers' own initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top,rope", [
    ({}, {"factor": 4.0, "original_max_position_embeddings": 1024}),
    ({}, {"factor": 8.0}),  # no original context: the model's (then the ramp spans every dimension)
    ({}, {"factor": None, "original_max_position_embeddings": 2048}),  # factor from the two contexts
    ({"original_max_position_embeddings": 4096}, {"factor": 2.0, "original_max_position_embeddings": 1024}),
    ({}, {"factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 0.7, "beta_fast": 16,
          "beta_slow": 2, "truncate": False}),
    ({}, {"factor": 40.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0}),
])
def test_yarn_frequencies_and_attention_factor_are_transformers(top, rope):
    """inv_freq and the cos / sin factor of YaRN configurations (as Qwen2.5 / Qwen3 ship them
    for long contexts, and the fields DeepSeek-style configs add) equal transformers' own."""
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.config import ModelConfig
    from engine.rope import attention_scaling, compute_inv_freq
    raw = dict(architectures=["Qwen3ForCausalLM"], vocab_size=64, hidden_size=128, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
               max_position_embeddings=8192, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, **rope}, **top)
    import copy
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS["yarn"](Qwen3Config(**copy.deepcopy(raw)), "cpu")  # (it fills in raw's dicts)
    cfg = ModelConfig.from_dict(raw)
    assert torch.allclose(compute_inv_freq(cfg), inv_hf.float(), rtol=1e-6, atol=0)
    assert attention_scaling(cfg) == pytest.approx(scale_hf, rel=1e-12)


@pytest.mark.parametrize("top,rope", [
    ({}, {"original_max_position_embeddings": 1024}),
    ({}, {}),  # no original context: transformers 5 takes max_position_embeddings
    ({"original_max_position_embeddings": 4096}, {"original_max_position_embeddings": 1024}),  # the top level wins
])
def test_llama3_frequencies_are_transformers(top, rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.config import ModelConfig
    from engine.rope import compute_inv_freq
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=128, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
               rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, **rope}, **top)
    import copy
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**copy.deepcopy(raw)), "cpu")  # (it fills in raw's dicts)
    assert torch.allclose(compute_inv_freq(ModelConfig.from_dict(raw)), inv_hf.float(), rtol=1e-6, atol=0)


def _tiny_qwen2(tmp_path, name: str, seed: int):
    """A random tiny Qwen2 checkpoint (vocabulary 320) in tmp_path / name: (its directory,
    its config.json's path, the config as read)."""
    import json
    from conftest import build_model_dir
    spec = dict(arch="Qwen2ForCausalLM", vocab=320, hidden=96, heads=6, kv_heads=2, tie=False,
                rope={"rope_type": "default", "rope_theta": 10000.0})
    d = str(tmp_path / name)
    build_model_dir(d, spec, seed=seed)
    path = tmp_path / name / "config.json"
    return d, path, json.loads(path.read_text())


def test_rope_scaling_added_to_a_transformers5_config(tmp_path):
    """A config transformers 5 wrote (rope_parameters) with rope_scaling added by hand, as
    Qwen's model cards say for long contexts: transformers reads rope_scaling over
    rope_parameters, and so does Loom (same log-probs past the pretraining context). When
    rope_scaling has no theta and rope_parameters holds one that is not the default,
    transformers would drop it: refused, saying where to put it."""
    import json
    from conftest import hf_model
    from engine import LLM
    d, path, raw = _tiny_qwen2(tmp_path, "both", seed=2)
    assert raw["rope_parameters"]["rope_type"] == "default"
    raw.update(max_position_embeddings=64,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    path.write_text(json.dumps(raw))
    ids = random_ids(150, 320, 3)
    llm = LLM(d)
    assert llm.config.max_position_embeddings == 256
    _assert_close_logprobs(llm.score(ids)[0], hf_logprobs(hf_model(d), ids), "rope_scaling over rope_parameters")
    raw["rope_parameters"]["rope_theta"] = 1e6
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="add \"rope_theta\" to rope_scaling"):
        LLM(d)


def test_yarn_extends_the_context_as_qwen_configures_it(tmp_path):
    """Qwen2.5's way to turn YaRN on: max_position_embeddings stays the pretraining context
    and rope_scaling (legacy spelling) adds factor 4: the model is meant for 4x the tokens.
    Loom's context is factor x original, and a sequence past the old one equals transformers."""
    import json
    from conftest import hf_model
    from engine import LLM
    d, path, raw = _tiny_qwen2(tmp_path, "yarn", seed=1)
    raw.pop("rope_parameters", None)
    raw.update(max_position_embeddings=128, rope_theta=10000.0,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    path.write_text(json.dumps(raw))
    ids = random_ids(300, 320, 0)
    want = hf_logprobs(hf_model(d), ids)
    llm = LLM(d)
    assert llm.config.max_position_embeddings == 512
    _assert_close_logprobs(llm.score(ids)[0], want, "yarn past the pretraining context")
    with pytest.raises(ValueError, match="context is 512 .rope_scaling yarn: factor x original_max_position"):
        llm.score(random_ids(513, 320, 1))
    # neither context written: transformers takes Qwen2's default (32,768) for both, and so does
    # Loom (it refused the config, saying it was incomplete)
    del raw["max_position_embeddings"], raw["rope_scaling"]["original_max_position_embeddings"]
    path.write_text(json.dumps(raw))
    llm = LLM(d, kv_cache_tokens=512)
    assert llm.config.max_position_embeddings == 4 * 32768
    _assert_close_logprobs(llm.score(ids)[0], hf_logprobs(hf_model(d), ids), "yarn over the default context")


@pytest.mark.parametrize("legacy", [False, True])
def test_dynamic_ntk_runs_as_transformers_inside_the_context(tmp_path, legacy):
    """Dynamic NTK RoPE (Llama-2-era fine-tunes; {"type": "dynamic"} or transformers 5's
    rope_parameters) changes the frequencies only for sequences longer than
    max_position_embeddings, which Loom never runs: inside it the model is plain RoPE, and its
    log-probs are transformers' up to the last position (it was refused as length-dependent)."""
    import json
    from conftest import hf_model
    from engine import LLM
    d, path, raw = _tiny_qwen2(tmp_path, "dynamic", seed=3)
    rope = {"rope_type": "dynamic", "factor": 4.0}
    if legacy:
        raw.pop("rope_parameters", None)
        raw.update(rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 4.0})
    else:
        raw["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    raw["max_position_embeddings"] = 96
    path.write_text(json.dumps(raw))
    ids = random_ids(96, 320, 4)
    llm = LLM(d)
    assert llm.config.max_position_embeddings == 96
    _assert_close_logprobs(llm.score(ids)[0], hf_logprobs(hf_model(d), ids), "dynamic NTK inside the context")
    with pytest.raises(ValueError, match="context is 96"):
        llm.score(random_ids(97, 320, 5))


@pytest.mark.parametrize("name,raw,context,rope_type", [
    # the fields of published checkpoints' config.json that set the context and RoPE
    ("Llama-3.1-8B", dict(architectures=["LlamaForCausalLM"], max_position_embeddings=131072, rope_theta=500000.0,
                          rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
     131072, "llama3"),
    ("Qwen2.5-7B-Instruct", dict(architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
                                 rope_theta=1000000.0, rope_scaling=None, sliding_window=131072,
                                 use_sliding_window=False, max_window_layers=28), 32768, None),
    ("Qwen2.5-7B-Instruct + YaRN (its model card)", dict(
        architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768, rope_theta=1000000.0,
        rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
        sliding_window=131072, use_sliding_window=False, max_window_layers=28), 131072, "yarn"),
    ("Qwen3-8B", dict(architectures=["Qwen3ForCausalLM"], max_position_embeddings=40960, rope_theta=1000000,
                      rope_scaling=None, sliding_window=None, use_sliding_window=False, max_window_layers=36),
     40960, None),
    ("Mistral-7B-v0.1", dict(architectures=["MistralForCausalLM"], max_position_embeddings=32768,
                             rope_theta=10000.0, sliding_window=4096), 4096, None),
    ("Mistral-7B-Instruct-v0.3", dict(architectures=["MistralForCausalLM"], max_position_embeddings=32768,
                                      rope_theta=1000000.0, sliding_window=None), 32768, None),
])
def test_published_configs_read_as_transformers_reads_them(name, raw, context, rope_type):
    """Loom's context and RoPE scheme for the configs of published checkpoints (sizes
    shrunk), and the same as transformers' reading of them."""
    import copy
    from conftest import _hf_classes
    from engine.config import ModelConfig
    raw = dict(raw, vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg = ModelConfig.from_dict(copy.deepcopy(raw))
    assert cfg.max_position_embeddings == context, name
    assert (cfg.rope_scaling or {}).get("rope_type") == rope_type, name
    config_cls, _ = _hf_classes(raw["architectures"][0])
    hf = config_cls(**{k: v for k, v in copy.deepcopy(raw).items() if k != "architectures"})
    assert hf.rope_parameters.get("rope_type", "default") == (rope_type or "default")
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]


@pytest.mark.parametrize("theta,rope", [
    # the beta_slow dimension lies past head_dim/2 (small theta, long original context)
    (500.0, {"factor": 4.0, "original_max_position_embeddings": 32768}),
    # mscale_all_dim without mscale: transformers' plain mscale(factor)
    (1e6, {"factor": 4.0, "original_max_position_embeddings": 1024, "mscale_all_dim": 0.7}),
    (1e6, {"factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0, "mscale_all_dim": 1.0}),
])
def test_yarn_edge_configs_are_transformers(theta, rope):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.config import ModelConfig
    from engine.rope import attention_scaling, compute_inv_freq
    raw = dict(architectures=["Qwen3ForCausalLM"], vocab_size=64, hidden_size=128, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
               max_position_embeddings=131072, rope_parameters={"rope_type": "yarn", "rope_theta": theta, **rope})
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS["yarn"](Qwen3Config(**copy.deepcopy(raw)), "cpu")
    cfg = ModelConfig.from_dict(raw)
    assert torch.allclose(compute_inv_freq(cfg), inv_hf.float(), rtol=1e-6, atol=0)
    assert attention_scaling(cfg) == pytest.approx(scale_hf, rel=1e-12)


def _runs_as_transformers(d: str, what: str):
    """The float32 model in ``d``: a 20-token prompt's log-probs and 4 greedy tokens as transformers'."""
    from conftest import hf_model
    from engine import LLM
    ids = random_ids(20, 260, 6)
    llm = LLM(d, dtype="float32", kv_cache_tokens=64)
    ref = hf_model(d)
    _assert_close_logprobs(llm.score(ids)[0], hf_logprobs(ref, ids), what)
    out = llm.generate([ids], _greedy(max_tokens=4))[0].outputs[0]
    _assert_same_tokens(list(out.token_ids), hf_greedy(ref, ids, 4), ref, ids, f"{what} greedy")


def test_a_head_larger_than_the_fused_ops_take_runs_as_transformers(tmp_path):
    """csrc/fused_cpu.cpp's q/k prep holds a head row in a 1,024-float buffer: a config with
    head_dim 1,026 loaded, then every call failed with 'RuntimeError: qkv_prep: head_dim must be
    even and <= 1024'. Such a model takes the ATen ops instead, and equals transformers."""
    from conftest import build_model_dir
    spec = dict(arch="Qwen3ForCausalLM", vocab=260, hidden=16, heads=2, kv_heads=1, head_dim=1026, layers=1,
                inter=32, tie=False, rope={"rope_type": "default", "rope_theta": 10000.0})
    d = build_model_dir(str(tmp_path / "big_head"), spec, seed=5)
    _runs_as_transformers(d, "head_dim 1026")


def test_a_hidden_size_larger_than_the_fused_norms_take_runs_as_transformers(tmp_path):
    """csrc/fused_cpu.cpp's RMSNorms hold a hidden row in a 16,384-float buffer: a config with
    hidden_size 16,386 loaded, then every call failed with 'RuntimeError: rms_norm: at most 16384
    features'. Such a model takes the ATen ops instead, and equals transformers. (The head's
    weights are scaled down: logits of ~25 from 16k-term sums would round at ~1e-4 in float32.)"""
    import os
    from safetensors.torch import load_file, save_file
    from conftest import build_model_dir
    spec = dict(arch="LlamaForCausalLM", vocab=260, hidden=16386, heads=1, kv_heads=1, head_dim=16, layers=1,
                inter=8, tie=False, rope={"rope_type": "default", "rope_theta": 10000.0})
    d = build_model_dir(str(tmp_path / "wide"), spec, seed=5)
    path = os.path.join(d, "model.safetensors")
    w = load_file(path)
    w["lm_head.weight"] *= 0.05
    save_file(w, path, metadata={"format": "pt"})
    _runs_as_transformers(d, "hidden_size 16386")


def test_a_mistral_head_dim_of_0_is_derived_as_transformers_does(tmp_path):
    """Mistral's attention and RoPE take `head_dim or hidden_size // num_attention_heads`, so
    transformers runs a config.json with "head_dim": 0 as hidden / heads; Loom refused it
    ('head_dim=0 must be a positive integer')."""
    import json
    from conftest import build_model_dir
    spec = dict(arch="MistralForCausalLM", vocab=260, hidden=64, heads=4, kv_heads=2, layers=1, inter=32,
                tie=False, rope={"rope_type": "default", "rope_theta": 10000.0})
    d = build_model_dir(str(tmp_path / "m"), spec, seed=3)
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "head_dim": 0}))
    _runs_as_transformers(d, "Mistral head_dim 0")


@pytest.mark.parametrize("arch,rope", [
    ("LlamaForCausalLM", {"partial_rotary_factor": 0.5}),
    ("Qwen3ForCausalLM", {"partial_rotary_factor": 0.25, "factor": 2.0}),
    ("MistralForCausalLM", {}),  # (all pairs rotated: linear RoPE of factor 1)
])
def test_proportional_rope_rotates_part_of_each_head_as_transformers(tmp_path, arch, rope):
    """transformers 5's 'proportional' RoPE (Gemma 4's, which its Llama / Qwen / Mistral code
    runs too) rotates the first partial_rotary_factor of each head's frequency pairs and leaves
    the others; Loom refused it ('not supported'), and with a partial_rotary_factor said
    transformers fails on it."""
    from conftest import build_model_dir
    spec = dict(arch=arch, vocab=260, hidden=64, heads=4, kv_heads=2, head_dim=16, layers=1, inter=32, tie=False,
                rope={"rope_type": "proportional", "rope_theta": 10000.0, **rope})
    d = build_model_dir(str(tmp_path / "p"), spec, seed=4)
    _runs_as_transformers(d, f"proportional RoPE {rope}")
