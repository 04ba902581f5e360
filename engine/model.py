"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over Loom's paged cache.

``forward(input_ids [T], positions [T], batch: ForwardBatch) -> logits [R, V]``:
embed → [qkv → (q/k norm) → RoPE at home position → append K,V to pages →
segment attention(plan) → o_proj → MLP] × layers → logits of the rows to sample.
Weights are plain tensors; q/k/v and gate/up are fused into one matmul each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .attention.plan import AttentionPlan
from .config import ModelConfig
from .interrupts import DEFERRED
from .loader import iter_tensors
from .rope import Rotary, apply_rotary, attention_scaling, compute_inv_freq


@dataclass
class ForwardBatch:
    """Everything a forward step needs besides token ids and positions."""
    plan: AttentionPlan
    slots: torch.Tensor          # [T] int64: page_id * page_size + offset of each new token
    logits_rows: torch.Tensor    # [R] int64: rows whose next-token logits are wanted
    all_rows: bool = False       # logits_rows is every row in order (no gather needed)
    max_position: int | None = None  # the largest position, when the caller knows it
    hidden_only: bool = False    # return the rows' final (normed) hidden states, not logits


LOGITS_BLOCK_ROWS = 256  # rows per block of CausalLM.logits (a block of the head's output: ~150 MB at a 150k vocab)


PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what csrc/linear_cpu.cpp packs
FUSED_MAX_HEAD_DIM = 1024  # csrc/fused_cpu.cpp's qkv_prep: a head row in a stack buffer
FUSED_MAX_HIDDEN = 16384  # csrc/fused_cpu.cpp's norms (kMaxRow): a hidden row in a stack buffer


