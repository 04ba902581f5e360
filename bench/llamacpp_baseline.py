"""llama.cpp as a same-run baseline for bench_generate.py (optional: needs the PyPI
packages ``llama-cpp-python`` and ``gguf``; the script skips it, saying why, without them).

llama.cpp is the CPU engine people run local models with. Its parallel-sampling recipe
(the ``batched`` example) is what an engine without Loom's thread trees does for n samples
of one prompt: prefill the prompt once as sequence 0, copy that sequence's cache cells to
sequences 1..n-1 in a unified KV cache (no K/V copied), then decode one batch of n tokens
per step. That is what ``LlamaCppRunner`` does, through llama.cpp's C API.

The model is the same checkpoint Loom runs (the random Qwen3-shaped one, or a Llama /
Mistral / Qwen2 / Qwen3 given by ``--model``), written to GGUF by ``write_gguf`` from its
safetensors in the run's dtype (float32 or bfloat16, no quantization: the same bytes per
weight as Loom). llama.cpp only ever sees token ids, so the GGUF carries a placeholder
vocabulary of the model's size. ``prefill_logits`` lets the caller check that both engines compute the
same function before comparing their speed.
"""
from __future__ import annotations

import ctypes
import math
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


ARCHS = {  # Loom's architecture -> (llama.cpp's, whether q / k rows are reordered for it)
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),   # (llama.cpp runs Mistral as a Llama)
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}


def write_gguf(model_dir: str, out_path: str, dtype: str = "float32") -> str:
    """The checkpoint in ``model_dir`` (Llama, Mistral, Qwen2 or Qwen3; safetensors, one
    file or shards) as a GGUF file for llama.cpp, its matrices in ``dtype`` ("float32" or
    "bfloat16"; norms and biases float32, as llama.cpp keeps them). RoPE scaling: for the
    Llama graph (linear, llama3, yarn) per-dimension frequency factors, computed from Loom's
    own ``inv_freq``; llama.cpp's qwen2 / qwen3 graphs take no factors, so there linear and
    yarn go in as llama.cpp's own scaling metadata (llama3 is refused). Yarn's factor on
    cos / sin, where llama.cpp's differs, is folded into q and k. Read by
    ``check_same_model`` in bench_generate.py before any speed is compared."""
    import gguf
    import torch

    from engine.config import ModelConfig
    from engine.loader import iter_tensors
    from engine.rope import attention_scaling, compute_inv_freq

    cfg = ModelConfig.from_dir(model_dir)
    if cfg.architecture not in ARCHS:
        raise ValueError(f"write_gguf writes {', '.join(ARCHS)}; {model_dir} is {cfg.architecture}.")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"write_gguf writes float32 or bfloat16 matrices, not {dtype!r}.")
    arch_name, reorder = ARCHS[cfg.architecture]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    L, V, D = cfg.num_layers, cfg.vocab_size, cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freq_factors = plain / compute_inv_freq(cfg)  # llama.cpp: angle = pos * plain / factor
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type")
    # RoPE scaling by llama.cpp's metadata (its qwen graphs take no factors), else by factors
    by_metadata = kind is not None and not reorder
    if by_metadata and kind not in ("linear", "yarn"):
        raise ValueError(f"llama.cpp's {arch_name.lower()} graph takes no RoPE frequency factors and has no "
                         f"{kind!r} scaling: bring your own GGUF or use --llama-cpp off.")
    # yarn's factor on cos / sin: folded into q and k (RoPE is linear), as much of it as
    # llama.cpp's own yarn does not apply (1 + 0.1 ln factor)
    mscale = attention_scaling(cfg)
    if by_metadata and kind == "yarn":
        mscale /= 1 + 0.1 * math.log(float(sc["factor"]))

    w = gguf.GGUFWriter(out_path, arch_name.lower())
    w.add_block_count(L)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(cfg.rope_theta)
    if by_metadata:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(sc["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(sc.get("beta_fast") or 32))
            w.add_rope_scaling_yarn_beta_slow(float(sc.get("beta_slow") or 1))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_BF16)
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
    w.add_eos_token_id(cfg.eos_token_ids[0] if cfg.eos_token_ids else V - 1)

    def interleave(t: torch.Tensor, heads: int) -> torch.Tensor:
        # llama.cpp rotates a Llama head's adjacent pairs (x0, x1), (x2, x3)...; transformers
        # rotates halves (x_i, x_{i + D/2}): the rows of q / k go in llama.cpp's order.
        return t.reshape(heads, 2, D // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    names = gguf.get_tensor_name_map(arch, L)
    for hf_name, t in iter_tensors(model_dir):
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        t = t.float()
        is_q, is_k = ".self_attn.q_proj." in hf_name, ".self_attn.k_proj." in hf_name
        # (with q / k norms, their weights scale what reaches RoPE, not the projections)
        if cfg.qk_norm and hf_name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) or \
                not cfg.qk_norm and (is_q or is_k):
            t = t * mscale
        if reorder and (is_q or is_k):
            t = interleave(t, cfg.num_heads if is_q else cfg.num_kv_heads)
        if t.dim() == 2 and dtype == "bfloat16":
            w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, np.ascontiguousarray(t.numpy(), dtype=np.float32))
    if kind is not None and not by_metadata:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     freq_factors.numpy().astype(np.float32))
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
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
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

