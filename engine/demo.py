"""Tiny models made on the fly: a byte-level tokenizer and random weights.

Used by tests and benchmarks (``loom demo`` runs the trained model in engine/assets).
Writes a standard Hugging Face directory, so it loads like any checkpoint.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_byte_tokenizer(model_dir: str, extra_special: list[str] = ()) -> int:
    """Byte-level tokenizer (256 byte tokens + specials). Returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + list(extra_special)
    tok.add_special_tokens(specials)
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
                   "pad_token": "<|endoftext|>"}, f, indent=1)
    return tok.get_vocab_size()


def qwen3_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, intermediate: int, max_pos: int = 4096) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "float32",
    }


def random_weights(cfg: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    w = {"model.embed_tokens.weight": rnd(V, H, s=1.0), "model.norm.weight": 1 + rnd(H, s=0.1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1 + rnd(H, s=0.1),
            p + "post_attention_layernorm.weight": 1 + rnd(H, s=0.1),
            p + "self_attn.q_proj.weight": rnd(nh * D, H), p + "self_attn.k_proj.weight": rnd(nkv * D, H),
            p + "self_attn.v_proj.weight": rnd(nkv * D, H), p + "self_attn.o_proj.weight": rnd(H, nh * D),
            p + "self_attn.q_norm.weight": 1 + rnd(D, s=0.1), p + "self_attn.k_norm.weight": 1 + rnd(D, s=0.1),
            p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
            p + "mlp.down_proj.weight": rnd(H, I),
        })
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rnd(V, H, s=0.1)
    return w


def make_random_model(model_dir: str, hidden: int = 256, layers: int = 4, heads: int = 8,
                      kv_heads: int = 4, head_dim: int = 32, intermediate: int = 768,
                      seed: int = 0, max_pos: int = 4096, vocab_size: int | None = None,
                      tie_word_embeddings: bool = False) -> str:
    """A random-weight Qwen3-shaped model with a byte tokenizer, in ``model_dir``.
    ``vocab_size`` may exceed the tokenizer's (benchmarks feed token ids directly)."""
    os.makedirs(model_dir, exist_ok=True)
    V = write_byte_tokenizer(model_dir)
    eos = V - 1  # <|im_end|>
    if vocab_size is not None:
        if vocab_size < V:
            raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {V} tokens.")
        V = vocab_size
    cfg = qwen3_config(V, hidden, layers, heads, kv_heads, head_dim, intermediate, max_pos)
    cfg["tie_word_embeddings"] = tie_word_embeddings
    cfg["eos_token_id"] = eos
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos}, f)
    save_file({k: v.contiguous() for k, v in random_weights(cfg, seed).items()},
              os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    return model_dir
