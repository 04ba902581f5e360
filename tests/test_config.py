"""Reading a checkpoint as transformers does: config.json's fields (present, absent, spelled
two ways) against transformers' config classes, the biases / windows / dtypes each
architecture takes, and the weight files (shards, pickles, extra or missing tensors)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VARIANTS, random_ids
from engine.config import ModelConfig


def _hf(arch, raw):
    import transformers as tf
    cls = {"LlamaForCausalLM": tf.LlamaConfig, "Qwen2ForCausalLM": tf.Qwen2Config,
           "Qwen3ForCausalLM": tf.Qwen3Config, "MistralForCausalLM": tf.MistralConfig}[arch]
    return cls(**{k: v for k, v in copy.deepcopy(raw).items() if k != "architectures"})


def _raw(arch, **kw):
    return {**dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128), **kw}


def test_rope_parameters_theta_wins_over_a_top_level_one():
    # transformers 5: the theta inside rope_parameters / rope_scaling wins over a stale top-level rope_theta
    for key, rope in (("rope_parameters", {"rope_type": "default", "rope_theta": 1e6}),
                      ("rope_scaling", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})):
        raw = _raw("LlamaForCausalLM", rope_theta=5e5, **{key: rope})
        assert ModelConfig.from_dict(copy.deepcopy(raw)).rope_theta == _hf("LlamaForCausalLM", raw).rope_parameters["rope_theta"] == 1e6


def test_qwen3_attention_bias_puts_a_bias_on_o_proj():
    cfg = ModelConfig.from_dict(_raw("Qwen3ForCausalLM", attention_bias=True))
    assert cfg.qkv_bias and cfg.o_bias and cfg.qk_norm


def test_mistral_has_no_biases_whatever_attention_bias_says():
    cfg = ModelConfig.from_dict(_raw("MistralForCausalLM", attention_bias=True, sliding_window=None))
    assert not cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias


@pytest.mark.parametrize("fields", [dict(max_window_layers=2), dict()])
def test_qwen2_window_layers_boundary_and_default(fields):
    # max_window_layers=2 of 3: layer 2 slides (context capped); absent: transformers' 28 -> none slides
    raw = _raw("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8, **fields)
    hf = _hf("Qwen2ForCausalLM", raw)
    want = 8 if "sliding_attention" in hf.layer_types else 128
    assert want == (8 if fields else 128)
    assert ModelConfig.from_dict(raw).max_position_embeddings == want


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_mlp_bias_is_llamas_only(arch):
    assert not ModelConfig.from_dict(_raw(arch, mlp_bias=True)).mlp_bias


def test_llama_without_attention_bias_or_mlp_bias_has_no_biases():
    """Both fields left out: transformers' LlamaConfig defaults are false (no bias tensors)."""
    raw = _raw("LlamaForCausalLM")
    hf, cfg = _hf("LlamaForCausalLM", raw), ModelConfig.from_dict(raw)
    assert not hf.attention_bias and not hf.mlp_bias
    assert not cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", mlp_bias=True)).mlp_bias


def test_yarn_never_lowers_the_context():
    raw = _raw("Qwen3ForCausalLM", max_position_embeddings=8192,
               rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                "original_max_position_embeddings": 1024})
    assert ModelConfig.from_dict(raw).max_position_embeddings == 8192


def test_a_yarn_context_equal_to_max_position_embeddings_keeps_its_source():
    """factor x original_max_position_embeddings raises the context only when above it (its
    source named in context errors: test_models_hf); equal (a config that writes both), the
    field itself stays the source."""
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024}
    cfg = ModelConfig.from_dict(_raw("Qwen3ForCausalLM", max_position_embeddings=4096, rope_parameters=rope))
    assert (cfg.max_position_embeddings, cfg.context_source) == (4096, "max_position_embeddings")
    # no factor: max_position_embeddings / original_max_position_embeddings, whatever the latter
    rope = {"rope_type": "yarn", "original_max_position_embeddings": 1}
    assert ModelConfig.from_dict(_raw("Qwen3ForCausalLM", rope_parameters=rope)).rope_scaling["factor"] == 128


def test_parse_dtype_refuses_other_torch_dtypes():
    import torch
    from engine.config import parse_dtype
    for bad in (torch.float64, torch.int8):
        with pytest.raises(ValueError, match="not supported"):
            parse_dtype(bad, torch.float32)


