"""Interleaved-pair RoPE on the last r dims, with YaRN for compressed layers (docs/spec.md section 6)."""

from __future__ import annotations

import math

import torch

from dsv4.model.precision import KeepFP32


def yarn_inv_freq(
    dim: int, base: float, factor: float, original_len: int, beta_fast: float = 32, beta_slow: float = 1
) -> torch.Tensor:
    """YaRN (arXiv 2309.00071) frequencies: ramp between interpolated (theta/factor) and raw theta.

    Correction range as in the official model.py: floor/ceil of the dims whose wavelength spans
    beta_fast / beta_slow rotations over original_len, clamped to [0, dim - 1]. No mscale (V4).
    """

    def corr_dim(rot: float) -> float:
        return dim * math.log(original_len / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high: float = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return freqs / factor * ramp + freqs * (1 - ramp)


class Rotary(KeepFP32):
    """Holds inv_freq [r/2]; cos_sin(pos) gives fp32 cos, sin of shape [*pos, r/2]."""

    fp32_names = ("inv_freq",)
    inv_freq: torch.Tensor  # buffer [r/2]

    def __init__(self, dim: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.dim, self.base, self.scaling = dim, base, scaling
        self.register_buffer("inv_freq", torch.empty(dim // 2, dtype=torch.float32), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """inv_freq from (dim, base, scaling): at construction, and after a meta-device build."""
        dim, base, scaling = self.dim, self.base, self.scaling
        if scaling is not None and scaling.get("type", scaling.get("rope_type")) == "yarn":
            inv = yarn_inv_freq(
                dim,
                base,
                scaling["factor"],
                scaling["original_max_position_embeddings"],
                scaling.get("beta_fast", 32),
                scaling.get("beta_slow", 1),
            )
        else:
            inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.inv_freq.copy_(inv)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the LAST 2*cos.shape[-1] dims of x by angle +-theta.

    cos/sin: [T, r/2] (or broadcastable to x's leading dims without the head axis). x: [B, T, (H,) D].
    inverse=True rotates by -theta (V4 de-rotates attention outputs at the query position).
    """
    r = 2 * cos.shape[-1]
    if x.dim() == 4:  # [B, T, H, D]: broadcast over heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([nope, rot], dim=-1)
