"""Rotary position embeddings: ``inv_freq`` per scaling scheme, and rotation.

Only schemes whose rotation is one fixed ``inv_freq`` are supported, because Loom
rotates queries by extra angles in-kernel (DESIGN.md §3): default, linear, llama3,
yarn (whose attention factor scales every cos / sin alike: a fixed factor on the
logits, which a rotation by an extra angle keeps), proportional (transformers 5's
partial rotation: the frequencies past ``partial_rotary_factor`` of each head are 0) and
dynamic NTK, which changes the frequencies only past ``max_position_embeddings``, where
Loom never places a token: inside it, plain RoPE (as transformers computes it there).
longrope, whose frequencies depend on the sequence's length inside the context, is refused.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "proportional", "dynamic")


def compute_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq [head_dim/2] float32 for ``cfg``'s rope scheme."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type")
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"rope scaling {kind!r} is not supported; Loom supports "
                         f"{', '.join(SUPPORTED_ROPE)} (schemes that depend on sequence length, "
                         "such as longrope, cannot be applied by per-segment query rotation).")
    def field(name: str) -> float:
        try:
            return float(sc[name])
        except KeyError:
            raise ValueError(f"rope scaling {kind!r} needs {name!r} in config.json's rope_scaling "
                             "(or rope_parameters); the config is incomplete.") from None
        except (TypeError, ValueError):
            raise ValueError(f"rope scaling {kind!r}: {name}={sc[name]!r} in config.json must be a "
                             "number.") from None

    if kind == "linear":
        return inv / field("factor")
    if kind == "dynamic":
        # transformers' base x ((factor x seq_len / max_pos) - (factor - 1)) ^ (d / (d - 2)) with
        # seq_len = max(seq_len, max_pos): the base itself while seq_len <= max_pos, the only
        # lengths Loom runs (positions are capped at max_position_embeddings)
        field("factor")
        return inv
    if kind == "proportional":
        # the first partial_rotary_factor of each head's frequency pairs as default RoPE, the
        # others 0 (not rotated); all divided by factor (absent: 1)
        angles = int(float(sc.get("partial_rotary_factor") or 1.0) * d // 2)
        inv = torch.cat([inv[:angles], torch.zeros(d // 2 - angles)])
        return inv / float(sc.get("factor") or 1.0)
    if kind == "yarn":
        # YaRN (Peng et al. 2023): dimensions that turn more than beta_fast times over the
        # pretraining context keep their frequency, those under beta_slow turns are
        # interpolated by `factor`, a linear ramp between.
        factor, orig = field("factor"), field("original_max_position_embeddings")
        fast, slow = float(sc.get("beta_fast") or 32), float(sc.get("beta_slow") or 1)

        def dim_turning(turns: float) -> float:  # the dimension that turns `turns` times over orig
            return d * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        lo, hi = dim_turning(fast), dim_turning(slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if hi == lo else hi
        interpolated = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        kept = 1 - interpolated
        pos = cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)
        return 1.0 / (factor * pos) * (1 - kept) + 1.0 / pos * kept
    if kind == "llama3":
        factor = field("factor")
        lo, hi = field("low_freq_factor"), field("high_freq_factor")
        old = field("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv


def attention_scaling(cfg: ModelConfig) -> float:
    """The factor on every cos / sin of ``cfg``'s rope scheme (1 but for yarn)."""
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type") != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    factor, m, m_all = float(sc["factor"]), sc.get("mscale"), sc.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


class Rotary:
    """Applies RoPE at given positions; caches cos/sin tables up to a length."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, device, dtype, scaling: float = 1.0):
        self.inv_freq = inv_freq.to(device)
        self.dtype, self.scaling = dtype, scaling
        self._extend(max(max_positions, 1))

    def _extend(self, n: int):
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)  # [n, D/2]
        # Match Hugging Face: cos/sin computed (and scaled) in float32, then cast to the model dtype.
        cos, sin = freqs.cos(), freqs.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)

    def covering(self, positions: torch.Tensor, max_position: int | None = None):
        """The whole cos, sin tables [n, D/2], extended first to cover ``positions`` (whose
        largest value the caller may pass as ``max_position``, sparing a reduction)."""
        if max_position is not None:
            need = max_position + 1
        else:
            need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._extend(max(need, 2 * self.cos.shape[0]))
        return self.cos, self.sin

    def tables(self, positions: torch.Tensor, max_position: int | None = None):
        """cos, sin [T, 1, D/2] for ``positions [T]`` (int64; ``max_position`` as in
        ``covering``: on a GPU, reducing ``positions`` would wait for the device)."""
        cos, sin = self.covering(positions, max_position)
        return cos[positions][:, None, :], sin[positions][:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated (rotate-half convention); cos/sin [T, 1, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