def test_float16_spellings_are_float16():
    import torch
    from engine.config import parse_dtype
    for s in ("float16", "fp16", "half", "torch.float16", torch.float16):
        assert parse_dtype(s, torch.float32) is torch.float16, s
    assert parse_dtype("bfloat16", torch.float32) is torch.bfloat16
    assert parse_dtype("auto", torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("mt,arch", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                     ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_model_type_names_the_architecture(mt, arch):
    raw = _raw(arch, model_type=mt, sliding_window=8)
    del raw["architectures"]
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == arch
    assert cfg.max_position_embeddings == (8 if arch == "MistralForCausalLM" else 128)  # Mistral's window only


@pytest.mark.parametrize("mt", [["llama"], {"llama": 1}])
def test_a_model_type_that_is_not_a_name_is_refused_without_architectures(mt):
    """A model_type that is a list / object (no architectures to read instead) crashed with a
    TypeError (unhashable type) from the lookup of its architecture."""
    raw = _raw("LlamaForCausalLM", model_type=mt)
    del raw["architectures"]
    with pytest.raises(ValueError, match=re.escape(f"model_type={mt!r}") + ".? is not supported by Loom"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("layers", [28, 29])
def test_qwen_window_defaults_are_transformers(layers):
    """use_sliding_window with no sliding_window / max_window_layers: transformers' Qwen2 / Qwen3
    defaults, a 4,096 window from layer 28 on (28 layers: none slides; 29: the last does)."""
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        raw = _raw(arch, use_sliding_window=True, num_hidden_layers=layers, max_position_embeddings=8192)
        hf = _hf(arch, raw)
        want = hf.sliding_window if "sliding_attention" in hf.layer_types else 8192
        assert want == (4096 if layers == 29 else 8192)
        assert ModelConfig.from_dict(raw).max_position_embeddings == want


def test_qwen_window_is_off_unless_use_sliding_window():
    raw = _raw("Qwen2ForCausalLM", sliding_window=8, max_window_layers=0)
    hf = _hf("Qwen2ForCausalLM", raw)
    assert hf.sliding_window is None or "sliding_attention" not in (hf.layer_types or [])
    assert ModelConfig.from_dict(raw).max_position_embeddings == 128


ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]


@pytest.mark.parametrize("arch", ARCHS)
def test_fields_left_out_take_transformers_defaults(arch):
    """A config.json that leaves out the optional fields reads as the architecture's
    transformers config class reads it: the context (Llama 2,048, Qwen 32,768, Mistral
    131,072 but its 4,096 window), kv heads (Qwen 32, Mistral 8, Llama the heads; null: the
    heads), head_dim (Qwen3 128), rms_norm_eps, rope_theta, tied embeddings, float32. (Loom
    took 4,096 and the heads for every architecture.)"""
    raw = dict(architectures=[arch], vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=32)
    hf, cfg = _hf(arch, raw), ModelConfig.from_dict(copy.deepcopy(raw))
    ctx = hf.max_position_embeddings if arch != "MistralForCausalLM" else hf.sliding_window
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (cfg.max_position_embeddings, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.rope_theta,
            cfg.tie_word_embeddings, cfg.torch_dtype) == \
        (ctx, hf.num_key_value_heads, head_dim, hf.rms_norm_eps, hf.rope_parameters["rope_theta"],
         hf.tie_word_embeddings, torch.float32)
    assert ModelConfig.from_dict({**raw, "num_key_value_heads": None}).num_kv_heads == 32
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):  # (32 kv heads for 4 query heads: no such model)
        with pytest.raises(ValueError, match="config.json has no num_key_value_heads, and transformers' default"):
            ModelConfig.from_dict({**raw, "num_attention_heads": 4})
    if arch != "MistralForCausalLM":  # (context errors name where the context came from)
        assert cfg.context_source == f"max_position_embeddings (absent: {arch}'s default in transformers)"


def test_dtype_over_torch_dtype():
    """transformers 5 reads ``dtype``, then the older ``torch_dtype``: with both, dtype."""
    raw = dict(architectures=["Qwen3ForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               dtype="bfloat16", torch_dtype="float32")
    assert ModelConfig.from_dict(raw).torch_dtype == _hf("Qwen3ForCausalLM", raw).dtype == torch.bfloat16
    assert ModelConfig.from_dict({**raw, "dtype": None}).torch_dtype == torch.float32
    del raw["dtype"]
    raw["torch_dtype"] = "bfloat16"  # (the older name alone)
    assert ModelConfig.from_dict(raw).torch_dtype == _hf("Qwen3ForCausalLM", raw).dtype == torch.bfloat16


def test_token_id_fields_take_id_0_and_refuse_negative_ids():
    """An id field is an integer >= 0 (0 is many checkpoints' end-of-sequence id), a list of
    them or null; a negative id is refused naming the field."""
    from engine.config import token_id_list
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", eos_token_id=0)).eos_token_ids == [0]
    assert token_id_list([0, 5], "f") == [0, 5] and token_id_list(None, "f") == []
    for bad in (-1, [2, -1]):
        with pytest.raises(ValueError, match=re.escape(f"config.json's eos_token_id={bad!r} must be a token id")):
            ModelConfig.from_dict(_raw("LlamaForCausalLM", eos_token_id=bad))


# --- weight files

def _copy(tmp_path, model_dir, name, variant="llama"):
    d = str(tmp_path / name)
    shutil.copytree(model_dir(variant), d)
    return d


def test_a_shard_holds_a_stale_copy_the_index_maps_elsewhere(tmp_path, model_dir):
    """Sharded: each tensor comes from the shard the index names (a stale copy of
    model.norm.weight in the other shard, and a tensor the index does not list, are ignored)."""
    from engine import LLM
    d = _copy(tmp_path, model_dir, "sharded")
    ids = random_ids(9, VARIANTS["llama"]["vocab"], 5)
    want = LLM(d, kv_cache_tokens=256).score(ids)[0]
    w = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(w)
    a, b = names[: len(names) // 2], names[len(names) // 2:]
    assert "model.norm.weight" in b
    save_file({**{k: w[k] for k in a}, "model.norm.weight": torch.zeros_like(w["model.norm.weight"]),
               "model.unlisted.weight": torch.zeros(3)}, os.path.join(d, "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    save_file({k: w[k] for k in b}, os.path.join(d, "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    assert torch.equal(LLM(d, kv_cache_tokens=256).score(ids)[0], want)


@pytest.mark.parametrize("fname", ["model.bin", "consolidated.pth", "model.pt", "model.ckpt",
                                   "pytorch_model.bin.index.json"])
def test_every_pickled_spelling_is_named(tmp_path, model_dir, fname):
    from engine import LLM
    d = _copy(tmp_path, model_dir, "pickled")
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, fname), "wb").write(b"\x80\x04pickle")
    with pytest.raises(ValueError, match=f"{fname} in .* is a pickled checkpoint; Loom loads only safetensors"):
        LLM(d, kv_cache_tokens=256)


@pytest.mark.parametrize("kind", ["fifo", "dir"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_checkpoint_file_that_is_not_a_regular_file_is_named(tmp_path, model_dir, kind, layout):
    """A FIFO named like a checkpoint file blocked the open until something wrote to it
    (safetensors holds the GIL there: a process writes after 20 s so that the old behaviour
    fails instead of hanging); a directory so named failed in safetensors. Both: one error
    naming the file."""
    import subprocess
    from engine import LLM
    d = _copy(tmp_path, model_dir, f"odd_{kind}_{layout}")
    w = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    odd = os.path.join(d, "model-00001-of-00001.safetensors" if layout == "sharded" else "weights.safetensors")
    if layout == "sharded":
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: os.path.basename(odd) for k in w}}, f)
    os.mkfifo(odd) if kind == "fifo" else os.mkdir(odd)
    writer = subprocess.Popen(["sh", "-c", 'sleep 20; : > "$0"', odd]) if kind == "fifo" else None
    try:
        with pytest.raises(ValueError, match=f"{os.path.basename(odd)} .*is not a regular file"):
            LLM(d, kv_cache_tokens=256)
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()


def test_a_missing_shard_is_named(tmp_path, model_dir):
    from engine import LLM
    d = _copy(tmp_path, model_dir, "missing_shard")
    w = load_file(os.path.join(d, "model.safetensors"))
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in w}
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors named in .* is missing"):
        LLM(d, kv_cache_tokens=256)


def _edit(tmp_path, model_dir, name, variant, edit):
    d = _copy(tmp_path, model_dir, name, variant)
    f = os.path.join(d, "model.safetensors")
    w = load_file(f)
    edit(w)
    save_file(w, f, metadata={"format": "pt"})
    return d


def test_an_untied_checkpoint_without_lm_head_is_refused(tmp_path, model_dir):
    from engine import LLM
    d = _edit(tmp_path, model_dir, "no_head", "llama", lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        LLM(d, kv_cache_tokens=256)


def test_tensors_outside_the_model_and_rotary_inv_freq_are_ignored(tmp_path, model_dir):
    """Older Llama checkpoints store rotary_emb.inv_freq buffers; other heads' tensors
    (outside model.* / lm_head.*) are not part of the causal LM: both load, same logits."""
    from engine import LLM
    ids = random_ids(9, VARIANTS["llama"]["vocab"], 5)
    want = LLM(model_dir("llama"), kv_cache_tokens=256).score(ids)[0]
    for name in ("model.layers.0.self_attn.rotary_emb.inv_freq", "value_head.weight"):
        d = _edit(tmp_path, model_dir, name.replace(".", "_"), "llama",
                  lambda w: w.__setitem__(name, torch.ones(8)))
        assert torch.equal(LLM(d, kv_cache_tokens=256).score(ids)[0], want), name


def test_a_head_dim_the_weights_lack_is_refused_before_the_rope_tables(tmp_path, model_dir):
    """config.json's head_dim sizes the RoPE tables: it is checked against the weights first
    (10**12 asked the allocator for terabytes: a RuntimeError, or at 10**9 6 GB and 19 s)."""
    from engine import LLM
    d = _copy(tmp_path, model_dir, "huge_head_dim")
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, "head_dim": 2 * 10**12}, f)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape .* "
                                         r"\(num_attention_heads x head_dim, hidden_size\)"):
        LLM(d, kv_cache_tokens=256)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_a_tensor_that_is_not_floating_point_is_refused(tmp_path, model_dir, dtype):
    """Integer (quantized) or bool weights without a quantization_config: refused, not cast
    to floats (the cast's model is another one: silently wrong text)."""
    from engine import LLM
    name = "model.layers.1.mlp.down_proj.weight"
    d = _edit(tmp_path, model_dir, f"int_{dtype}".replace("torch.", ""), "llama",
              lambda w: w.__setitem__(name, (w[name] * 100).to(dtype)))
    with pytest.raises(ValueError, match=f"'{name}' is {str(dtype)[6:]}, not floating point: the checkpoint "
                                         "is quantized"):
        LLM(d, kv_cache_tokens=256)


