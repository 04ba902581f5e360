"""Rotary position embeddings: ``inv_freq`` per scaling scheme, and rotation.

Only schemes that change ``inv_freq`` alone are supported, because Loom rotates
queries by extra angles in-kernel (DESIGN.md §3); schemes that depend on the
total length (dynamic NTK) or rescale attention (yarn, longrope) are refused.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig

SUPPORTED_ROPE = ("default", "linear", "llama3")


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
                         "such as dynamic NTK, cannot be applied by per-segment query rotation).")
    if sc.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported.")
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


class Rotary:
    """Applies RoPE at given positions; caches cos/sin tables up to a length."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, device, dtype):
        self.inv_freq = inv_freq.to(device)
        self.dtype = dtype
        self._extend(max(max_positions, 1))

    def _extend(self, n: int):
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)  # [n, D/2]
        # Match Hugging Face: cos/sin computed in float32, then cast to the model dtype.
        self.cos = freqs.cos().to(self.dtype)
        self.sin = freqs.sin().to(self.dtype)

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
