"""Token-level KV compressor (docs/spec.md section 2; official model.py `Compressor`).

C = H W_kv, Z = H W_gate + ape. Every block of m tokens gives one entry: a per-channel softmax over
the block's slots of Z weights the rows of C; then RMSNorm and RoPE at the block's FIRST position.
Overlapped (CSA, m = 4): W_kv, W_gate, ape have width 2c; entry i is one softmax over 2m slots, the
first c channels over block i-1 and the last c over block i (block 0 pads with -inf / 0).
ratio 1 (the DSA indexer keys): no pooling, entry t = RMSNorm(h_t W_kv) with RoPE at t.

Incremental use (cached inference): `chunk` and `step` continue the pooling from a state holding C and
Z + ape of the last positions (dsv4.infer.cache.CompressorState: rings `kv` and `gate` with `read(rows,
pos)`, `write(rows, start, vals)`, `write_at(rows, pos, vals)`); the caller stores the entries returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.norm import RMSNorm
from dsv4.model.precision import KeepFP32
from dsv4.model.rope import Rotary, apply_rope

if TYPE_CHECKING:
    from dsv4.infer.cache import CompressorState


class Compressor(KeepFP32):
    fp32_names = ("ape",)

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        width = head_dim * (2 if overlap else 1)
        self.wkv = nn.Linear(dim, width, bias=False)
        if ratio > 1:
            self.wgate = nn.Linear(dim, width, bias=False)
            self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)
        # out_transform(entries) -> what is stored and attended (None: as computed); dsv4.quant.official_quant
        # sets the FP8 kv round trip (attention entries) or Hadamard + FP4 (indexer keys)
        self.out_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def pool(
        self,
        kv: torch.Tensor,
        gate: torch.Tensor,
        prev_kv: torch.Tensor | None = None,
        prev_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """kv, gate: [B, n, m, width] whole blocks (gate already + ape) -> pooled [B, n, c] (before norm).

        prev_kv/prev_gate: [B, m, c] first-half slots of the block before block 0 (overlap, cached decode).
        """
        c, m = self.head_dim, self.ratio
        if self.overlap:
            b, _n = kv.shape[:2]
            prev_k = kv.new_zeros(b, 1, m, c) if prev_kv is None else prev_kv.unsqueeze(1).to(kv.dtype)
            prev_g = (
                gate.new_full((b, 1, m, c), float("-inf"))
                if prev_gate is None
                else prev_gate.unsqueeze(1).to(gate.dtype)
            )
            kv = torch.cat([torch.cat([prev_k, kv[:, :-1, :, :c]], 1), kv[..., c:]], dim=2)
            gate = torch.cat([torch.cat([prev_g, gate[:, :-1, :, :c]], 1), gate[..., c:]], dim=2)
        return (kv * gate.softmax(dim=2)).sum(dim=2)

    def project(self, h: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 C = h W_kv and Z = h W_gate + ape[slot] ([B, T, width]); slots [T] = position mod m
        (default 0..T-1 mod m, i.e. h starts a block). ratio 1: (C, None)."""
        kv = F.linear(h.float(), self.wkv.weight.float())  # compressor projections run in fp32
        if self.ratio == 1:
            return kv, None
        gate = F.linear(h.float(), self.wgate.weight.float())
        if slots is None:  # ape tiled along the blocks: its gradient is a plain sum (an index's backward,
            t = h.shape[1]  # an accumulating scatter, gave run-to-run different sums on 2 threads)
            return kv, gate + self.ape.float().repeat(-(-t // self.ratio), 1)[:t]
        return kv, gate + self.ape.float()[slots]

    def finish(self, pooled: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm, then RoPE at each entry's first position (cos/sin given at those positions), then
        out_transform if set. The fp32 pool is cast to the compressor's weight dtype before the norm, where
        the official code casts it (a no-op in fp32; in bf16 the entries round there first)."""
        # the model's dtype: the weight's, or the dtype a kept FP8 projection dequantises to (no dequantisation)
        model_dtype = getattr(self.wkv, "dtype", None) or self.wkv.weight.dtype
        out = apply_rope(self.norm(pooled.to(model_dtype)), cos, sin).to(dtype)
        return out if self.out_transform is None else self.out_transform(out)

    def _prev_block(
        self, state: CompressorState, rows: torch.Tensor, first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Path-b (first c channels) slots of the block before the block starting at `first` [B], from the
        state; -inf / 0 for block 0 (block 0 pads with -inf logits and zero values)."""
        c, m = self.head_dim, self.ratio
        pp = first[:, None] - m + torch.arange(m, device=first.device)
        none = (first < m)[:, None, None]
        pk = state.kv.read(rows, pp)[..., :c].masked_fill(none, 0.0)
        pg = state.gate.read(rows, pp)[..., :c].masked_fill(none, float("-inf"))
        return pk, pg

    def chunk(
        self, h: torch.Tensor, start: int, state: CompressorState, rows: torch.Tensor, rope: Rotary
    ) -> tuple[int, torch.Tensor | None]:
        """Positions start .. start+T-1 of rows (h [B,T,d], all rows at `start`) -> (j0, entries [B, n, c]
        fp32 of the n >= 0 blocks they complete, the first being block j0); the state keeps the projections.
        rope: the compressed-branch Rotary (entries are rotated at their block's first position)."""
        m, t = self.ratio, h.shape[1]
        pos = start + torch.arange(t, device=h.device)
        kv_new, gate_new = self.project(h, pos % m)
        assert gate_new is not None  # ratio > 1: the gate exists
        r0 = start % m
        first = start - r0
        kv, gate = kv_new, gate_new
        if r0:  # the partial block from the state goes in front
            old = torch.arange(first, start, device=h.device)
            kv = torch.cat([state.kv.read(rows, old), kv], 1)
            gate = torch.cat([state.gate.read(rows, old), gate], 1)
        n = (r0 + t) // m
        out: torch.Tensor | None = None
        if n:
            prev_kv: torch.Tensor | None = None
            prev_gate: torch.Tensor | None = None
            if self.overlap:
                prev_kv, prev_gate = self._prev_block(state, rows, torch.full_like(rows, first))
            pooled = self.pool(
                kv[:, : n * m].unflatten(1, (n, m)), gate[:, : n * m].unflatten(1, (n, m)), prev_kv, prev_gate
            )
            cos, sin = rope.cos_sin((first // m + torch.arange(n, device=h.device)) * m)
            out = self.finish(pooled, cos, sin, torch.float32)
        state.kv.write(rows, start, kv_new)
        state.gate.write(rows, start, gate_new)
        return first // m, out

    def step(
        self, h: torch.Tensor, pos: torch.Tensor, state: CompressorState, rows: torch.Tensor, rope: Rotary
    ) -> torch.Tensor:
        """One token per row (h [B,1,d]) at per-row positions pos [B] -> the entry of each row's current
        block [B, c] (fp32), pooled over the slots written so far: it is the final entry iff
        (pos + 1) % m == 0, and invisible to every query before that (static shapes: no branching on pos)."""
        m = self.ratio
        kv, gate = self.project(h, (pos % m)[:, None])
        assert gate is not None  # ratio > 1: the gate exists
        state.kv.write_at(rows, pos, kv[:, 0])
        state.gate.write_at(rows, pos, gate[:, 0])
        first = pos - pos % m
        blk = first[:, None] + torch.arange(m, device=pos.device)
        prev_kv: torch.Tensor | None = None
        prev_gate: torch.Tensor | None = None
        if self.overlap:
            prev_kv, prev_gate = self._prev_block(state, rows, first)
        pooled = self.pool(state.kv.read(rows, blk)[:, None], state.gate.read(rows, blk)[:, None], prev_kv, prev_gate)[
            :, 0
        ]
        cos, sin = rope.cos_sin(first)
        return self.finish(pooled, cos, sin, torch.float32)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h: [B, T, d]; cos/sin: compressed-branch rope at positions 0..T-1. Returns [B, T // m, c]."""
        b, t, _ = h.shape
        m = self.ratio
        if m == 1:
            return self.finish(self.project(h)[0], cos, sin, h.dtype)
        n = t // m
        if n == 0:
            return h.new_zeros(b, 0, self.head_dim)
        kv, gate = self.project(h[:, : n * m])
        assert gate is not None  # m > 1: the gate exists
        pooled = self.pool(kv.unflatten(1, (n, m)), gate.unflatten(1, (n, m)))
        return self.finish(pooled, cos[..., : n * m : m, :], sin[..., : n * m : m, :], h.dtype)