_AS_ANOTHER_USER = r"""
import os, sys
from engine import LLM
if os.geteuid() == 0:  # (root reads everything: the files' modes are tested as nobody)
    LLM(sys.argv[2], kv_cache_tokens=256)  # (first, as root: every module and the ops loaded, wherever
    os.setgid(65534)                       # the checkout and the venv are and whoever may read them)
    os.setuid(65534)
try:
    LLM(sys.argv[1], kv_cache_tokens=256)
    print("loaded")
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_files_this_user_cannot_read_are_named_as_such(model_dir):
    """A model directory or file without read permission: a PermissionError naming it (the
    directory read as 'config.json not found: not a Hugging Face model directory', the
    safetensors file as 'No such file or directory ... corrupt: download it again')."""
    import subprocess
    import sys
    import tempfile
    from engine import LLM
    root = tempfile.mkdtemp()  # (not pytest's tmp_path: its parent is private to its owner)
    try:
        os.chmod(root, 0o755)
        cases = {"model.safetensors": "model.safetensors cannot be read by this user \\(permission denied\\); "
                                      "give it read access",
                 "tokenizer.json": "tokenizer.json cannot be read by this user \\(permission denied\\)",
                 ".": "Model directory .* cannot be read by this user \\(permission denied\\)"}
        for i, (name, want) in enumerate(cases.items()):
            d = os.path.join(root, f"m{i}")
            shutil.copytree(model_dir("llama"), d)
            os.chmod(d, 0o755)
            for f in os.listdir(d):
                os.chmod(os.path.join(d, f), 0o644)
            os.chmod(os.path.join(d, name), 0o600 if name == "." else 0)
            out = subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER, d, model_dir("llama")],
                                 capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()
            assert out and re.match(f"PermissionError: .*{want}", out[-1]), (name, out)
        # a link to nothing (an unfinished Hugging Face cache download) is not a permission problem
        d = os.path.join(root, "dangling")
        shutil.copytree(model_dir("llama"), d)
        os.remove(os.path.join(d, "model.safetensors"))
        os.symlink("../../blobs/absent", os.path.join(d, "model.safetensors"))
        with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
            LLM(d, kv_cache_tokens=256)
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("fname", ["config.json", "tokenizer_config.json", "generation_config.json",
                                   "special_tokens_map.json", "model.safetensors.index.json"])
def test_json_nested_too_deeply_is_named(tmp_path, model_dir, fname):
    """JSON nested deeper than Python's parser recurses: one ValueError naming the file (it
    was a bare RecursionError, a traceback on the command line)."""
    from engine import LLM
    d = _copy(tmp_path, model_dir, "deep")
    if fname == "model.safetensors.index.json":
        os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00001.safetensors"))
    with open(os.path.join(d, fname), "w") as f:
        f.write('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=f"{fname} is not a (JSON file Loom can read: it nests|valid safetensors index)"):
        LLM(d, kv_cache_tokens=256)


def test_a_path_with_an_unexpanded_tilde_says_so(tmp_path, model_dir, monkeypatch):
    """'~/model' reaches the engine unexpanded when quoted or written '--model=~/model': the error
    names the expanded path (it said only that the directory does not exist)."""
    from engine import LLM
    _copy(tmp_path, model_dir, "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"'~/m' does not exist: '~' is not expanded here; pass "
                                                f"'{tmp_path}/m'"):
        LLM("~/m", kv_cache_tokens=256)
    with pytest.raises(FileNotFoundError, match="'~/absent' does not exist; pass a local Hugging Face"):
        LLM("~/absent", kv_cache_tokens=256)


def test_a_tokenizer_bigger_than_the_model_is_named_when_it_makes_an_id_the_model_lacks(tmp_path, model_dir):
    """tokenizer.json with more tokens than the model has rows: a text (or a BOS) that encodes to
    one of them names the mismatch (it said only 'Token id 900 is outside the vocabulary')."""
    from conftest import build_tokenizer
    from engine import LLM, SamplingParams
    d = _copy(tmp_path, model_dir, "big_tokenizer")
    tok = build_tokenizer(1000)
    tok.save(os.path.join(d, "tokenizer.json"))
    llm = LLM(d, kv_cache_tokens=256)
    text = tok.decode([900])
    assert 900 in llm.tokenizer.encode(text)
    want = (r"Token id 9\d\d is outside the vocabulary \[0, 384\)\. The tokenizer has it \(1000 tokens\) but the "
            r"model's vocab_size is 384: tokenizer.json does not belong to these weights")
    for call in (lambda: llm.generate(text, SamplingParams(max_tokens=2)), lambda: llm.session(text),
                 lambda: llm.chat([{"role": "user", "content": text}], SamplingParams(max_tokens=2))):
        with pytest.raises(ValueError, match=want):
            call()
    with pytest.raises(ValueError, match=r"Token id 1000 is outside the vocabulary \[0, 384\)\.$"):
        llm.generate([[1, 1000]], SamplingParams(max_tokens=2))  # (an id the tokenizer lacks too)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "rope_theta": 10000.0, "factor": 1e-300},
                                  {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 512, "attention_factor": 1e300}])
def test_rope_settings_that_overflow_float32_are_refused(tmp_path, model_dir, rope):
    """Valid numbers whose frequencies / attention factor are not finite in float32 (a linear
    factor of 1e-300): refused naming config.json's RoPE settings (the model loaded and every
    logit was NaN, which the engine blamed on the weights)."""
    from engine import LLM
    d = _copy(tmp_path, model_dir, "rope_overflow")
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = rope
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"config.json's RoPE settings .* not finite in float32"):
        LLM(d, kv_cache_tokens=256)


def test_a_tokenizer_that_panics_on_a_text_gives_one_value_error(tmp_path, model_dir):
    """A tokenizer.json pattern that backtracks past Oniguruma's limit on some text: the tokenizers
    library panics, which pyo3 raises as a PanicException (a BaseException: `except Exception`
    missed it, the command line printed a traceback). One ValueError naming tokenizer.json; the
    engine works on."""
    from engine import LLM, SamplingParams
    d = _copy(tmp_path, model_dir, "regex_tokenizer")
    path = os.path.join(d, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a|a)+$"}, "behavior": "Isolated", "invert": False},
        tok["pre_tokenizer"]]}
    with open(path, "w") as f:
        json.dump(tok, f)
    llm = LLM(d, kv_cache_tokens=256)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    want = llm.generate("hello", greedy)[0].outputs[0].token_ids
    bad = "a" * 40 + "b"
    for call in (lambda: llm.generate(bad, greedy), lambda: llm.chat([{"role": "user", "content": bad}], greedy),
                 lambda: llm.session(bad)):
        with pytest.raises(ValueError, match=r"tokenizer \(tokenizer.json\) failed on this text \(.*retry-limit"):
            call()
    assert llm.generate("hello", greedy)[0].outputs[0].token_ids == want
    assert llm.cache_stats()["pages_free"] == llm.cache_stats()["pages_total"]


def test_a_model_path_that_is_not_utf8_is_named(tmp_path, model_dir):
    """A directory name with bytes that are not UTF-8 (Linux allows them): one error saying so (the
    tokenizers library could not take the path: 'tokenizer.json is not a readable tokenizer file ...
    download it again')."""
    from engine import LLM
    d = os.path.join(str(tmp_path), os.fsdecode(b"m\xff"))
    shutil.copytree(model_dir("llama"), d)
    with pytest.raises(ValueError, match="has a name that is not UTF-8.*rename it"):
        LLM(d, kv_cache_tokens=256)
    os.symlink(d, str(tmp_path / "m"))  # (the fix the error names)
    assert LLM(str(tmp_path / "m"), kv_cache_tokens=256).score([5, 6])[0].shape == (2, VARIANTS["llama"]["vocab"])


def test_weights_larger_than_the_available_memory_are_refused_before_loading(model_dir, monkeypatch):
    """A checkpoint whose weights (in the run's dtype) exceed the machine's available memory is
    refused before any is loaded, as a too-large KV cache is (it was loaded until the kernel
    killed the process). The machine's memory is faked: 100 KB available."""
    import engine.llm
    from engine import LLM
    monkeypatch.setattr(engine.llm, "available_memory", lambda: 100_000)
    with pytest.raises(ValueError, match=r"weights take 0\.0 GiB in float32, more than this machine's available "
                                         r"memory \(0\.0 GiB\): the process would be killed while loading them"):
        LLM(model_dir("llama"), kv_cache_tokens=256)
    monkeypatch.setattr(engine.llm, "available_memory", lambda: 1 << 40)
    assert LLM(model_dir("llama"), kv_cache_tokens=256).score([5, 6])[0].shape[0] == 2


def test_a_hugging_face_cache_snapshot_loads_and_its_repository_folder_names_it(tmp_path, model_dir):
    """The hub cache's layout: snapshots/<commit>/<file> links to ../../blobs/<hash>. A snapshot
    loads as the directory it is (the same log-probs); the repository folder above it, which users
    pass, names its snapshots (it said 'config.json not found: not a Hugging Face model directory')."""
    from engine import LLM
    src, repo = model_dir("llama"), tmp_path / "models--org--name"
    snap = repo / "snapshots" / "0123abc"
    os.makedirs(repo / "blobs")
    os.makedirs(snap)
    for i, f in enumerate(sorted(os.listdir(src))):
        shutil.copy(os.path.join(src, f), repo / "blobs" / f"sha{i}")
        os.symlink(f"../../blobs/sha{i}", snap / f)
    ids = random_ids(7, VARIANTS["llama"]["vocab"], 3)
    assert torch.equal(LLM(str(snap), kv_cache_tokens=256).score(ids)[0], LLM(src, kv_cache_tokens=256).score(ids)[0])
    with pytest.raises(FileNotFoundError, match=f"is a Hugging Face cache's repository folder, not a model directory; "
                                                f"pass one of its snapshots: '{snap}'"):
        LLM(str(repo), kv_cache_tokens=256)


def test_a_model_directory_with_a_snapshots_folder_and_one_without_config_json(tmp_path):
    """Only a folder without config.json is taken for a cache's repository folder: a model
    directory that also holds a 'snapshots' folder reads its config.json, and one with neither
    says config.json is missing."""
    d = tmp_path / "model"
    os.makedirs(d / "snapshots")
    with open(d / "config.json", "w") as f:
        json.dump(_raw("LlamaForCausalLM"), f)
    assert ModelConfig.from_dir(str(d)).architecture == "LlamaForCausalLM"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json not found: .* is not a Hugging Face model directory"):
        ModelConfig.from_dir(str(tmp_path / "empty"))


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"])
def test_flags_that_are_not_json_booleans_are_refused(key):
    """"false" as a string is true to Python: attention_bias "false" asked the checkpoint for biases
    (a 'missing tensor q_proj.bias' error), use_sliding_window "false" capped the context."""
    for bad in ("false", 2):  # (2: true to Python too; transformers' strict config refuses it)
        with pytest.raises(ValueError, match=f"config.json's {key}={bad!r} must be true or false"):
            ModelConfig.from_dict(_raw("Qwen2ForCausalLM", **{key: bad}))
    assert ModelConfig.from_dict(_raw("Qwen2ForCausalLM", **{key: False}))
    assert ModelConfig.from_dict(_raw("Qwen2ForCausalLM", **{key: None}))


def test_a_tokenizer_files_truncation_and_padding_are_ignored_as_transformers_does(tmp_path, model_dir):
    """tokenizer.json may carry truncation / padding settings (saved after enable_truncation /
    enable_padding): the tokenizers library applies them to every encode, so a prompt was cut to
    max_length 4 and padded with the pad id (here EOS) to 12 tokens. transformers ignores them
    unless a call asks; so does Loom, for prompts and for headers / injected text."""
    from transformers import AutoTokenizer
    from engine import LLM, SamplingParams
    d = _copy(tmp_path, model_dir, "truncating_tokenizer")
    path = os.path.join(d, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    tok["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    tok["padding"] = {"strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                      "pad_type_id": 0, "pad_token": "<|eos|>"}
    tok["pre_tokenizer"]["add_prefix_space"] = True  # (a continuation tokenizer of its own is built)
    with open(path, "w") as f:
        json.dump(tok, f)
    text = "hello world how are you today my friend"
    want = AutoTokenizer.from_pretrained(d)(text)["input_ids"]
    llm = LLM(d, kv_cache_tokens=256)
    assert len(want) > 12 and llm.tokenizer.encode(text) == want
    assert len(llm.tokenizer.encode_continuation(text)) == len(want)
    out = llm.generate(text, SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.prompt_token_ids == want


@pytest.mark.parametrize("fields,msg", [
    (dict(head_dim=15), "head_dim=15 must be even for rotary embeddings"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported; Loom implements 'silu'"),
    (dict(num_attention_heads=3, num_key_value_heads=2, head_dim=16),
     "num_attention_heads=3 must be a multiple of num_key_value_heads=2"),
])
def test_a_config_loom_cannot_run_is_refused(fields, msg):
    """A model whose rotary halves, activation or head grouping Loom's kernels do not
    implement is refused when its config is read, naming the field."""
    with pytest.raises(ValueError, match=re.escape(msg)):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", **fields))
    ModelConfig.from_dict(_raw("LlamaForCausalLM", hidden_act="swish"))  # (silu's other name)


def test_a_single_file_checkpoint_wins_over_a_stale_index(tmp_path):
    """model.safetensors is read even beside a model.safetensors.index.json (as transformers:
    an index may be left over from a sharded save), which is not looked at."""
    from engine.loader import safetensor_files
    d = str(tmp_path)
    open(os.path.join(d, "model.safetensors"), "wb").close()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
    assert safetensor_files(d) == [os.path.join(d, "model.safetensors")]


@pytest.mark.parametrize("weight_map", [["model-00001-of-00001.safetensors"], "model-00001-of-00001.safetensors", None])
def test_an_index_whose_weight_map_is_not_an_object_is_named(tmp_path, weight_map):
    """A weight_map that is not an object (a list, a string, null) gives the one clear
    'not a valid safetensors index' error, not an AttributeError from reading it."""
    from engine.loader import safetensor_files
    d = str(tmp_path)
    open(os.path.join(d, "model-00001-of-00001.safetensors"), "wb").close()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(ValueError, match="is not a valid safetensors index .*weight_map is not an object"):
        safetensor_files(d)


def test_config_number_fields_at_their_bounds():
    """The edges of config.json's number checks: a JSON true is not a size or an rms_norm_eps
    (Python's bool is an int; transformers' strict config classes refuse it too), rms_norm_eps
    may be 0 but not a string, rope_theta must be above 1 (1 makes every rotation 0), a yarn
    mscale may be 0 (transformers reads it as absent) but not false."""
    with pytest.raises(ValueError, match="config.json's vocab_size=True must be a positive integer"):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", vocab_size=True))
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", rms_norm_eps=0)).rms_norm_eps == 0
    for bad in (True, "1e-6"):
        with pytest.raises(ValueError, match=re.escape(f"rms_norm_eps={bad!r} must be a number >= 0")):
            ModelConfig.from_dict(_raw("LlamaForCausalLM", rms_norm_eps=bad))
    rope = {"rope_type": "yarn", "factor": 4.0}
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", rope_scaling={**rope, "mscale": 0})).rope_scaling["mscale"] == 0
    with pytest.raises(ValueError, match=re.escape("rope scaling 'yarn': mscale=False must be a number > 0")):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", rope_scaling={**rope, "mscale": False}))
    with pytest.raises(ValueError, match="rms_norm_eps=-1e-06 must be a number >= 0"):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", rms_norm_eps=-1e-6))
    with pytest.raises(ValueError, match="rope_theta=1 must be a number > 1"):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", rope_theta=1))
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", rope_theta=1.5)).rope_theta == 1.5


def test_a_hidden_size_smaller_than_the_heads_without_head_dim_is_refused():
    """No head_dim and hidden_size // num_attention_heads = 0: refused (a head of 0 or 2 dims
    made up would load, or fail later on the weights); transformers' LlamaConfig refuses a
    hidden_size that is not a multiple of the heads."""
    with pytest.raises(ValueError, match="head_dim=1 must be even"):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", hidden_size=4, num_attention_heads=8, num_key_value_heads=8))
    assert ModelConfig.from_dict(_raw("LlamaForCausalLM", hidden_size=4, num_attention_heads=8,
                                      num_key_value_heads=8, head_dim=2)).head_dim == 2


def test_only_mistrals_head_dim_zero_is_derived():
    """Mistral's modules take ``head_dim or hidden_size // heads`` (0 runs as hidden / heads:
    test_models_hf); any other head_dim is kept as written (8, not 32 // 2), and Llama's 0 is
    refused (its modules take 0 as written)."""
    assert ModelConfig.from_dict(_raw("MistralForCausalLM", sliding_window=None, head_dim=8)).head_dim == 8
    with pytest.raises(ValueError, match="config.json's head_dim=0 must be a positive integer"):
        ModelConfig.from_dict(_raw("LlamaForCausalLM", head_dim=0))


def test_a_window_wider_than_the_context_leaves_the_context():
    """A sliding window caps the context only when it is smaller: a Mistral window of 4096
    (its default) over a 128-token context leaves 128 (it must not raise it)."""
    for raw in (_raw("MistralForCausalLM"), _raw("MistralForCausalLM", sliding_window=4096)):
        cfg = ModelConfig.from_dict(raw)
        assert (cfg.max_position_embeddings, cfg.context_source) == (128, "max_position_embeddings")
    cfg = ModelConfig.from_dict(_raw("MistralForCausalLM", sliding_window=128))  # (as wide: nothing capped)
    assert (cfg.max_position_embeddings, cfg.context_source) == (128, "max_position_embeddings")
    cfg = ModelConfig.from_dict(_raw("MistralForCausalLM", sliding_window=64))
    assert cfg.max_position_embeddings == 64 and cfg.context_source.startswith("sliding_window")


@pytest.mark.parametrize("mt,arch", [("mistral", "LlamaForCausalLM"), ("llama", "Qwen2ForCausalLM"),
                                     ("gemma", "LlamaForCausalLM"), (["llama"], "LlamaForCausalLM")])
def test_a_model_type_that_names_another_model_than_architectures_is_refused(mt, arch):
    """transformers' AutoModelForCausalLM builds the model model_type names, not architectures':
    model_type "mistral" over LlamaForCausalLM weights runs them with Mistral's sliding window,
    which Loom, reading architectures, did not apply (logits off by ~5 past the window)."""
    import transformers as tf
    if isinstance(mt, str) and mt != "gemma":
        hf = tf.AutoConfig.for_model(**{k: v for k, v in _raw(arch, sliding_window=8).items() if k != "architectures"}
                                     | {"model_type": mt})
        assert tf.MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)].__name__ != arch  # (the class transformers builds)
    with pytest.raises(ValueError, match=r"model_type=.* and architectures=.* name different models"):
        ModelConfig.from_dict(_raw(arch, model_type=mt, sliding_window=8))
    assert ModelConfig.from_dict(_raw(arch, model_type={"LlamaForCausalLM": "llama",
                                                       "Qwen2ForCausalLM": "qwen2"}[arch])).architecture == arch


@pytest.mark.parametrize("fields,msg", [
    (dict(max_window_layers=None), "max_window_layers=None must be an integer"),
    (dict(max_window_layers="2"), "max_window_layers='2' must be an integer"),
    (dict(layer_types="sliding_attention"), "layer_types='sliding_attention' must be a list of num_hidden_layers=3"),
    (dict(layer_types=["sliding_attention"]), "must be a list of num_hidden_layers=3 names"),
])
def test_window_layer_fields_of_the_wrong_type_are_named(fields, msg):
    """A Qwen window's max_window_layers / layer_types that transformers' config refuses: a null or
    string max_window_layers crashed with a TypeError ('>=' not supported), a string layer_types
    was searched as text; now one ValueError naming the field."""
    raw = _raw("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8, **fields)
    with pytest.raises(ValueError, match=re.escape(msg)):
        ModelConfig.from_dict(raw)
    ok = _raw("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8, max_window_layers=-1,
              layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert ModelConfig.from_dict(ok).max_position_embeddings == 8


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}])
def test_scaled_rope_without_any_context_field_takes_the_architectures_default(arch, rope):
    """yarn / llama3 with neither original_max_position_embeddings nor max_position_embeddings:
    transformers fills the class's default context for both (Llama 2,048, Qwen 32,768, Mistral
    131,072), and so does Loom (it refused such a config as incomplete)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from engine.rope import compute_inv_freq
    raw = _raw(arch, sliding_window=None, rope_parameters={**rope, "rope_theta": 1e4})
    del raw["max_position_embeddings"]
    hf, cfg = _hf(arch, raw), ModelConfig.from_dict(copy.deepcopy(raw))
    assert cfg.rope_scaling["original_max_position_embeddings"] == hf.rope_parameters["original_max_position_embeddings"] \
        == hf.max_position_embeddings
    inv_hf, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    assert torch.allclose(compute_inv_freq(cfg), inv_hf.float(), rtol=1e-6, atol=0)


def test_proportional_rope_takes_a_top_level_partial_rotary_factor():
    """transformers moves a top-level partial_rotary_factor into the RoPE parameters, which
    'proportional' RoPE reads (half of each head's pairs rotated here), as Loom does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from engine.rope import compute_inv_freq
    raw = _raw("LlamaForCausalLM", partial_rotary_factor=0.5, rope_parameters={"rope_type": "proportional",
                                                                              "rope_theta": 1e4})
    hf, cfg = _hf("LlamaForCausalLM", raw), ModelConfig.from_dict(copy.deepcopy(raw))
    assert cfg.rope_scaling["partial_rotary_factor"] == hf.rope_parameters["partial_rotary_factor"] == 0.5
    inv_hf, _ = ROPE_INIT_FUNCTIONS["proportional"](hf, "cpu")
    assert torch.allclose(compute_inv_freq(cfg), inv_hf.float(), rtol=1e-6, atol=0)
    assert (compute_inv_freq(cfg) == 0).sum() == cfg.head_dim // 4


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0}])
def test_partial_rotary_factor_refusal_says_what_transformers_does(rope):
    """A partial_rotary_factor below 1 is refused saying what transformers 5 does with it, which
    depends on the RoPE type: default RoPE ignores it (whole heads rotated), the scaled types
    fail on it (q * cos over a head and a part of it). The message claimed, for every type, that
    transformers 5 ignores it and 4.x rotated part of each head (4.x's Llama code never did:
    it ignored the field, or, once its RoPE functions read it, failed as 5.x's scaled types do)."""
    import transformers as tf
    raw = _raw("LlamaForCausalLM", rope_parameters={**rope, "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    config = tf.LlamaConfig(**{k: v for k, v in copy.deepcopy(raw).items() if k != "architectures"})
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        if rope["rope_type"] == "default":
            model(torch.tensor([[1, 2, 3]]))  # (it runs: the field is ignored)
            msg = "partial_rotary_factor=0.5: Loom rotates whole heads, as transformers 5's .* ignores the field"
        else:
            with pytest.raises(RuntimeError, match="must match the size"):
                model(torch.tensor([[1, 2, 3]]))
            msg = f"transformers 5's .* fails on it with rope scaling '{rope['rope_type']}'"
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_dict(raw)
    for bad in (1.5, 0, "0.5"):
        with pytest.raises(ValueError, match=re.escape(f"partial_rotary_factor={bad!r} must be a number in (0, 1]")):
            ModelConfig.from_dict(_raw("LlamaForCausalLM", partial_rotary_factor=bad))
