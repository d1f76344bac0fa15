"""Per-layer inference caches for V4 attention: position-addressed storage only (docs/spec.md section 2;
official model.py keeps the same state). The model attends; the cache stores.

Every piece of state is addressed by absolute position, so a cache can be rolled back (speculative
decoding) by lowering its length, and continued by a chunk of any size:
- SWA / CSA / HCA: a ring of the last n_win + spare raw kv (slot = position mod (n_win + spare));
- CSA / HCA: the compressor's projections (C and Z + ape, fp32) of the last 2m (overlapped CSA) or
  m (HCA) positions + spare (slot = position mod that) -- the partial block and the block before it --,
  the compressed entries, and (CSA) the indexer's compressed keys with their own compressor state;
- DSA (ratio 1): the raw kv of every position and the indexer keys;
- Engram layers (docs/spec.md section 4): the last max_order - 1 canonical ids and the last (K - 1) * dilation
  conv inputs RMSNorm(U) + spare (EngramState, slot = position mod size).
The `spare` slots let the last spare + 1 tokens be rolled back (their writes only overwrote
positions nobody needs any more). Long stores grow in pages (`page` positions at a time, amortised
doubling), never per token, and only in `ModelCache.begin`: inside a forward every store has a fixed
shape, so a decode step has static shapes (what torch.compile needs, dsv4.infer.compiled).

`ModelCache` holds one `LayerCache` per block (and per MTP block) for `batch` slots (requests) and
each slot's length. A forward with T > 1 tokens (prefill, a chunk of it, or speculative verification)
needs the rows it touches to share one length; a T = 1 step (decode) may mix lengths.
This module computes nothing but storage codecs (dsv4.quant.kv) and slot arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypeAlias, cast

import torch

from dsv4.quant.kv import KVCodec

if TYPE_CHECKING:
    from dsv4.model.attention import Attention
    from dsv4.model.compressor import Compressor
    from dsv4.model.engram import Engram
    from dsv4.model.transformer import Block, Transformer

# row ids of a ModelCache as callers give them (ModelCache.rows_of): a tensor, ids, one id, or None = all
Rows: TypeAlias = torch.Tensor | Sequence[int] | int | None


class CacheError(ValueError):
    pass


class PagedStore:
    """[batch, capacity, stored width] rows by position (codec-encoded), grown `page` positions at a time
    (doubling). Reads decode to the asked dtype."""

    def __init__(self, batch: int, codec: KVCodec, capacity: int, page: int, device: torch.device | str) -> None:
        self.page, self.codec = page, codec
        self.data = torch.zeros(batch, self._round(capacity), codec.stored_width, dtype=codec.dtype, device=device)

    def _round(self, n: int) -> int:
        return -(-max(n, 0) // self.page) * self.page

    def ensure(self, n: int) -> None:
        cap = self.data.shape[1]
        if n > cap:
            new = self.data.new_zeros(self.data.shape[0], self._round(max(n, 2 * cap)), self.data.shape[2])
            new[:, :cap] = self.data
            self.data = new

    def write(self, rows: torch.Tensor, start: int, vals: torch.Tensor) -> None:
        """vals [B, n, w] at positions start .. start + n - 1 of rows [B]."""
        self.data[rows, start : start + vals.shape[1]] = self.codec.encode(vals)

    def write_at(self, rows: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> None:
        """vals [B, w] at per-row positions pos [B]."""
        self.data[rows, pos] = self.codec.encode(vals)

    def read(
        self, rows: torch.Tensor | slice, n: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Positions 0 .. n - 1 (default: the whole capacity) of rows (a tensor or a slice) -> [B, n, w]."""
        data = self.data[rows]
        return self.codec.decode(data if n is None else data[:, :n], dtype)

    def gather(self, rows: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """pos [B, k] (clamped to >= 0) -> [B, k, w]."""
        return self.codec.decode(self.data[rows[:, None], pos.clamp_min(0)], dtype)


class Ring:
    """The last `size` positions of [batch, size, width] rows, slot = position mod size; optional codec."""

    def __init__(
        self, batch: int, size: int, width: int, device: torch.device | str, codec: KVCodec | None = None
    ) -> None:
        self.size, self.codec = size, codec
        dtype = torch.float32 if codec is None else codec.dtype
        self.data = torch.zeros(batch, size, width if codec is None else codec.stored_width, dtype=dtype, device=device)

    def _enc(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.codec is None else self.codec.encode(v)

    def _dec(self, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return v.to(dtype) if self.codec is None else self.codec.decode(v, dtype)

    def write(self, rows: torch.Tensor, start: int, vals: torch.Tensor) -> None:
        """vals [B, T, w] at positions start .. start + T - 1 (only the last `size` are kept)."""
        t = vals.shape[1]
        keep = torch.arange(max(0, t - self.size), t, device=vals.device)
        self.data[rows[:, None], ((start + keep) % self.size)[None]] = self._enc(vals[:, keep])

    def write_at(self, rows: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> None:
        """vals [B, w] at per-row positions pos [B]."""
        self.data[rows, pos % self.size] = self._enc(vals)

    def read(self, rows: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """pos [P] (shared) or [B, P] (per row) -> [B, P, w]."""
        pos = pos[None] if pos.dim() == 1 else pos
        return self._dec(self.data[rows[:, None], pos % self.size], dtype)

    def read_all(
        self, rows: torch.Tensor | slice, pos: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot of rows (tensor or slice) as seen from per-row positions pos [B] -> (values [B, size, w],
        slot positions [B, size]: the newest position <= pos held by each slot)."""
        slot = torch.arange(self.size, device=pos.device)
        return self._dec(self.data[rows], dtype), pos[:, None] - (pos[:, None] - slot) % self.size

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]


class CompressorState:
    """fp32 C and Z + ape of the last R positions (R = 2m overlapped, m plain, + spare): two rings."""

    def __init__(self, comp: Compressor, batch: int, device: torch.device | str, spare: int) -> None:
        r = (2 * comp.ratio if comp.overlap else comp.ratio) + spare
        width = comp.wkv.weight.shape[0]
        self.kv = Ring(batch, r, width, device)
        self.gate = Ring(batch, r, width, device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv.data, self.gate.data]


class EngramState:
    """Engram decode state: rings of the last P_ids = max_order - 1 canonical ids (for the n-gram hash)
    and the last P_conv = (K - 1) * dilation conv inputs [hc, d] (fp32 or wider), + spare + 1 slots
    (slot = position mod size) so the last spare + 1 tokens can be rolled back."""

    def __init__(self, engram: Engram, batch: int, device: torch.device | str, spare: int, dtype: torch.dtype) -> None:
        self.p_ids, self.p_conv = max(engram.orders) - 1, (engram.kernel - 1) * engram.dilation
        self.r_ids, self.r_conv = self.p_ids + spare + 1, self.p_conv + spare + 1
        self.pad_id = engram.pad_id
        self.ids = torch.full((batch, self.r_ids), self.pad_id, dtype=torch.long, device=device)
        self.z = torch.zeros(
            batch, self.r_conv, engram.hc, engram.d, device=device, dtype=torch.promote_types(dtype, torch.float32)
        )

    def history(self, rows: torch.Tensor, p0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, P_ids] and conv inputs [B, P_conv, hc, d] at positions p0 - P .. p0 - 1 of each row
        (pad id / zeros before position 0)."""
        pi = p0[:, None] - torch.arange(self.p_ids, 0, -1, device=p0.device)
        ids = self.ids[rows[:, None], pi % self.r_ids].masked_fill(pi < 0, self.pad_id)
        pz = p0[:, None] - torch.arange(self.p_conv, 0, -1, device=p0.device)
        z = self.z[rows[:, None], pz % self.r_conv].masked_fill((pz < 0)[..., None, None], 0.0)
        return ids, z

    def write(self, rows: torch.Tensor, p0: torch.Tensor, ids: torch.Tensor, z: torch.Tensor) -> None:
        """Store ids [B, T] and conv inputs [B, T, hc, d] at positions p0 .. p0 + T - 1 (the last ring-full)."""
        t = ids.shape[1]
        for ring, r, val in ((self.ids, self.r_ids, ids), (self.z, self.r_conv, z)):
            keep = torch.arange(max(0, t - r), t, device=p0.device)
            ring[rows[:, None], (p0[:, None] + keep) % r] = val[:, keep].to(ring.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.z]


class LayerCache:
    """The stores of one attention layer (which ones depends on its kind; see the module docstring).

    window: Ring of raw kv (not DSA); raw: PagedStore of every raw kv (DSA); entries: PagedStore of
    compressed entries (CSA, HCA); ikeys: PagedStore of indexer keys (CSA: compressed, DSA: per token);
    comp / icomp: CompressorState of the attention's / the indexer's compressor; engram: EngramState."""

    window: Ring | None
    raw: PagedStore | None
    entries: PagedStore | None
    ikeys: PagedStore | None
    comp: CompressorState | None
    icomp: CompressorState | None
    rows: torch.Tensor | None
    view: torch.Tensor | slice | None
    engram: EngramState | None

    def __init__(
        self,
        attn: Attention,
        batch: int,
        capacity: int,
        fmt: torch.dtype | str,
        device: torch.device | str,
        page: int,
        spare: int,
        rope_dim: int,
    ) -> None:
        self.kind, self.m, self.win = attn.kind, attn.ratio, attn.window
        self.rw = self.win + spare
        c = attn.head_dim
        self.codec = KVCodec(c, rope_dim, fmt)
        icodec = KVCodec(attn.indexer.head_dim, rope_dim, fmt) if self.kind in ("csa", "dsa") else None
        self.window = self.raw = self.entries = self.ikeys = self.comp = self.icomp = None
        if self.kind == "dsa":
            assert icodec is not None
            self.raw = PagedStore(batch, self.codec, capacity, page, device)
            self.ikeys = PagedStore(batch, icodec, capacity, page, device)
        else:
            self.window = Ring(batch, self.rw, c, device, self.codec)
        epage = max(16, page // max(self.m, 1))  # entry stores count entries: pages of as many tokens as raw
        if self.kind in ("csa", "hca"):
            self.entries = PagedStore(batch, self.codec, capacity // self.m + 1, epage, device)
            self.comp = CompressorState(attn.compressor, batch, device, spare)
        if self.kind == "csa":
            assert icodec is not None
            self.ikeys = PagedStore(batch, icodec, capacity // self.m + 1, epage, device)
            self.icomp = CompressorState(attn.indexer.compressor, batch, device, spare)
        self.rows = self.view = None  # set by ModelCache.begin: row ids [B], and a slice when contiguous
        self.engram = None  # an EngramState when the block has an Engram layer (set by ModelCache)

    def stores(self) -> list[PagedStore]:
        return [s for s in (self.raw, self.entries, self.ikeys) if s is not None]

    def reserve(self, n: int) -> None:
        """Room for positions < n: raw stores n, entry stores n // m + 1 (a decode step writes the entry of
        its block, complete or not, at slot pos // m)."""
        for s in self.stores():
            s.ensure(n if (s is self.raw or self.kind == "dsa") else n // self.m + 1)

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [] if self.window is None else self.window.tensors()
        out += [s.data for s in self.stores()]
        out += [t for st in (self.comp, self.icomp) if st is not None for t in st.tensors()]
        if self.engram is not None:
            out += self.engram.tensors()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class ModelCache:
    """Caches of every attention layer of `model` for `batch` request slots, plus each slot's length.

    capacity: positions preallocated per slot (stores grow in pages beyond it); dtype: storage of kv /
    entries / indexer keys: a torch dtype (default: the model's) or "fp8" (FP8 non-rope dims with
    power-of-two scales + BF16 rope dims, dsv4.quant.kv); compressor states stay fp32.
    """

    def __init__(
        self,
        model: Transformer,
        batch: int = 1,
        capacity: int = 4096,
        dtype: torch.dtype | str | None = None,
        page: int = 4096,
        spare: int = 3,
    ) -> None:
        if batch < 1:
            raise CacheError(f"cache batch must be >= 1, got {batch}")
        p = next(model.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        self.batch, self.max_len, self.max_rollback = batch, model.cfg.max_position_embeddings, spare + 1
        self.lengths = torch.zeros(batch, dtype=torch.long, device=p.device)
        self.mtp_lengths = torch.zeros(batch, dtype=torch.long, device=p.device)  # positions the MTP block saw
        args = (batch, capacity, dtype, p.device, page, spare, model.cfg.qk_rope_head_dim)
        self.layers = [LayerCache(b.attn, *args) for b in cast("Iterable[Block]", model.layers)]
        for lc, b in zip(self.layers, cast("Iterable[Block]", model.layers)):
            if getattr(b, "engram", None) is not None:
                lc.engram = EngramState(
                    cast("Engram", b.engram),
                    batch,
                    p.device,
                    spare,
                    p.dtype if p.is_floating_point() else torch.float32,
                )
        self.mtp_layers = [LayerCache(b.attn, *args) for b in cast("Iterable[Block]", model.mtp)]

    def nbytes(self) -> int:
        """Bytes allocated (including page headroom)."""
        return sum(lc.nbytes() for lc in self.layers + self.mtp_layers)

    def used_bytes(self, row: int = 0, mtp: bool = False) -> dict:
        """Bytes holding row's context: {"per_position": stores that grow with the context (entries,
        indexer keys, raw kv), "fixed": rings and compressor states, "per_token": per_position / length}."""
        n = int(self.lengths[row])
        grow = fixed = 0
        for lc in self.layers + (self.mtp_layers if mtp else []):
            for st in lc.stores():
                rows = n if (st is lc.raw or lc.kind == "dsa") else n // lc.m
                grow += rows * st.data.shape[2] * st.data.element_size()
            rings = ([] if lc.window is None else [lc.window.data]) + [
                t for s in (lc.comp, lc.icomp) if s is not None for t in s.tensors()
            ]
            fixed += sum(t[0].numel() * t.element_size() for t in rings)
            if lc.engram is not None:
                fixed += sum(t[0].numel() * t.element_size() for t in lc.engram.tensors())
        return {"per_position": grow, "fixed": fixed, "per_token": grow / max(n, 1), "length": n}

    def rows_of(self, rows: Rows) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.batch, device=self.lengths.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device).reshape(-1)
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= self.batch:
            raise CacheError(f"cache rows must be in [0, {self.batch}), got {rows.tolist()}")
        return rows

    def begin(self, rows: torch.Tensor, t: int, mtp: bool = False) -> torch.Tensor:
        """Bind the layers to `rows` and make room for t more tokens; positions of the next t tokens: [t]
        if the rows share a length, else [B, 1] (decode with mixed lengths, t must be 1); a T = 1 step
        always gets [B, 1]. mtp: the MTP blocks' lengths."""
        lens = (self.mtp_lengths if mtp else self.lengths)[rows]
        top = int(lens.max()) + t
        if top > self.max_len:
            raise CacheError(
                f"context would reach {top} tokens; the model supports {self.max_len} (max_position_embeddings)"
            )
        r0 = int(rows[0])
        view = slice(r0, r0 + rows.numel()) if bool((rows == r0 + torch.arange(rows.numel())).all()) else rows
        for lc in self.mtp_layers if mtp else self.layers:
            lc.rows, lc.view = rows, view
            lc.reserve(top)
        if t == 1:
            return lens[:, None]
        if not bool((lens == lens[0]).all()):
            raise CacheError(f"a {t}-token chunk needs rows of one length, got lengths {lens.tolist()}")
        return int(lens[0]) + torch.arange(t, device=lens.device)

    def advance(self, rows: torch.Tensor, t: int, mtp: bool = False) -> None:
        (self.mtp_lengths if mtp else self.lengths)[rows] += t

    def copy_row(self, src: int, dst: Rows) -> None:
        """Make rows `dst` hold the same context as row `src` (e.g. a shared prompt)."""
        dst = self.rows_of(dst)
        for lc in self.layers + self.mtp_layers:
            for t in lc.tensors():
                t[dst] = t[src].clone()
        self.lengths[dst] = int(self.lengths[src])
        self.mtp_lengths[dst] = int(self.mtp_lengths[src])

    def rollback(self, rows: Rows, n: int | Sequence[int] | torch.Tensor) -> None:
        """Forget the last n tokens of rows (state is position-addressed: the next tokens overwrite it)."""
        rows = self.rows_of(rows)
        n = torch.as_tensor(n, device=self.lengths.device)
        if int(n.max()) > self.max_rollback:
            raise CacheError(
                f"can roll back at most {self.max_rollback} tokens (spare={self.max_rollback - 1}), "
                f"asked for {int(n.max())}"
            )
        self.lengths[rows] = (self.lengths[rows] - n).clamp_min(0)

    def reset(self, rows: Rows) -> None:
        rows = self.rows_of(rows)
        self.lengths[rows] = 0
        self.mtp_lengths[rows] = 0
