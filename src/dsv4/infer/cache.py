"""Per-layer inference caches for V4 attention (spec section 2; official model.py keeps the same state).

Every piece of state is addressed by absolute position, so a cache can be rolled back (speculative
decoding) by lowering its length, and continued by a chunk of any size:
- SWA / CSA / HCA: a ring of the last n_win + spare raw kv (slot = position mod (n_win + spare));
- CSA / HCA: the compressor's projections (C and Z + ape, fp32) of the last 2m (overlapped CSA) or
  m (HCA) positions + spare (slot = position mod that) -- the partial block and the block before it --,
  the emitted compressed entries, and (CSA) the indexer's compressed keys with their own state;
- DSA (ratio 1): the raw kv of every position and the indexer keys;
- Engram layers (spec section 4): the last max_order - 1 canonical ids and the last (K - 1) * dilation
  conv inputs RMSNorm(U) + spare (EngramState, slot = position mod size).
The `spare` slots let the last spare + 1 tokens be rolled back (their writes only overwrote
positions nobody needs any more). Long stores grow in pages (`page` positions at a time, amortised doubling), never per token.

`ModelCache` holds one `LayerCache` per block (and per MTP block) for `batch` slots (requests) and
each slot's length. A forward with T > 1 tokens (prefill, a chunk of it, or speculative verification)
needs the rows it touches to share one length; a T = 1 step (decode) may mix lengths.
"""
from __future__ import annotations

import torch

from dsv4.kernels.decode_attention import decode_attention
from dsv4.kernels.indexer_topk import chunked_indexer_topk
from dsv4.kernels.sparse_attention import dense_entries_attention, sparse_attention, window_attention
from dsv4.quant.kv import KVCodec


class CacheError(ValueError):
    pass


class PagedStore:
    """[batch, capacity, stored width] rows by position (codec-encoded), grown `page` positions at a time
    (doubling)."""

    def __init__(self, batch: int, codec: KVCodec, capacity: int, page: int, device):
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


class CompressorState:
    """fp32 C and Z + ape of the last R positions (R = 2m overlapped, m plain), slot = position mod R."""

    def __init__(self, comp, batch: int, device, spare: int):
        self.comp = comp
        self.m = comp.ratio
        self.r = (2 * self.m if comp.overlap else self.m) + spare
        width = comp.wkv.weight.shape[0]
        self.kv = torch.zeros(batch, self.r, width, device=device)
        self.gate = torch.zeros(batch, self.r, width, device=device)

    def _prev(self, rows: torch.Tensor, first: torch.Tensor):
        """First-half (path b) slots of the block before the block starting at `first` [B]; -inf / 0 for
        block 0 (spec section 2: block 0 pads with -inf logits and zero values)."""
        c = self.comp.head_dim
        pp = (first[:, None] - self.m + torch.arange(self.m, device=first.device)) % self.r
        none = (first < self.m)[:, None, None]
        pk = self.kv[rows[:, None], pp][..., :c].masked_fill(none, 0.0)
        pg = self.gate[rows[:, None], pp][..., :c].masked_fill(none, float("-inf"))
        return pk, pg

    def chunk(self, h: torch.Tensor, start: int, rows: torch.Tensor, rope, store: PagedStore) -> None:
        """Positions start..start+T-1 of rows (all at `start`): emit every block they complete."""
        m, t = self.m, h.shape[1]
        pos = start + torch.arange(t, device=h.device)
        kv_new, gate_new = self.comp.project(h, pos % m)
        r0 = start % m
        first = start - r0
        kv, gate = kv_new, gate_new
        if r0:  # the partial block from the cache goes in front
            old = torch.arange(first, start, device=h.device) % self.r
            kv = torch.cat([self.kv[rows][:, old], kv], 1)
            gate = torch.cat([self.gate[rows][:, old], gate], 1)
        n = (r0 + t) // m
        if n:
            prev_kv = prev_gate = None
            if self.comp.overlap:
                prev_kv, prev_gate = self._prev(rows, torch.full_like(rows, first))
            pooled = self.comp.pool(kv[:, :n * m].unflatten(1, (n, m)), gate[:, :n * m].unflatten(1, (n, m)),
                                    prev_kv, prev_gate)
            j0 = first // m
            cos, sin = rope.cos_sin((j0 + torch.arange(n, device=h.device)) * m)
            store.ensure(j0 + n)
            store.data[rows, j0:j0 + n] = store.codec.encode(self.comp.finish(pooled, cos, sin, torch.float32))
        keep = torch.arange(max(start, start + t - self.r), start + t, device=h.device)
        self.kv[rows[:, None], (keep % self.r)[None]] = kv_new[:, keep - start]
        self.gate[rows[:, None], (keep % self.r)[None]] = gate_new[:, keep - start]

    def step(self, h: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, rope, store: PagedStore) -> None:
        """One token per row (h [B,1,d]) at per-row positions pos [B]; rows that complete a block emit it."""
        m = self.m
        kv, gate = self.comp.project(h, (pos % m)[:, None])
        self.kv[rows, pos % self.r] = kv[:, 0]
        self.gate[rows, pos % self.r] = gate[:, 0]
        done = ((pos + 1) % m == 0).nonzero()[:, 0]
        if done.numel() == 0:
            return
        rows, pos = rows[done], pos[done]
        first = pos - m + 1
        blk = (first[:, None] + torch.arange(m, device=pos.device)) % self.r
        prev_kv = prev_gate = None
        if self.comp.overlap:
            prev_kv, prev_gate = self._prev(rows, first)
        pooled = self.comp.pool(self.kv[rows[:, None], blk][:, None], self.gate[rows[:, None], blk][:, None],
                                prev_kv, prev_gate)[:, 0]
        cos, sin = rope.cos_sin(first)
        j = first // m
        store.ensure(int(j.max()) + 1)
        store.data[rows, j] = store.codec.encode(self.comp.finish(pooled, cos, sin, torch.float32))


