"""Train the shipped demo model (``engine/assets/demo_model``) on the fork/join task.

    python -m engine.train_demo            # writes engine/assets/demo_model

Defaults (seed 0, 1200 steps x 24 packed examples, 0.82M-parameter Qwen3) took 11.7 min
on 2 shared CPU cores, final loss 2.2e-06, and are bit-reproducible (deterministic
kernels): a second run gave the same model.safetensors.

Each training example is the thread tree the ``Multiverse()`` protocol builds at
inference, made with the engine's own verbs (``ThreadTree.fork`` / ``inject`` /
``join(positions="max")``) and packed by ``engine.trie.pack``: one sequence, an
ancestor-only mask (paths see the prompt and outline, never each other; the
conclusion sees all paths) and home positions (every path starts at the fork
position, the conclusion after the longest path). A share of examples is the same
solution as one causal thread (the sequential serialization), so that plain
``llm.generate`` solves the task too. The loss covers exactly the tokens the engine
samples: not the prompt, not the injected path and join headers (except in the
sequential serialization, where one thread writes everything).

The forward is plain torch with Hugging Face Qwen3 math (RMSNorm, q/k norm, RoPE at
the packed position ids, SDPA with the boolean mask, SwiGLU), so the weights save as
a standard ``Qwen3ForCausalLM`` checkpoint that ``LLM(path)`` loads like any model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from .cache import KVCache
from .demo_task import EOS, JOIN_HEADER, TAGS, Problem, draw, solve
from .threads import ThreadTree
from .trie import pack

UNK = "<|unk|>"
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_model")


# ---- tokenizer and config ------------------------------------------------------------------
def build_tokenizer():
    """Character-level ``tokenizers`` tokenizer: EOS, UNK and the tags as special tokens
    (one id each), then printable ASCII and newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = [EOS, UNK, *TAGS]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def write_tokenizer(out: str) -> int:
    tok = build_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
                   "unk_token": UNK, "bos_token": None, "add_bos_token": False,
                   "model_max_length": 1024}, f, indent=1)
    return tok.get_vocab_size()


def model_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "float32", "eos_token_id": 0, "pad_token_id": 0,
        "bos_token_id": None,
    }


