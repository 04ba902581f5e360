"""Random tiny Hugging Face checkpoints, built in-process with transformers, and their references.

Every checkpoint is what a real one looks like on disk: ``config.json`` and
``model.safetensors`` written by ``save_pretrained``, a ``tokenizer.json`` (a byte-level
BPE trained here on ASCII text, so that every token decodes to clean text),
``tokenizer_config.json`` with a jinja ``chat_template`` (one variant has none) and
``generation_config.json`` naming the EOS token. All weights are random with a fixed
seed, norms and biases included, large enough that logits are far from flat.

Fixtures are session-scoped caches: each model directory, each Hugging Face reference
model and each engine ``LLM`` is built once.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import random
import sys

import pytest
import torch

# the engine package lives at the repo root; the tests run it however pytest is launched when
# it has its compiled ops (an editable install, build_ext --inplace), else an installed Loom
# (`pip install .`, a wheel: the source tree of an sdist has no engine._C), else the source
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILT = glob.glob(os.path.join(_ROOT, "engine", "_C*"))
if (_BUILT or importlib.util.find_spec("engine") is None) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 0, 1  # BpeTrainer puts the special tokens first, in order

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                # small on purpose: with head_dim 16 the wavelengths 6.3 / 19.9 / 63+ fall in the
                # unscaled / smoothed / scaled bands of llama3 scaling
                "original_max_position_embeddings": 32}

# name -> architecture and shape. ``legacy`` rewrites config.json the way pre-v5 checkpoints
# spell RoPE (top-level ``rope_theta`` + ``rope_scaling``, ``torch_dtype``).
VARIANTS: dict[str, dict] = {
    # GQA 1, untied, default RoPE
    "llama": dict(arch="LlamaForCausalLM", vocab=384, hidden=64, heads=4, kv_heads=4, tie=False,
                  rope={"rope_type": "default", "rope_theta": 10000.0}),
    # GQA 2, tied, llama3 RoPE scaling written by transformers 5 (rope_parameters)
    "llama3_rope": dict(arch="LlamaForCausalLM", vocab=320, hidden=64, heads=4, kv_heads=2, tie=True,
                        rope=_LLAMA3_ROPE),
    # the same, spelled as a Llama-3.1 checkpoint spells it (rope_scaling + rope_theta)
    "llama3_legacy": dict(arch="LlamaForCausalLM", vocab=320, hidden=64, heads=4, kv_heads=2, tie=True,
                          rope=_LLAMA3_ROPE, legacy=True),
    # GQA 3, linear RoPE scaling in the old {"type": "linear"} spelling
    "llama_linear": dict(arch="LlamaForCausalLM", vocab=384, hidden=96, heads=6, kv_heads=2, tie=False,
                         rope={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0},
                         legacy=True),
    # GQA 3, tied, random q/k/v biases
    "qwen2": dict(arch="Qwen2ForCausalLM", vocab=512, hidden=96, heads=6, kv_heads=2, tie=True,
                  rope={"rope_type": "default", "rope_theta": 1000000.0}),
    # GQA 3, YaRN: a 512-token pretraining context x 4 (head_dim 16: the ramp spans dims 0-4
    # of 8, so some frequencies are kept, some interpolated, some between); attention factor
    # from mscale / mscale_all_dim
    "qwen2_yarn": dict(arch="Qwen2ForCausalLM", vocab=320, hidden=96, heads=6, kv_heads=2, tie=False,
                       rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 512, "mscale": 1.3, "mscale_all_dim": 0.6}),
    "qwen3": dict(arch="Qwen3ForCausalLM", vocab=384, hidden=64, heads=4, kv_heads=2, head_dim=32,
                  tie=False, rope={"rope_type": "default", "rope_theta": 1000000.0}),
    # GQA 2, biases on every attention projection (o_proj too) and on the MLP
    "llama_bias": dict(arch="LlamaForCausalLM", vocab=320, hidden=64, heads=4, kv_heads=2, tie=True,
                       rope={"rope_type": "default", "rope_theta": 10000.0},
                       extra=dict(attention_bias=True, mlp_bias=True)),
    # GQA 4 (one KV head), no chat template
    "mistral": dict(arch="MistralForCausalLM", vocab=320, hidden=64, heads=4, kv_heads=1, tie=False,
                    rope={"rope_type": "default", "rope_theta": 10000.0}, chat_template=False),
}


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------

def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + ["th", "ing", "er", "st", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(16)) + rng.choice(".!?,\n") for _ in range(600)]
    lines.append("".join(chr(c) for c in range(32, 127)))  # every printable ASCII character
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE whose vocabulary is exactly ``vocab_size`` (special tokens at 0..3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tok


def _hf_classes(arch: str):
    import transformers as tf
    return {
        "LlamaForCausalLM": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "Qwen2ForCausalLM": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "Qwen3ForCausalLM": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "MistralForCausalLM": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]


@torch.no_grad()
def randomize_(model, seed: int, std: float = 0.2) -> None:
    """Every parameter random: norms in [0.6, 1.4], biases and matrices normal(0, std)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name:
            p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