class EngramState:
    """Engram decode state: rings of the last P_ids = max_order - 1 canonical ids (for the n-gram hash)
    and the last P_conv = (K - 1) * dilation conv inputs [hc, d] (fp32 or wider), + spare + 1 slots
    (slot = position mod size) so the last spare + 1 tokens can be rolled back."""

    def __init__(self, engram, batch: int, device, spare: int, dtype: torch.dtype):
        self.p_ids, self.p_conv = max(engram.orders) - 1, (engram.kernel - 1) * engram.dilation
        self.r_ids, self.r_conv = self.p_ids + spare + 1, self.p_conv + spare + 1
        self.pad_id = engram.pad_id
        self.ids = torch.full((batch, self.r_ids), self.pad_id, dtype=torch.long, device=device)
        self.z = torch.zeros(batch, self.r_conv, engram.hc, engram.d, device=device,
                             dtype=torch.promote_types(dtype, torch.float32))

    def history(self, rows: torch.Tensor, p0: torch.Tensor):
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
    """The cache of one attention layer; `attend` runs its core op for a chunk or a decode step."""

    def __init__(self, attn, batch: int, capacity: int, fmt, device, rope, page: int, spare: int, rope_dim: int):
        self.kind, self.m, self.win = attn.kind, attn.ratio, attn.window
        self.rw = self.win + spare
        self.rope = rope
        c = attn.head_dim
        self.codec = KVCodec(c, rope_dim, fmt)
        icodec = KVCodec(attn.indexer.head_dim, rope_dim, fmt) if self.kind in ("csa", "dsa") else None
        if self.kind == "dsa":
            self.raw = PagedStore(batch, self.codec, capacity, page, device)
            self.ikeys = PagedStore(batch, icodec, capacity, page, device)
        else:
            self.ring = torch.zeros(batch, self.rw, self.codec.stored_width, dtype=self.codec.dtype, device=device)
        if self.kind in ("csa", "hca"):
            self.entries = PagedStore(batch, self.codec, capacity // self.m, page, device)
            self.comp = CompressorState(attn.compressor, batch, device, spare)
        if self.kind == "csa":
            self.ikeys = PagedStore(batch, icodec, capacity // self.m, page, device)
            self.icomp = CompressorState(attn.indexer.compressor, batch, device, spare)
        self.rows = self.view = None  # set by ModelCache.begin: row ids [B], and a slice when contiguous
        self.engram = None  # an EngramState when the block has an Engram layer (set by ModelCache)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.ring] if hasattr(self, "ring") else []
        out += [s.data for s in (getattr(self, a, None) for a in ("raw", "ikeys", "entries")) if s is not None]
        out += [t for st in (getattr(self, a, None) for a in ("comp", "icomp")) if st is not None for t in (st.kv, st.gate)]
        if self.engram is not None:
            out += self.engram.tensors()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def attend(self, attn, x, c_q, q, kv, cos, sin, positions) -> torch.Tensor:
        """q [B,T,H,c] and kv [B,T,c] (roped) of this layer at `positions` -> core output [B,T,H,c]."""
        if positions.dim() == 1:
            return self._chunk(attn, x, c_q, q, kv, cos, sin, positions)
        return self._step(attn, x, c_q, q, kv, cos, sin, positions[:, 0])

    # ------------------------------------------------------------------ chunk (prefill)
    def _chunk(self, attn, x, c_q, q, kv, cos, sin, q_pos):
        rows, dev = self.rows, q.device
        start, t = int(q_pos[0]), q.shape[1]
        common = (attn.attn_sink, attn.scale, self.win, q_pos)
        if self.kind == "dsa":
            self.raw.ensure(start + t)
            self.raw.data[rows, start:start + t] = self.codec.encode(kv)
            band = self.codec.decode(self.raw.data[rows, :start + t], kv.dtype)
            kv_pos = torch.arange(start + t, device=dev)
        else:
            w = min(start, self.win - 1)
            old = torch.arange(start - w, start, device=dev)
            band = torch.cat([self.codec.decode(self.ring[rows][:, old % self.rw], kv.dtype), kv], 1)
            kv_pos = torch.arange(start - w, start + t, device=dev)
            keep = torch.arange(max(start, start + t - self.rw), start + t, device=dev)
            self.ring[rows[:, None], (keep % self.rw)[None]] = self.codec.encode(kv[:, keep - start])
        if self.kind == "swa":
            return window_attention(q, band, *common, kv_pos)
        n = (start + t) // self.m
        if self.kind == "hca":
            self.comp.chunk(x, start, rows, self.rope, self.entries)
            return dense_entries_attention(q, band, *common, kv_pos, self.codec.decode(self.entries.data[rows, :n], q.dtype),
                                           ratio=self.m)
        ix = attn.indexer
        if self.kind == "csa":
            self.comp.chunk(x, start, rows, self.rope, self.entries)
            self.icomp.chunk(x, start, rows, self.rope, self.ikeys)
            entries = self.codec.decode(self.entries.data[rows, :n], q.dtype)
        else:
            self.ikeys.ensure(start + t)
            self.ikeys.data[rows, start:start + t] = self.ikeys.codec.encode(ix.compressor(x, cos, sin))
            entries = band
        qi, wi = ix.queries(x, c_q, cos, sin)
        idx = chunked_indexer_topk(qi, wi, self.ikeys.codec.decode(self.ikeys.data[rows, :n]), ix.topk, q_pos, ix.ratio,
                                   ix.exclude_window)
        return sparse_attention(q, band, *common, kv_pos, entries, idx)

    # ------------------------------------------------------------------ step (decode)
    def _step(self, attn, x, c_q, q, kv, cos, sin, pos):
        rows, rv, dev = self.rows, self.view, q.device
        if self.kind == "dsa":
            self.raw.ensure(int(pos.max()) + 1)
            self.raw.data[rows, pos] = self.codec.encode(kv[:, 0])
            wpos = pos[:, None] - torch.arange(self.win, device=dev)
            parts = [(self.raw.data[rows[:, None], wpos.clamp_min(0)], wpos >= 0)]
        else:
            self.ring[rows, pos % self.rw] = self.codec.encode(kv[:, 0])
            slot_pos = pos[:, None] - (pos[:, None] - torch.arange(self.rw, device=dev)) % self.rw
            parts = [(self.ring[rv], (slot_pos >= 0) & (slot_pos > pos[:, None] - self.win))]
        if self.kind in ("csa", "hca"):
            self.comp.step(x, pos, rows, self.rope, self.entries)
        if self.kind == "hca":
            n = (pos + 1) // self.m
            parts.append((self.entries.data[rv, :int(n.max())], torch.arange(int(n.max()), device=dev) < n[:, None]))
        elif self.kind in ("csa", "dsa"):
            ix = attn.indexer
            if self.kind == "csa":
                self.icomp.step(x, pos, rows, self.rope, self.ikeys)
                store = self.entries
            else:
                self.ikeys.ensure(int(pos.max()) + 1)
                self.ikeys.data[rows, pos] = self.ikeys.codec.encode(ix.compressor(x, cos, sin)[:, 0])
                store = self.raw
            qi, wi = ix.queries(x, c_q, cos, sin)
            idx = self._topk(qi, wi, pos, ix)
            parts.append((store.data[rows[:, None], idx.clamp_min(0)], idx >= 0))
        parts = [(self.codec.decode(k, q.dtype), v) for k, v in parts]
        return decode_attention(q[:, 0], parts, attn.attn_sink, attn.scale).unsqueeze(1)

    def _topk(self, qi, wi, pos, ix) -> torch.Tensor:
        """Indexer top-k per row [B, k'] (-1 = none); rows at one position share one call."""
        rows = self.rows
        lim = ((pos + 1 - ix.exclude_window) // ix.ratio).clamp_min(0)
        kk = min(ix.topk, int(lim.max()))
        out = torch.full((pos.shape[0], kk), -1, dtype=torch.long, device=pos.device)
        if kk == 0:
            return out
        groups = [torch.arange(pos.shape[0], device=pos.device)] if bool((pos == pos[0]).all()) else \
            [g.nonzero()[:, 0] for g in (pos[None, :] == pos.unique()[:, None])]
        for g in groups:
            n = int(lim[g[0]])
            if n == 0:
                continue
            keys = self.ikeys.data[self.view, :n] if len(groups) == 1 else self.ikeys.data[rows[g], :n]
            keys = self.ikeys.codec.decode(keys)
            idx = chunked_indexer_topk(qi[g], wi[g], keys, ix.topk, pos[g[:1]],
                                       ix.ratio, ix.exclude_window)
            out[g, :idx.shape[-1]] = idx[:, 0]
        return out


class ModelCache:
    """Caches of every attention layer of `model` for `batch` request slots, plus each slot's length.

    capacity: positions preallocated per slot (stores grow in pages beyond it); dtype: storage of kv /
    entries / indexer keys: a torch dtype (default: the model's) or "fp8" (FP8 non-rope dims with
    power-of-two scales + BF16 rope dims, dsv4.quant.kv); compressor states stay fp32.
    """

    def __init__(self, model, batch: int = 1, capacity: int = 4096, dtype: torch.dtype | str | None = None,
                 page: int = 4096, spare: int = 3):
        if batch < 1:
            raise CacheError(f"cache batch must be >= 1, got {batch}")
        p = next(model.parameters())
        dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
        self.batch, self.max_len, self.max_rollback = batch, model.cfg.max_position_embeddings, spare + 1
        self.lengths = torch.zeros(batch, dtype=torch.long, device=p.device)
        self.mtp_lengths = torch.zeros(batch, dtype=torch.long, device=p.device)  # positions the MTP block saw
        rope = model.rope_compress
        args = (batch, capacity, dtype, p.device, rope, page, spare, model.cfg.qk_rope_head_dim)
        self.layers = [LayerCache(b.attn, *args) for b in model.layers]
        for lc, b in zip(self.layers, model.layers):
            if getattr(b, "engram", None) is not None:
                lc.engram = EngramState(b.engram, batch, p.device, spare, p.dtype if p.is_floating_point()
                                        else torch.float32)
        self.mtp_layers = [LayerCache(b.attn, *args) for b in model.mtp]

    def nbytes(self) -> int:
        """Bytes allocated (including page headroom)."""
        return sum(lc.nbytes() for lc in self.layers + self.mtp_layers)

    def used_bytes(self, row: int = 0, mtp: bool = False) -> dict:
        """Bytes holding row's context: {"per_position": stores that grow with the context (entries,
        indexer keys, raw kv), "fixed": rings and compressor states, "per_token": per_position / length}."""
        n = int(self.lengths[row])
        grow = fixed = 0
        for lc in self.layers + (self.mtp_layers if mtp else []):
            for name in ("raw", "ikeys", "entries"):
                st = getattr(lc, name, None)
                if st is not None:
                    rows = n if (name == "raw" or lc.kind == "dsa") else n // lc.m
                    grow += rows * st.data.shape[2] * st.data.element_size()
            if hasattr(lc, "ring"):
                fixed += lc.ring[0].numel() * lc.ring.element_size()
            for st in (getattr(lc, "comp", None), getattr(lc, "icomp", None)):
                if st is not None:
                    fixed += 2 * st.kv[0].numel() * st.kv.element_size()
            if lc.engram is not None:
                fixed += sum(t[0].numel() * t.element_size() for t in lc.engram.tensors())
        return {"per_position": grow, "fixed": fixed, "per_token": grow / max(n, 1), "length": n}

    def rows_of(self, rows) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.batch, device=self.lengths.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device).reshape(-1)
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= self.batch:
            raise CacheError(f"cache rows must be in [0, {self.batch}), got {rows.tolist()}")
        return rows

    def begin(self, rows: torch.Tensor, t: int, mtp: bool = False) -> torch.Tensor:
        """Bind the layers to `rows`; positions of the next t tokens: [t] if the rows share a length,
        else [B, 1] (decode with mixed lengths, t must be 1). mtp: the MTP blocks' lengths."""
        lens = (self.mtp_lengths if mtp else self.lengths)[rows]
        if int(lens.max()) + t > self.max_len:
            raise CacheError(f"context would reach {int(lens.max()) + t} tokens; the model supports "
                             f"{self.max_len} (max_position_embeddings)")
        r0 = int(rows[0])
        view = slice(r0, r0 + rows.numel()) if bool((rows == r0 + torch.arange(rows.numel())).all()) else rows
        for lc in self.layers + self.mtp_layers:
            lc.rows, lc.view = rows, view
        if t == 1:
            return lens[:, None]
        if not bool((lens == lens[0]).all()):
            raise CacheError(f"a {t}-token chunk needs rows of one length, got lengths {lens.tolist()}")
        return int(lens[0]) + torch.arange(t, device=lens.device)

    def advance(self, rows: torch.Tensor, t: int, mtp: bool = False) -> None:
        (self.mtp_lengths if mtp else self.lengths)[rows] += t

    def copy_row(self, src: int, dst) -> None:
        """Make rows `dst` hold the same context as row `src` (e.g. a shared prompt)."""
        dst = self.rows_of(dst)
        for lc in self.layers + self.mtp_layers:
            for t in lc.tensors():
                t[dst] = t[src].clone()
        self.lengths[dst] = int(self.lengths[src])
        self.mtp_lengths[dst] = int(self.mtp_lengths[src])

    def rollback(self, rows, n) -> None:
        """Forget the last n tokens of rows (state is position-addressed: the next tokens overwrite it)."""
        rows = self.rows_of(rows)
        n = torch.as_tensor(n, device=self.lengths.device)
        if int(n.max()) > self.max_rollback:
            raise CacheError(f"can roll back at most {self.max_rollback} tokens (spare={self.max_rollback - 1}), "
                             f"asked for {int(n.max())}")
        self.lengths[rows] = (self.lengths[rows] - n).clamp_min(0)

    def reset(self, rows) -> None:
        rows = self.rows_of(rows)
        self.lengths[rows] = 0
        self.mtp_lengths[rows] = 0
