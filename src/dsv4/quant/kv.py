"""Storage codecs for cached kv vectors (docs/spec.md section 7, "KV cache as served").

`KVCodec(width, rope_dim, "fp8")` packs each vector into bytes like the served layout:
  [ r bf16 rope values | (width - r) float8_e4m3fn | one e8m0 scale byte per 64 of them | pad to 8 ]
with scale = amax / 448 rounded UP to a power of two per 64-value block (x = q * scale). The rope
dims stay bf16 because FP8 would wreck their relative-position phase. Plain codecs (fp32 / bf16) just
cast. A store holds `codec.encode(x)` rows and any gathered rows go through `codec.decode`.
"""

from __future__ import annotations

import torch

from dsv4.quant.formats import FP8_MAX, pow2_ceil

FP8_BLOCK = 64


class KVCodec:
    def __init__(self, width: int, rope_dim: int, kind: str | torch.dtype = torch.float32):
        self.width, self.rope = width, rope_dim
        if isinstance(kind, torch.dtype):
            self.kind, self.dtype, self.bytes = "plain", kind, width
        elif kind == "fp8":
            nope = width - rope_dim
            if nope % FP8_BLOCK and nope > FP8_BLOCK:
                raise ValueError(f"fp8 kv cache: non-rope dims {nope} must be <= 64 or a multiple of 64")
            self.kind, self.dtype = "fp8", torch.uint8
            self.n_scales = -(-nope // FP8_BLOCK)
            self.bytes = -(-(nope + self.n_scales + 2 * rope_dim) // 8) * 8
        else:
            raise ValueError(f"unknown kv cache format {kind!r}: use a torch dtype or 'fp8'")

    @property
    def stored_width(self) -> int:
        return self.width if self.kind == "plain" else self.bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return x.to(self.dtype)
        nope = self.width - self.rope
        v = x[..., :nope].float().unflatten(-1, (self.n_scales, -1))
        scale = pow2_ceil(v.abs().amax(-1) / FP8_MAX)  # [..., n_scales]
        q = (v / scale[..., None]).flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8)
        exp = (torch.log2(scale).round() + 127).clamp(0, 254).to(torch.uint8)  # e8m0 byte
        rope = x[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
        pad = q.new_zeros(*q.shape[:-1], self.bytes - q.shape[-1] - exp.shape[-1] - rope.shape[-1])
        return torch.cat([rope, q, exp, pad], -1)

    def decode(self, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "plain":
            return b.to(dtype)
        nope = self.width - self.rope
        r2 = 2 * self.rope
        rope = b[..., :r2].view(torch.bfloat16).float()  # rows are 8-byte multiples: aligned
        q = b[..., r2 : r2 + nope].view(torch.float8_e4m3fn).float().unflatten(-1, (self.n_scales, -1))
        scale = torch.exp2(b[..., r2 + nope : r2 + nope + self.n_scales].float() - 127)
        return torch.cat([(q * scale[..., None]).flatten(-2), rope], -1).to(dtype)
