"""Token-level KV compressor (spec section 2; official model.py `Compressor`).

C = H W_kv, Z = H W_gate + ape. Every block of m tokens gives one entry: a per-channel softmax over
the block's slots of Z weights the rows of C; then RMSNorm and RoPE at the block's FIRST position.
Overlapped (CSA, m = 4): W_kv, W_gate, ape have width 2c; entry i is one softmax over 2m slots, the
first c channels over block i-1 and the last c over block i (block 0 pads with -inf / 0).
ratio 1 (the DSA indexer keys): no pooling, entry t = RMSNorm(h_t W_kv) with RoPE at t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.norm import RMSNorm
from dsv4.model.precision import KeepFP32
from dsv4.model.rope import apply_rope


class Compressor(KeepFP32):
    fp32_names = ("ape",)

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        width = head_dim * (2 if overlap else 1)
        self.wkv = nn.Linear(dim, width, bias=False)
        if ratio > 1:
            self.wgate = nn.Linear(dim, width, bias=False)
            self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv: torch.Tensor | None = None,
             prev_gate: torch.Tensor | None = None) -> torch.Tensor:
        """kv, gate: [B, n, m, width] whole blocks (gate already + ape) -> pooled [B, n, c] (before norm).

        prev_kv/prev_gate: [B, m, c] first-half slots of the block before block 0 (overlap, cached decode).
        """
        c, m = self.head_dim, self.ratio
        if self.overlap:
            b, n = kv.shape[:2]
            prev_k = kv.new_zeros(b, 1, m, c) if prev_kv is None else prev_kv.unsqueeze(1).to(kv.dtype)
            prev_g = gate.new_full((b, 1, m, c), float("-inf")) if prev_gate is None else \
                prev_gate.unsqueeze(1).to(gate.dtype)
            kv = torch.cat([torch.cat([prev_k, kv[:, :-1, :, :c]], 1), kv[..., c:]], dim=2)
            gate = torch.cat([torch.cat([prev_g, gate[:, :-1, :, :c]], 1), gate[..., c:]], dim=2)
        return (kv * gate.softmax(dim=2)).sum(dim=2)

    def project(self, h: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 C = h W_kv and Z = h W_gate + ape[slot] ([B, T, width]); slots [T] = position mod m
        (default 0..T-1 mod m, i.e. h starts a block). ratio 1: (C, None)."""
        kv = F.linear(h.float(), self.wkv.weight.float())  # compressor projections run in fp32
        if self.ratio == 1:
            return kv, None
        if slots is None:
            slots = torch.arange(h.shape[1], device=h.device) % self.ratio
        return kv, F.linear(h.float(), self.wgate.weight.float()) + self.ape.float()[slots]

    def finish(self, pooled: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm, then RoPE at each entry's first position (cos/sin given at those positions)."""
        return apply_rope(self.norm(pooled), cos, sin).to(dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h: [B, T, d]; cos/sin: compressed-branch rope at positions 0..T-1. Returns [B, T // m, c]."""
        b, t, _ = h.shape
        m = self.ratio
        if m == 1:
            return self.finish(self.project(h)[0], cos, sin, h.dtype)
        n = t // m
        if n == 0:
            return h.new_zeros(b, 0, self.head_dim)
        kv, gate = self.project(h[:, :n * m])
        pooled = self.pool(kv.unflatten(1, (n, m)), gate.unflatten(1, (n, m)))
        return self.finish(pooled, cos[..., :n * m:m, :], sin[..., :n * m:m, :], h.dtype)