class Linear:
    """y = x W^T + b. On the CPU in float32 or bfloat16 the weight is packed once into
    panels for Loom's GEMM (csrc/linear_cpu.cpp), which outruns the BLAS behind F.linear
    here; elsewhere it is F.linear."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, pack: bool = False):
        self.out_features, self.in_features = w.shape
        self.b = b
        self.packed = pack and w.dtype in PACKED_DTYPES and w.device.type == "cpu"
        self.w = torch.ops.loom.pack_linear_weight(w) if self.packed else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.loom.linear_packed(x, self.w, self.b, self.out_features)
        return F.linear(x, self.w, self.b)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w, self.b) if t is not None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids]: rows of the weight [len(ids), in_features] (a new tensor), read in place
        from the packed panels (the layouts of csrc/linear_cpu.cpp's pack_linear_weight:
        float32 [N/16, K, 16]; bfloat16 [N/16, K/2, 16 x 2], K padded to even)."""
        if not self.packed:
            return F.embedding(ids, self.w)
        panel, lane, K = ids // 16, ids % 16, self.in_features
        if self.w.dtype == torch.float32:
            return self.w[panel, :, lane]  # [T, K]
        w = self.w.view(self.w.shape[0], self.w.shape[1], 16, 2)
        r = w[panel, :, lane, :].reshape(ids.shape[0], -1)  # [T, K even]
        return r if r.shape[1] == K else r[:, :K].contiguous()


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # As Hugging Face: normalise in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class CausalLM:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device, dtype):
        self.cfg = cfg
        self.device, self.dtype = torch.device(device), dtype
        self.scale = cfg.head_dim ** -0.5
        # The RoPE tables are sized by head_dim: the weights' shapes first (a config.json whose
        # head_dim the weights do not have, 10**9, took 6 GB and 19 s to fail in the allocator)
        self._check(weights, "model.layers.0.self_attn.q_proj.weight", (cfg.num_heads * cfg.head_dim,
                    cfg.hidden_size), "num_attention_heads x head_dim, hidden_size")
        self.inv_freq = compute_inv_freq(cfg).to(self.device)
        scaling = attention_scaling(cfg)
        if not (bool(torch.isfinite(self.inv_freq).all()) and math.isfinite(float(torch.tensor(scaling,
                                                                                           dtype=torch.float32)))):
            # (else NaN logits, blamed on the weights: e.g. a linear factor of 1e-300 took them to inf)
            raise ValueError(f"config.json's RoPE settings (rope_theta={cfg.rope_theta!r}, scaling "
                             f"{cfg.rope_scaling!r}) give rotary frequencies or an attention factor that are not "
                             "finite in float32; use the config.json that came with the weights.")
        self.rotary = Rotary(self.inv_freq, min(cfg.max_position_embeddings, 8192), self.device, dtype, scaling)
        self.attention: Callable = None  # set by the engine: (q, k_pool, v_pool, plan, inv_freq, scale) -> o
        self.append_kv: Callable = None  # set by the engine: (k_pool, v_pool, k, v, slots) -> None
        # engine._C.decoder_layer, set by the engine with the 'cpu' attention backend: the
        # fused forward's per-layer ops in one call (same kernels, same order).
        self.layer_step: Callable | None = None
        self.pack = _packed_linear_available() and self.device.type == "cpu" and dtype in PACKED_DTYPES
        # Fused element-wise ops (csrc/fused_cpu.cpp) on the same condition, for the head sizes
        # and hidden sizes their buffers take; False -> ATen ops.
        self.fused = self.pack and hasattr(torch.ops.loom, "qkv_prep") and cfg.head_dim <= FUSED_MAX_HEAD_DIM \
            and cfg.hidden_size <= FUSED_MAX_HIDDEN
        self._build(weights)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str, cfg: ModelConfig, device, dtype, available: int | None = None) -> "CausalLM":
        """``available``: bytes of memory free for the weights (None: unchecked)."""
        weights = {}
        for name, t in iter_tensors(model_dir):
            if name.startswith("model.") or name.startswith("lm_head."):
                weights[name] = t
        need = sum(t.numel() for t in weights.values()) * dtype.itemsize  # (the tensors are maps of the files)
        if available is not None and need > available:
            raise ValueError(f"The checkpoint's weights take {need / 2**30:,.1f} GiB in {str(dtype)[6:]}, more than "
                             f"this machine's available memory ({available / 2**30:,.1f} GiB): the process would be "
                             "killed while loading them; free memory, or use a smaller model (or a 16-bit dtype).")
        return cls(cfg, weights, device, dtype)

    def _check(self, w: dict, name: str, shape: tuple[int, ...], why: str,
               required: bool = True) -> torch.Tensor | None:
        """Tensor ``name`` of the checkpoint (left in ``w``), which must have ``shape``
        (``why``: the config fields that give it, for the error)."""
        t = w.get(name)
        if t is None:
            if required:
                raise ValueError(f"Checkpoint is missing tensor {name!r}; is it a complete "
                                 f"{self.cfg.architecture} checkpoint?")
            return None
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"Checkpoint tensor {name!r} has shape {tuple(t.shape)}, but config.json "
                             f"gives {tuple(shape)} ({why}); the config and the weights disagree: use "
                             "the config.json that came with these weights.")
        if not t.is_floating_point():  # (an integer's value cast to a float is not the weight it stands for)
            raise ValueError(f"Checkpoint tensor {name!r} is {str(t.dtype).replace('torch.', '')}, not floating "
                             "point: the checkpoint is quantized (or not a model's weights); Loom loads float32 / "
                             "bfloat16 / float16 weights only: use the unquantized checkpoint.")
        return t

    def _take(self, w: dict, name: str, shape: tuple[int, ...], why: str,
              required: bool = True, kept: bool = True) -> torch.Tensor | None:
        """Tensor ``name`` of the checkpoint (taken out of ``w``), checked as ``_check`` does.
        ``kept``: the model holds the result as it is
        (not only to concatenate or pack it), so it must not be the checkpoint's memory:
        safetensors hands out tensors over a map of the whole file, and one of them kept
        (a 4 KB norm) keeps every page of the file read so far resident."""
        t = self._check(w, name, shape, why, required)
        if t is None:
            return None
        del w[name]
        r = t.to(device=self.device, dtype=self.dtype).contiguous()
        return r.clone() if kept and r.data_ptr() == t.data_ptr() else r

    def _build(self, w: dict[str, torch.Tensor]):
        c = self.cfg
        H, V, I, hd = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
        qd, kvd = c.num_heads * hd, c.num_kv_heads * hd
        vh = "vocab_size, hidden_size"
        q_why = "num_attention_heads x head_dim"
        kv_why = "num_key_value_heads x head_dim"
        pk = self.pack  # packed weights are copies: the checkpoint's tensor need not be kept
        tied = c.tie_word_embeddings
        head_is_embed = tied and "lm_head.weight" not in w
        embed = self._take(w, "model.embed_tokens.weight", (V, H), vh, kept=not (head_is_embed and pk))
        self.norm = self._take(w, "model.norm.weight", (H,), "hidden_size")
        lm = self._take(w, "lm_head.weight", (V, H), vh, required=not tied, kept=not pk)
        self.lm_head = Linear(lm if lm is not None else embed, pack=pk)
        # Tied and packed: tokens are looked up in the head's panels (one copy of the table,
        # not two: 0.6 GB of a 0.6B model's 2.8 in float32).
        self.embed = None if lm is None and self.lm_head.packed else embed
        # (not held while the layers load: a table the head's panels replace, or a head's
        # unpacked weight, is a copy when the run's dtype is not the checkpoint's; 0.6 GB of
        # a 0.6B model's peak in float32 from bfloat16)
        del embed, lm
        self.layers: list[Layer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            q = self._take(w, a + "q_proj.weight", (qd, H), f"{q_why}, hidden_size", kept=False)
            k = self._take(w, a + "k_proj.weight", (kvd, H), f"{kv_why}, hidden_size", kept=False)
            v = self._take(w, a + "v_proj.weight", (kvd, H), f"{kv_why}, hidden_size", kept=False)
            # Biases and q / k norms exactly as the config declares them (ModelConfig): one
            # the config does not declare stays in `w` and is refused below, as transformers
            # would drop it and compute another model.
            b_qkv = None
            if c.qkv_bias:
                b_qkv = torch.cat([self._take(w, a + "q_proj.bias", (qd,), q_why, kept=False),
                                   self._take(w, a + "k_proj.bias", (kvd,), kv_why, kept=False),
                                   self._take(w, a + "v_proj.bias", (kvd,), kv_why, kept=False)])
            qn = kn = None
            if c.qk_norm:
                qn = self._take(w, a + "q_norm.weight", (hd,), "head_dim")
                kn = self._take(w, a + "k_norm.weight", (hd,), "head_dim")
            gate = self._take(w, p + "mlp.gate_proj.weight", (I, H), "intermediate_size, hidden_size", kept=False)
            up = self._take(w, p + "mlp.up_proj.weight", (I, H), "intermediate_size, hidden_size", kept=False)
            b_gate_up = None
            if c.mlp_bias:  # Llama's mlp_bias: biases on gate / up / down
                b_gate_up = torch.cat([self._take(w, p + "mlp.gate_proj.bias", (I,), "intermediate_size", kept=False),
                                       self._take(w, p + "mlp.up_proj.bias", (I,), "intermediate_size", kept=False)])
            self.layers.append(Layer(
                ln1=self._take(w, p + "input_layernorm.weight", (H,), "hidden_size"),
                qkv=Linear(torch.cat([q, k, v]).contiguous(), b_qkv, pk),
                o=Linear(self._take(w, a + "o_proj.weight", (H, qd), f"hidden_size, {q_why}", kept=not pk),
                         self._take(w, a + "o_proj.bias", (H,), "hidden_size") if c.o_bias else None, pk),
                q_norm=qn, k_norm=kn,
                ln2=self._take(w, p + "post_attention_layernorm.weight", (H,), "hidden_size"),
                gate_up=Linear(torch.cat([gate, up]).contiguous(), b_gate_up, pk),
                down=Linear(self._take(w, p + "mlp.down_proj.weight", (H, I), "hidden_size, intermediate_size",
                                       kept=not pk),
                            self._take(w, p + "mlp.down_proj.bias", (H,), "hidden_size") if c.mlp_bias else None,
                            pk),
            ))
        # Per layer, the weights argument of engine._C.decoder_layer.
        self.layer_args = [
            (L.qkv.w, L.qkv.b, L.qkv.out_features, L.q_norm, L.k_norm, L.o.w, L.o.b, L.o.out_features, L.ln2,
             L.gate_up.w, L.gate_up.b, L.gate_up.out_features, L.down.w, L.down.b, L.down.out_features)
            for L in self.layers]
        leftover = [n for n in w if not n.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"Checkpoint has tensors Loom does not use, e.g. {leftover[0]!r}; "
                             "the config and weights disagree (a bias or norm needs the config's "
                             "attention_bias / mlp_bias, or the architecture that has it): use the "
                             "config.json that came with these weights.")

    # ---- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                k_pools: list[torch.Tensor], v_pools: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            return self._forward_fused(input_ids, positions, batch, k_pools, v_pools)
        c = self.cfg
        T = input_ids.shape[0]
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = self.rotary.tables(positions, batch.max_position)
        h = self.embed_tokens(input_ids)  # h: [T, hidden]
        for li, L in enumerate(self.layers):
            DEFERRED.check()
            x = rms_norm(h, L.ln1, c.rms_norm_eps)
            qkv = L.qkv(x)  # [T, qd + 2 kvd]
            q = qkv[:, :qd].view(T, c.num_heads, c.head_dim)
            k = qkv[:, qd:qd + kvd].view(T, c.num_kv_heads, c.head_dim)
            v = qkv[:, qd + kvd:].view(T, c.num_kv_heads, c.head_dim)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, c.rms_norm_eps)
                k = rms_norm(k, L.k_norm, c.rms_norm_eps)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            self.append_kv(k_pools[li], v_pools[li], k, v, batch.slots)  # (v: a view, no copy)
            o = self.attention(q, k_pools[li], v_pools[li], batch.plan, self.inv_freq, self.scale)
            h = h + L.o(o.reshape(T, qd))
            x = rms_norm(h, L.ln2, c.rms_norm_eps)
            g, u = L.gate_up(x).chunk(2, dim=-1)
            h = h + L.down(F.silu(g) * u)
        h = rms_norm(h[batch.logits_rows], self.norm, c.rms_norm_eps)
        return h if batch.hidden_only else self.logits(h)

    def _forward_fused(self, input_ids, positions, batch: ForwardBatch, k_pools, v_pools) -> torch.Tensor:
        """``forward`` with one op per element-wise step (CPU): the residual add
        is fused with the next RMSNorm, q/k norms with RoPE and the q/k/v split, SiLU
        with the gate product."""
        ops, eps = torch.ops.loom, self.cfg.rms_norm_eps
        cos, sin = self.rotary.covering(positions, batch.max_position)
        h = self.embed_tokens(input_ids)  # h: [T, hidden] (a new tensor), updated in place below
        x = ops.rms_norm(h, self.layers[0].ln1, eps)
        if self.layer_step is not None:
            self._layers_in_one_call_each(h, x, positions, cos, sin, batch, k_pools, v_pools)
        else:
            self._layers_op_by_op(h, x, positions, cos, sin, batch, k_pools, v_pools)
        h = ops.rms_norm(h if batch.all_rows else h[batch.logits_rows], self.norm, eps)
        return h if batch.hidden_only else self.logits(h)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed) if self.embed is not None else self.lm_head.rows(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [R, vocab] of final hidden rows h [R, hidden] (normed). Many rows
        (a prompt's, for scoring) go through the head in blocks written into the result, so
        that no second [R, vocab] tensor (the head's output in a 16-bit dtype) exists."""
        R = h.shape[0]
        if R <= LOGITS_BLOCK_ROWS:
            return self.lm_head(h).float()
        out = torch.empty(R, self.cfg.vocab_size, dtype=torch.float32, device=h.device)
        for b in range(0, R, LOGITS_BLOCK_ROWS):
            out[b:b + LOGITS_BLOCK_ROWS] = self.lm_head(h[b:b + LOGITS_BLOCK_ROWS])
        return out

    def _layers_in_one_call_each(self, h, x, positions, cos, sin, batch: ForwardBatch, k_pools, v_pools):
        """The layers through engine._C.decoder_layer: ``_layers_op_by_op`` in one C++
        call per layer (same kernels, same order); h is updated in place."""
        c, p, n = self.cfg, batch.plan, len(self.layers)
        step = (cos, sin, positions, batch.slots, p.kv_indptr, p.kv_page_ids, p.kv_len, p.q_indptr, p.q_rows,
                p.shift, p.causal_limit, p.merge_indptr, p.merge_entries, self.inv_freq, float(self.scale),
                c.num_heads, c.num_kv_heads, c.head_dim, float(c.rms_norm_eps))
        for li, args in enumerate(self.layer_args):
            DEFERRED.check()  # (a waiting Ctrl-C: between layers, undone as a failed forward)
            x = self.layer_step(h, x, args, step, k_pools[li], v_pools[li],
                                self.layers[li + 1].ln1 if li + 1 < n else None)

    def _layers_op_by_op(self, h, x, positions, cos, sin, batch: ForwardBatch, k_pools, v_pools):
        """The layers one fused op at a time; h is updated in place."""
        ops, c = torch.ops.loom, self.cfg
        T, eps, qd = h.shape[0], c.rms_norm_eps, c.num_heads * c.head_dim
        for li, L in enumerate(self.layers):
            DEFERRED.check()
            q, k, v = ops.qkv_prep(L.qkv(x), L.q_norm, L.k_norm, cos, sin, positions, c.num_heads,
                                   c.num_kv_heads, c.head_dim, eps)
            self.append_kv(k_pools[li], v_pools[li], k, v, batch.slots)
            o = self.attention(q, k_pools[li], v_pools[li], batch.plan, self.inv_freq, self.scale)
            x = ops.add_rms_norm(h, L.o(o.reshape(T, qd)), L.ln2, eps)
            mlp = L.down(ops.silu_mul(L.gate_up(x)))
            if li + 1 < len(self.layers):
                x = ops.add_rms_norm(h, mlp, self.layers[li + 1].ln1, eps)
            else:
                h += mlp

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads (the embedding table only by lookup)."""
        ts = [self.norm] + self.lm_head.tensors()
        for L in self.layers:
            ts += [L.ln1, L.ln2] + [t for t in (L.q_norm, L.k_norm) if t is not None]
            for lin in (L.qkv, L.o, L.gate_up, L.down):
                ts += lin.tensors()
        return sum(t.numel() * t.element_size() for t in ts)


def _packed_linear_available() -> bool:
    try:
        from . import linear_ops  # noqa: F401  (loads engine._C when built)
    except ImportError:
        pass
    return hasattr(torch.ops.loom, "linear_packed")