# ---- the model: Hugging Face Qwen3 math in plain torch -------------------------------------
def init_params(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    L = cfg["num_hidden_layers"]

    def lin(out_f, in_f, std=0.02):
        return torch.randn(out_f, in_f, generator=g) * std

    out_std = 0.02 / math.sqrt(2 * L)  # residual-branch outputs scaled down (GPT-2 style)
    p = {"model.embed_tokens.weight": lin(V, H), "model.norm.weight": torch.ones(H),
         "lm_head.weight": lin(V, H)}
    for i in range(L):
        a = f"model.layers.{i}."
        p.update({
            a + "input_layernorm.weight": torch.ones(H),
            a + "post_attention_layernorm.weight": torch.ones(H),
            a + "self_attn.q_proj.weight": lin(nh * D, H), a + "self_attn.k_proj.weight": lin(nkv * D, H),
            a + "self_attn.v_proj.weight": lin(nkv * D, H),
            a + "self_attn.o_proj.weight": lin(H, nh * D, out_std),
            a + "self_attn.q_norm.weight": torch.ones(D), a + "self_attn.k_norm.weight": torch.ones(D),
            a + "mlp.gate_proj.weight": lin(I, H), a + "mlp.up_proj.weight": lin(I, H),
            a + "mlp.down_proj.weight": lin(H, I, out_std),
        })
    return {k: v.requires_grad_() for k, v in p.items()}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def forward(p: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, pos: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """ids, pos [B, N] int64; mask [B, N, N] bool (query row may see key column) -> logits
    [B, N, V] float32."""
    B, N = ids.shape
    nh, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = pos.float()[..., None] * inv  # [B, N, D/2]
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # [B, 1, N, D/2]
    h = p["model.embed_tokens.weight"][ids]  # [B, N, H]
    m = mask[:, None]  # [B, 1, N, N]
    for i in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{i}."
        x = _rms(h, p[a + "input_layernorm.weight"], eps)
        q = F.linear(x, p[a + "self_attn.q_proj.weight"]).view(B, N, nh, D)
        k = F.linear(x, p[a + "self_attn.k_proj.weight"]).view(B, N, nkv, D)
        v = F.linear(x, p[a + "self_attn.v_proj.weight"]).view(B, N, nkv, D)
        q = _rope(_rms(q, p[a + "self_attn.q_norm.weight"], eps).transpose(1, 2), cos, sin)
        k = _rope(_rms(k, p[a + "self_attn.k_norm.weight"], eps).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # [B, nh, N, D]
        h = h + F.linear(o.transpose(1, 2).reshape(B, N, nh * D), p[a + "self_attn.o_proj.weight"])
        x = _rms(h, p[a + "post_attention_layernorm.weight"], eps)
        g = F.linear(x, p[a + "mlp.gate_proj.weight"])
        u = F.linear(x, p[a + "mlp.up_proj.weight"])
        h = h + F.linear(F.silu(g) * u, p[a + "mlp.down_proj.weight"])
    return F.linear(_rms(h, p["model.norm.weight"], eps), p["lm_head.weight"]).float()


# ---- examples: the inference thread tree, packed -------------------------------------------
def _dummy_cache() -> KVCache:
    # Fork / inject / join never write K/V (pages are taken only when a step runs), so a
    # one-page cache is enough to build and pack trees.
    return KVCache(1, 1, 1, 1, 2, torch.float32, "cpu")


def build_tree(tree: ThreadTree, enc, p: Problem, sequential: bool = False):
    """The thread tree ``Multiverse()`` builds for ``p``'s solution (or one causal thread
    with the whole text). ``enc``: str -> ids. Returns {thread: first sampled index}."""
    sol = solve(p)
    root = tree.new_root(enc(p.prompt))
    (main,) = tree.fork(root, [[]])  # the protocol's main thread: no header
    eos = enc(EOS)
    if sequential:
        tree.inject(main, enc(sol.sequential()) + eos)
        return {main: 0}
    tree.inject(main, enc(sol.main))
    kids = tree.fork(main, [enc(h) for h in sol.path_headers])
    for k, text in zip(kids, sol.paths):
        tree.inject(k, enc(text))
    cont = tree.join(kids, enc(JOIN_HEADER), positions="max")
    tree.inject(cont, enc(sol.conclusion) + eos)
    return {main: 0, **{k: k.header_len for k in kids}, cont: cont.header_len}


def pack_example(enc, p: Problem, sequential: bool = False):
    """(ids [N], pos [N], mask [N, N], targets [N]): targets[i] is the token sampled after
    packed token i (-100 where the engine samples nothing)."""
    tree = ThreadTree(_dummy_cache())
    sampled = build_tree(tree, enc, p, sequential)
    ids, pos, mask = pack(tree)
    start, off = {}, 0
    for t in tree.threads:  # pack's layout: threads with tokens, in creation order
        if t.tokens:
            start[t.id], off = off, off + len(t.tokens)
    tgt = torch.full((len(ids),), -100, dtype=torch.long)
    for t, first in sampled.items():
        s0 = start[t.id]
        for i in range(first, len(t.tokens)):
            # Token i is sampled from the logits after token i-1 of its own segment, or,
            # for a thread without a header, after its parent's last token.
            src = s0 + i - 1 if i > 0 else start[t.parent.id] + len(t.parent.tokens) - 1
            tgt[src] = t.tokens[i]
    tree.close()
    return ids, pos, mask, tgt


def collate(examples):
    """Pad to the longest example; padding rows see only themselves (no NaN in SDPA)."""
    B, N = len(examples), max(len(e[0]) for e in examples)
    ids = torch.zeros(B, N, dtype=torch.long)
    pos = torch.zeros(B, N, dtype=torch.long)
    tgt = torch.full((B, N), -100, dtype=torch.long)
    mask = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
    for b, (i, ps, m, t) in enumerate(examples):
        n = len(i)
        ids[b, :n], pos[b, :n], tgt[b, :n], mask[b, :n, :n] = i, ps, t, m
    return ids, pos, mask, tgt


def save(params: dict[str, torch.Tensor], cfg: dict, out: str):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    write_tokenizer(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}, f, indent=1)
    save_file({k: v.detach().contiguous() for k, v in params.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


# ---- training ------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(a) -> dict:
    """Bit-reproducible from ``a.seed`` (deterministic kernels, fixed thread count)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # e.g. the embedding's scatter-add backward
    try:
        return _train(a)
    finally:
        torch.use_deterministic_algorithms(was)


def _train(a) -> dict:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = build_tokenizer()
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    cfg = model_config(tok.get_vocab_size(), a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate)
    params = init_params(cfg, a.seed)
    n_params = sum(v.numel() for v in params.values())
    print(f"model: Qwen3 hidden={a.hidden} layers={a.layers} heads={a.heads}/{a.kv_heads} "
          f"ffn={a.intermediate} vocab={cfg['vocab_size']}: {n_params / 1e6:.2f}M parameters")
    decay = [v for k, v in params.items() if v.dim() == 2]
    other = [v for k, v in params.items() if v.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    ema = None
    for step in range(a.steps):
        exs = [pack_example(enc, draw(rng, held_out=False), sequential=rng.random() < a.seq_frac)
               for _ in range(a.batch)]
        ids, pos, mask, tgt = collate(exs)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        logits = forward(params, cfg, ids, pos, mask)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % a.log_every == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  lr {opt.param_groups[0]['lr']:.2e}"
                  f"  {time.perf_counter() - t0:7.1f}s", flush=True)
    wall = time.perf_counter() - t0
    save(params, cfg, a.out)
    print(f"trained {a.steps} steps x {a.batch} examples in {wall / 60:.1f} min; final loss "
          f"{loss.item():.3e} (ema {ema:.3e}); saved to {a.out}")
    return {"loss": loss.item(), "ema": ema, "wall_s": wall}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output model directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=24, help="packed examples per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seq-frac", type=float, default=0.25,
                    help="share of examples in the sequential serialization")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    return ap


if __name__ == "__main__":
    train(build_parser().parse_args())
