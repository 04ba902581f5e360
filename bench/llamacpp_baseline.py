"""llama.cpp as a same-run baseline for bench_generate.py (optional: needs the PyPI
packages ``llama-cpp-python`` and ``gguf``; the script skips it, saying why, without them).

llama.cpp is the CPU engine people run local models with. Its parallel-sampling recipe
(the ``batched`` example) is what an engine without Loom's thread trees does for n samples
of one prompt: prefill the prompt once as sequence 0, copy that sequence's cache cells to
sequences 1..n-1 in a unified KV cache (no K/V copied), then decode one batch of n tokens
per step. That is what ``LlamaCppRunner`` does, through llama.cpp's C API.

The model is the same random Qwen3-shaped checkpoint, written to GGUF in float32 by
``write_gguf`` from its safetensors (no quantization: the same bytes per weight as Loom).
llama.cpp only ever sees token ids, so the GGUF carries a placeholder vocabulary of the
model's size. ``prefill_logits`` lets the caller check that both engines compute the
same function before comparing their speed.
"""
from __future__ import annotations

import ctypes
import json
import os
import time

import numpy as np


def available() -> str | None:
    """None when the baseline can run, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install llama-cpp-python gguf)"
    return None


def write_gguf(model_dir: str, out_path: str) -> str:
    """The Qwen3 checkpoint in ``model_dir`` (config.json + model.safetensors) as a float32
    GGUF file for llama.cpp's ``qwen3`` architecture."""
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "qwen3":
        raise ValueError(f"write_gguf writes qwen3 models; {model_dir} is {cfg.get('model_type')!r}.")
    L, V = cfg["num_hidden_layers"], cfg["vocab_size"]
    w = gguf.GGUFWriter(out_path, "qwen3")
    w.add_block_count(L)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Placeholder byte-level BPE vocabulary: the 256 byte symbols of GPT-2's byte encoder,
    # then one distinct token per remaining id. Never used to tokenize text here.
    byte_syms = _gpt2_byte_symbols()
    tokens = byte_syms + [f"<loom_{i}>" for i in range(len(byte_syms), V)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * V)
    w.add_token_merges([f"{byte_syms[ord('a')]} {byte_syms[ord('b')]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(int(cfg.get("eos_token_id", V - 1)))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, L)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    for hf_name, t in weights.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _gpt2_byte_symbols() -> list[str]:
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    syms, extra = {}, 0
    for b in range(256):
        if b in keep:
            syms[b] = chr(b)
        else:
            syms[b] = chr(256 + extra)
            extra += 1
    return [syms[b] for b in range(256)]


class LlamaCppRunner:
    """One llama.cpp context for n parallel samples of one prompt (unified KV cache)."""

    def __init__(self, gguf_path: str, n_ctx: int, n_seq: int, n_threads: int, flash_attn: bool):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        if not os.environ.get("LOOM_LLAMA_LOG"):  # llama.cpp's load log, on request only
            self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept alive
            lc.llama_log_set(self._quiet, ctypes.c_void_p())
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(gguf_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = max(n_ctx, 512)
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = n_threads
        # Flash attention: llama.cpp's default ("auto") turns it on for the CPU; on the
        # bench model it makes a step of 8 sequences ~2.5x slower than the plain path.
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.kv_unified = True  # one cache for all sequences: the prompt's cells are shared
        self.kv_elem_bytes = 2 if cp.type_k == 1 else 4  # GGML_TYPE_F16 (the default) or F32
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_n_vocab(lc.llama_model_get_vocab(self.model))
        self.n_seq = n_seq
        self.batch = lc.llama_batch_init(max(n_ctx, 512), 0, n_seq)

    def close(self):
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def _fill(self, toks: list[int], pos: list[int], seqs: list[int], logits: list[bool]):
        b = self.batch
        b.n_tokens = len(toks)
        for i, (t, p, s, lg) in enumerate(zip(toks, pos, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, p, 1
            b.seq_id[i][0] = s
            b.logits[i] = lg

    def _decode(self):
        rc = self.lc.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        p = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.vocab,))

    def reset(self):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _prefill(self, prompt: list[int]):
        """An empty cache, then ``prompt`` as sequence 0 (logits of its last token only)."""
        self.reset()
        P = len(prompt)
        self._fill(prompt, list(range(P)), [0] * P, [False] * (P - 1) + [True])
        self._decode()

    def prefill_logits(self, prompt: list[int]) -> np.ndarray:
        """Next-token logits after ``prompt`` (sequence 0), float32 [vocab]."""
        self._prefill(prompt)
        return self._logits(len(prompt) - 1).copy()

    def generate(self, prompt: list[int], n: int, new: int, seed: int,
                 step_times: list[float] | None = None) -> list[list[int]]:
        """n samples (temperature 1, no truncation) of ``new`` tokens after ``prompt``:
        one prefill, the prompt's cells shared by all n sequences, one batch per step."""
        if n > self.n_seq:
            raise ValueError(f"n={n} exceeds the context's n_seq_max={self.n_seq}")
        lc, P = self.lc, len(prompt)
        # llama.cpp's own sampler (as its batched example): softmax over the full vocabulary
        # at temperature 1, then a draw.
        smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_dist(seed))
        self._prefill(prompt)
        mem = lc.llama_get_memory(self.ctx)
        for s in range(1, n):
            lc.llama_memory_seq_cp(mem, 0, s, -1, -1)
        last = [lc.llama_sampler_sample(smpl, self.ctx, P - 1) for _ in range(n)]
        out = [[t] for t in last]
        for step in range(1, new):
            t0 = time.perf_counter()
            self._fill(last, [P + step - 1] * n, list(range(n)), [True] * n)
            self._decode()
            last = [lc.llama_sampler_sample(smpl, self.ctx, i) for i in range(n)]
            if step_times is not None:
                step_times.append(time.perf_counter() - t0)
            for o, t in zip(out, last):
                o.append(t)
        lc.llama_sampler_free(smpl)
        return out