def _legacy_rope(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json as an older checkpoint spells it."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rtype = rope.pop("rope_type")
    if rtype == "linear":
        cfg["rope_scaling"] = {"type": "linear", **rope}  # Llama-2-era spelling
    elif rtype != "default":
        cfg["rope_scaling"] = {**rope, "rope_type": rtype}  # Llama-3.1 spelling
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build_model_dir(path: str, spec: dict, seed: int = 0) -> str:
    """Build a random tiny checkpoint of ``spec`` (see ``VARIANTS``) into ``path``."""
    cfg_cls, model_cls = _hf_classes(spec["arch"])
    kw = dict(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec.get("inter", 128),
        num_hidden_layers=spec.get("layers", 2), num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec.get("head_dim", spec["hidden"] // spec["heads"]),
        rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=spec["tie"],
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
        rope_parameters=dict(spec["rope"]),
        **spec.get("extra", {}),
    )
    config = cfg_cls(**kw)
    config.architectures = [spec["arch"]]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed)
    if spec["tie"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(path)
    cfg_path = os.path.join(path, "config.json")
    cfg = read_json(cfg_path)
    if spec.get("legacy"):
        write_json(cfg_path, _legacy_rope(cfg))
    write_tokenizer_files(path, spec["vocab"], chat_template=spec.get("chat_template", True))
    write_json(os.path.join(path, "generation_config.json"),
               {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "transformers_version": "5.23.0"})
    return path


def write_tokenizer_files(path: str, vocab_size: int, chat_template: bool = True) -> None:
    build_tokenizer(vocab_size).save(os.path.join(path, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "add_bos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    write_json(os.path.join(path, "tokenizer_config.json"), tok_cfg)


def hf_model(model_dir: str):
    """The reference: transformers in float32, eval mode, eager attention, EOS never stops it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # the engine side runs with ignore_eos=True
    return model


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[P, vocab] float32: row i = log_softmax of the next-token logits after token i."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert len(new) == max_new_tokens
    return new


def i32(values, device="cpu") -> torch.Tensor:
    """An int32 tensor of values (the plans' and the ops' index arrays)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count (the compiled ops' too) set to n inside the block: many rows
    split between threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def engine_held(llm, timeout: float = 30):
    """Another Python thread holds ``llm``'s engine lock (an engine call running there) from
    the block's start until the yielded Event is set, or the block ends; yields (that Event,
    the thread)."""
    import threading
    held, release = threading.Event(), threading.Event()

    def hold():
        with llm._lock:
            held.set()
            release.wait(timeout)
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(timeout)
        yield release, t
    finally:
        release.set()
        t.join(timeout)


def wait_in_line(lock, n: int, timeout: float = 10) -> bool:
    """Whether n threads came to wait for the engine lock within timeout seconds."""
    import time
    end = time.monotonic() + timeout
    while len(lock._line) < n:
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(name)`` -> path of the checkpoint of ``VARIANTS[name]`` (built once)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            cache[name] = build_model_dir(path, VARIANTS[name], seed=sorted(VARIANTS).index(name))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def hf_ref(model_dir):
    """``hf_ref(name)`` -> the float32 transformers reference model of ``VARIANTS[name]``."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = hf_model(model_dir(name))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def make_llm(model_dir):
    """``make_llm(name, **kwargs)`` -> an engine LLM for ``VARIANTS[name]``, cached per kwargs."""
    cache: dict[tuple, object] = {}

    def get(name: str, **kwargs):
        from engine import LLM
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            kwargs.setdefault("device", "cpu")
            cache[key] = LLM(model_dir(name), **kwargs)
        return cache[key]
    return get
