"""V4 attention, one module for every layer type (docs/spec.md section 2; official model.py `Attention`).

q = RoPE(rms(RMSNorm(h W_qa) W_qb)) per head; kv = RoPE(RMSNorm(h W_kv)) is key AND value (MQA).
Keys of query t: the raw window (t - n_win, t] plus, per layer kind,
  swa: nothing more;  hca: all complete compressed entries;  csa: indexer top-k compressed entries;
  dsa (ratio 1): indexer top-k of the raw tokens outside the window (disjoint from it); with
       dsa_rule="v3.2": no window, the top-k of every s <= t (V3.2's selection rule).
Output: de-rotate the rope dims at -t, then grouped projection W_oa (per group) and W_ob.
The core softmax lives in dsv4.kernels.attention so faster kernels slot in there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.kernels.attention import IMPLS, selection_mask
from dsv4.kernels.decode_attention import decode_attention
from dsv4.kernels.indexer_topk import (
    chunked_indexer_topk,
    decode_indexer_topk,
    indexer_selected_scores,
    segment_same_doc,
)
from dsv4.kernels.sparse_attention import dense_entries_attention, sparse_attention, window_attention
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer, indexer_kl, kl_queries, visible_count, visible_entries
from dsv4.model.norm import RMSNorm, rms_norm
from dsv4.model.precision import KeepFP32
from dsv4.model.rope import Rotary, apply_rope

if TYPE_CHECKING:
    from dsv4.infer.cache import LayerCache


@dataclass
class IndexerOut:
    """The indexer's training outputs of one CSA/DSA layer (Attention.forward_indexer)."""

    loss: torch.Tensor | None = None  # indexer_kl(scores, attention mass, allowed entries): indexer_mode only
    queries: torch.Tensor | None = None  # with loss: how many queries its mean is over (kl_queries), 0-dim
    record: dict | None = None  # collect: layer, scores, visible, idx, entry_mask, probs (all [B,T,...])


class Projected(NamedTuple):
    """One layer call's inputs and projections: x [B,T,d], c_q [B,T,q_lora], q [B,T,h,c], kv [B,T,c] (both
    roped at cos/sin [T, r/2])."""

    x: torch.Tensor
    c_q: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


INFER_CHUNK = 4096  # queries per indexer + attention call in inference (memory O(chunk * k), not O(T * k))
# sparse-stage training takes the gather kernels (sparse_indexer_core) when a layer has more than this many
# entries per selected slot; below it the masked kernel over all entries is faster (tiny preset, 2-core CPU,
# CSA fwd + bwd: 256 entries for top-64 masked 305 vs gather 359 ms; 512: 432 vs 345; 1024: 563 vs 279)
SPARSE_STAGE_MIN_ENTRIES = 6


class Attention(KeepFP32):
    fp32_names = ("attn_sink",)

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        d, c, h = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        self.layer_id, self.kind, self.ratio = layer_id, cfg.layer_kind(layer_id), cfg.compress_ratio(layer_id)
        self.n_heads, self.head_dim, self.window, self.groups = h, c, cfg.window_of(layer_id), cfg.o_groups
        self.eps, self.scale = cfg.rms_norm_eps, c**-0.5
        self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * c, bias=False)
        self.wkv = nn.Linear(d, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(h * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, d, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        if self.kind in ("csa", "hca"):
            self.compressor = Compressor(d, c, self.ratio, overlap=self.kind == "csa", eps=cfg.rms_norm_eps)
        if self.kind in ("csa", "dsa"):
            self.indexer = Indexer(cfg, self.ratio, self.window)
        if self.kind in ("csa", "hca"):  # cached inference rotates each new entry at its block's first position
            self.entry_rope = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)
        # core kernel: "sparse" (gather / banded kernels, never O(T^2)), or a key of
        # dsv4.kernels.attention.IMPLS ("chunked", "reference": the masked dense oracle)
        self.impl = "sparse"
        # None: as computed. dsv4.quant.official_quant sets kv_transform (the FP8 kv round trip, so the keys
        # a chunk attends are what a later step reads from the cache) and act_transform (FP8 activations
        # before the grouped output projection's einsum)
        self.kv_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.act_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        # observe_selection(layer_id, q_pos, idx) (None: off): shown every top-k the indexer picks in inference:
        # a chunk's q_pos [t] with idx [B, t, k], a decode step's row positions [B] with idx [B, 1, k] (-1: none);
        # dsv4.eval.needle records what was chosen
        self.observe_selection: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def entry_segments(self, segment_ids: torch.Tensor, n: int) -> torch.Tensor:
        """Document id of the FIRST token each entry pools ([B, N]); an entry is visible to a query only
        if that id equals the query's (ids are nondecreasing along a packed row, so the whole span is
        then inside the query's document)."""
        first = torch.arange(n, device=segment_ids.device) * self.ratio
        if self.kind == "csa":
            first = (first - self.ratio).clamp_min(0)
        return segment_ids[:, first]

    @property
    def uses_compress_rope(self) -> bool:
        return self.kind != "swa"

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped output projection: group g's heads -> W_oa[g] (o_lora_rank each), concat -> W_ob."""
        b, t = o.shape[:2]
        o = o.reshape(b, t, self.groups, -1)
        if self.act_transform is not None:
            o = self.act_transform(o)
        w = self.wo_a.weight.view(self.groups, -1, o.shape[-1])
        o = torch.einsum("btgi,goi->btgo", o, w).flatten(2)
        return self.wo_b(o)

    def project_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Projected:
        """-> c_q = RMSNorm(x W_qa) [B,T,q_lora], q [B,T,h,c] and kv [B,T,c], both roped at cos/sin."""
        c_q = self.q_norm(self.wq_a(x))
        q = rms_norm(self.wq_b(c_q).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if self.kv_transform is not None:
            kv = self.kv_transform(kv)
        return Projected(x, c_q, q, kv, cos, sin)

    def attend(
        self,
        kernel: Any,
        q: torch.Tensor,
        band: torch.Tensor,
        q_pos: torch.Tensor,
        kv_pos: torch.Tensor,
        *rest: Any,
        **kw: Any,
    ) -> Any:
        """kernel(q, band, sink, scale, window, q_pos, kv_pos, *rest, **kw): this layer's sink, scale and window
        passed to one attention kernel of dsv4.kernels."""
        return kernel(q, band, self.attn_sink, self.scale, self.window, q_pos, kv_pos, *rest, **kw)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B,T,d]; cos/sin [T, r/2] for this layer's rope; positions [T]; segment_ids [B,T] document
        ids for sample-level masking (None = one document per row). cache: a dsv4.infer.cache.LayerCache
        (positions [T] for a chunk of rows at one length, [B, 1] for a decode step). The uncached kernel
        is self.impl (Transformer.set_attention_impl)."""
        p = self.project_in(x, cos, sin)
        if cache is not None and positions.dim() == 2:
            o = self.step_core(p, positions[:, 0], cache)
        elif cache is not None:
            o = self.sparse_core(p, *self.cached_keys(p, positions, cache), positions)
        elif self.impl == "sparse":
            o = self.sparse_core(p, *self.keys(p, positions), positions, segment_ids)
        else:
            o, _ = self.masked_core(p, positions, segment_ids, self.impl)
        return self.finish(o, cos, sin)

    def finish(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Core output o [B,T,h,c] -> [B,T,d]: de-rotate the rope dims at -t, then the grouped projection."""
        return self.project_out(apply_rope(o, cos, sin, inverse=True))

    @property
    def masked_impl(self) -> str:
        """The masked dense kernel (a key of IMPLS) of forward_indexer: self.impl, "chunked" for "sparse"."""
        return "chunked" if self.impl == "sparse" else self.impl

    def forward_indexer(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        indexer_mode: str | None = None,
        collect: bool = False,
    ) -> tuple[torch.Tensor, IndexerOut | None]:
        """Uncached forward (rope = (cos, sin)) that exposes the indexer -> (out [B,T,d], IndexerOut for CSA/DSA,
        None otherwise).
        The sparse stage (indexer_mode "sparse", impl "sparse", no collect) of a CSA/DSA layer with more than
        SPARSE_STAGE_MIN_ENTRIES x top-k entries runs sparse_indexer_core; everything else needs the
        attention mass on every entry, so it runs self.masked_impl. indexer_mode "dense" (warm-up:
        dense attention over every visible entry) or "sparse" (top-k attention) adds the KL loss on a
        detached indexer input; collect keeps the scores, selections and attention mass (IndexerOut.record)."""
        cos, sin = rope
        p = self.project_in(x, cos, sin)
        ix: IndexerOut | None
        if (
            indexer_mode == "sparse"
            and not collect
            and self.impl == "sparse"
            and self.kind in ("csa", "dsa")
            and x.shape[1] // self.ratio > SPARSE_STAGE_MIN_ENTRIES * self.indexer.topk
        ):
            o, ix = self.sparse_indexer_core(p, positions, segment_ids)
        else:
            o, ix = self.masked_core(p, positions, segment_ids, self.masked_impl, indexer_mode, collect)
        return self.finish(o, cos, sin), ix

    def masked_core(
        self,
        p: Projected,
        positions: torch.Tensor,
        segment_ids: torch.Tensor | None,
        impl: str,
        indexer_mode: str | None = None,
        collect: bool = False,
    ) -> tuple[torch.Tensor, IndexerOut | None]:
        """Keys through an explicit [B,T,N] entry mask and IMPLS[impl] -> (o [B,T,h,c], IndexerOut or None).
        The IndexerOut (CSA/DSA, when indexer_mode or collect is given) needs the entry probabilities."""
        x, c_q, q, kv, cos, sin = p
        b, t, _ = x.shape
        entries: torch.Tensor | None = None
        entry_mask: torch.Tensor | None = None
        same_doc: torch.Tensor | None = None
        if self.kind in ("csa", "hca"):
            entries = self.compressor(x, cos, sin)
        elif self.kind == "dsa":
            entries = kv
        if entries is not None and segment_ids is not None:
            same_doc = segment_ids[:, :, None] == self.entry_segments(segment_ids, entries.shape[1])[:, None, :]
        if self.kind == "hca":
            assert entries is not None  # compressed entries
            entry_mask = visible_entries(positions, entries.shape[1], self.ratio).expand(b, t, -1)
            if same_doc is not None:
                entry_mask = entry_mask & same_doc
        elif self.kind in ("csa", "dsa"):
            # indexer training (docs/spec.md section 2): its input is detached, so only the indexer learns from
            # its KL loss; "dense" = warm-up with dense attention over every visible entry
            assert entries is not None  # compressed entries (CSA) or the raw kv (DSA)
            xi, cqi = (x.detach(), c_q.detach()) if indexer_mode else (x, c_q)
            idx, scores, visible = self.indexer(xi, cqi, cos, sin, positions, same_doc)
            entry_mask = visible if indexer_mode == "dense" else selection_mask(idx, entries.shape[1])
        want_probs = bool(indexer_mode or collect) and self.kind in ("csa", "dsa")
        seg = dict(q_seg=segment_ids, kv_seg=segment_ids)
        res = self.attend(IMPLS[impl], q, kv, positions, positions, entries, entry_mask, want_probs, **seg)
        if not want_probs:
            return res, None
        o, probs = res
        ix = IndexerOut()
        if indexer_mode:
            assert entry_mask is not None  # want_probs: a CSA/DSA layer, whose branch above set it
            ix.loss = indexer_kl(scores, probs.detach(), entry_mask)
            ix.queries = kl_queries(entry_mask, torch.where(entry_mask, probs.detach(), 0.0).sum(-1)).sum()
        if collect:
            ix.record = dict(
                layer=self.layer_id,
                scores=scores.detach(),
                visible=visible,
                idx=idx,
                entry_mask=entry_mask,
                probs=probs.detach(),
            )
        return o, ix

    def sparse_indexer_core(
        self, p: Projected, positions: torch.Tensor, segment_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, IndexerOut]:
        """Sparse-stage training of a CSA/DSA layer without any [B,T,N] tensor -> (o, IndexerOut with the KL).
        The indexer (on its detached input) picks the top-k; the gather kernel attends window + selection
        and returns its mass on each selected entry; the indexer's scores of the selected entries alone
        carry the KL's gradient. The same loss and output as masked_core(..., indexer_mode="sparse"), the
        reference twin (tests compare the two, forward and backward)."""
        x, c_q, q, kv, cos, sin = p
        ix, xi, cqi = self.indexer, x.detach(), c_q.detach()
        entries = kv if self.kind == "dsa" else self.compressor(x, cos, sin)
        ikeys = ix.keys(xi, cos, sin)
        qi, wi = ix.queries(xi, cqi, cos, sin)
        entry_seg = None if segment_ids is None else self.entry_segments(segment_ids, entries.shape[1])
        same = None if segment_ids is None else segment_same_doc(segment_ids, cast(torch.Tensor, entry_seg))
        with torch.no_grad():
            idx = chunked_indexer_topk(qi, wi, ikeys, ix.topk, positions, ix.ratio, ix.exclude_window, same_doc_fn=same)
        seg = dict(q_seg=segment_ids, kv_seg=segment_ids)
        o, mass = self.attend(
            sparse_attention, q, kv, positions, positions, entries, idx, return_entry_probs=True, **seg
        )
        selected = indexer_selected_scores(qi, wi, ikeys, idx)
        chosen = idx >= 0
        n = kl_queries(chosen, torch.where(chosen, mass.detach(), 0.0).sum(-1)).sum()
        return o, IndexerOut(loss=indexer_kl(selected, mass.detach(), chosen), queries=n)

    # ------------------------------------------------------------------ key plans
    def keys(
        self, p: Projected, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keys from the current tokens (uncached): (raw band [B,T,c], its positions [T], entries [B,N,c]
        or None, indexer keys [B,N_I,c_I] or None)."""
        x, kv, cos, sin = p.x, p.kv, p.cos, p.sin
        if self.kind == "swa":
            return kv, positions, None, None
        entries = kv if self.kind == "dsa" else self.compressor(x, cos, sin)
        ikeys = self.indexer.keys(x, cos, sin) if self.kind in ("csa", "dsa") else None
        return kv, positions, entries, ikeys

    def cached_keys(
        self, p: Projected, q_pos: torch.Tensor, cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The same key plan for a chunk continuing cached rows (all at position start = q_pos[0]): the new
        kv, entries and indexer keys are stored first, then the keys are read back (window band: the ring's
        last n_win - 1 positions + the chunk; DSA: every raw position)."""
        x, kv, cos, sin = p.x, p.kv, p.cos, p.sin
        rows, start, t = cache.rows, int(q_pos[0]), x.shape[1]
        assert rows is not None  # bound by ModelCache.begin
        if self.kind == "dsa":
            assert cache.raw is not None
            cache.raw.write(rows, start, kv)
            band, kv_pos = cache.raw.read(rows, start + t, kv.dtype), torch.arange(start + t, device=x.device)
        else:
            assert cache.window is not None
            w = min(start, self.window - 1)
            kv_pos = torch.arange(start - w, start + t, device=x.device)
            band = torch.cat([cache.window.read(rows, kv_pos[:w], kv.dtype), kv], 1)
            cache.window.write(rows, start, kv)
        if self.kind == "swa":
            return band, kv_pos, None, None
        n = (start + t) // self.ratio
        if self.kind == "dsa":
            assert cache.ikeys is not None
            cache.ikeys.write(rows, start, self.indexer.keys(x, cos, sin))
            return band, kv_pos, band, cache.ikeys.read(rows, n)
        assert cache.comp is not None and cache.entries is not None  # CSA / HCA stores
        j0, new = self.compressor.chunk(x, start, cache.comp, rows, self.entry_rope)
        if new is not None:
            cache.entries.write(rows, j0, new)
        entries = cache.entries.read(rows, n, x.dtype)
        if self.kind == "hca":
            return band, kv_pos, entries, None
        assert cache.icomp is not None and cache.ikeys is not None  # CSA indexer stores
        j0, new = self.indexer.compressor.chunk(x, start, cache.icomp, rows, self.entry_rope)
        if new is not None:
            cache.ikeys.write(rows, j0, new)
        return band, kv_pos, entries, cache.ikeys.read(rows, n)

    # ------------------------------------------------------------------ cores
    def sparse_core(
        self,
        p: Projected,
        band: torch.Tensor,
        kv_pos: torch.Tensor,
        entries: torch.Tensor | None,
        ikeys: torch.Tensor | None,
        q_pos: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The long-context path for one key plan: banded window (SWA), dense entries (HCA), chunked
        indexer top-k + gather attention (CSA/DSA). No tensor is O(T^2) or O(T N)."""
        x, c_q, q, _, cos, sin = p
        common: dict[str, Any] = dict(q_seg=segment_ids, kv_seg=segment_ids)
        if self.kind == "swa":
            return self.attend(window_attention, q, band, q_pos, kv_pos, **common)
        assert entries is not None  # HCA / CSA / DSA key plans have entries
        entry_seg = None if segment_ids is None else self.entry_segments(segment_ids, entries.shape[1])
        if self.kind == "hca":
            kw = dict(ratio=self.ratio, entry_seg=entry_seg, **common)
            return self.attend(dense_entries_attention, q, band, q_pos, kv_pos, entries, **kw)
        assert ikeys is not None  # CSA / DSA key plans have indexer keys
        ix = self.indexer
        qi, wi = ix.queries(x, c_q, cos, sin)
        same = None if segment_ids is None else segment_same_doc(segment_ids, cast(torch.Tensor, entry_seg))
        # queries in chunks when nothing needs the whole selection (inference): the top-k ids [T, k] then
        # never exist at once (DSA at 64K: 1 GB of int64 ids), and each chunk's keys stay in cache
        step = q.shape[1] if (same is not None or torch.is_grad_enabled()) else INFER_CHUNK
        outs = []
        for s0 in range(0, q.shape[1], max(step, 1)):
            sl = slice(s0, s0 + step)
            idx = chunked_indexer_topk(
                qi[:, sl], wi[:, sl], ikeys, ix.topk, q_pos[sl], ix.ratio, ix.exclude_window, same_doc_fn=same
            )
            if self.observe_selection is not None:
                self.observe_selection(self.layer_id, q_pos[sl], idx)
            outs.append(self.attend(sparse_attention, q[:, sl], band, q_pos[sl], kv_pos, entries, idx, **common))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @staticmethod
    def _step_span(pos: torch.Tensor, ratio: int, exclude_window: int = 0) -> int | None:
        """Store positions a decode step reads: the whole store (None) when compiled, so that its shapes
        are static; eagerly, only the prefix some row can see (a store may be twice the context)."""
        if torch.compiler.is_compiling():
            return None
        return max(1, int(visible_count(pos.max() + 1, ratio, exclude_window)))

    def step_core(self, p: Projected, pos: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One decode token per row at per-row positions pos [B]; one kernel call attends the parts (window,
        entries). Under torch.compile the shapes are static: every store is read whole (its capacity, fixed
        between ModelCache.begin calls) under validity masks and the indexer's top-k is topk_static.
        Eagerly, only the prefix some row can see is read and topk_eager selects (the same set)."""
        x, c_q, q, kv, cos, sin = p
        rows, view = cache.rows, cache.view
        assert rows is not None and view is not None  # bound by ModelCache.begin
        if self.kind == "dsa":
            assert cache.raw is not None
            cache.raw.write_at(rows, pos, kv[:, 0])
            wpos = pos[:, None] - torch.arange(self.window, device=pos.device)
            parts = [(cache.raw.gather(rows, wpos, q.dtype), wpos >= 0)]
        else:
            assert cache.window is not None
            cache.window.write_at(rows, pos, kv[:, 0])
            keys, slot_pos = cache.window.read_all(view, pos, q.dtype)
            parts = [(keys, (slot_pos >= 0) & (slot_pos > pos[:, None] - self.window))]
        if self.kind in ("csa", "hca"):
            assert cache.entries is not None and cache.comp is not None
            cache.entries.write_at(
                rows, pos // self.ratio, self.compressor.step(x, pos, cache.comp, rows, self.entry_rope)
            )
        if self.kind == "hca":
            assert cache.entries is not None
            entries = cache.entries.read(view, self._step_span(pos, self.ratio), q.dtype)
            n = torch.arange(entries.shape[1], device=pos.device)
            parts.append((entries, n[None] < ((pos + 1) // self.ratio)[:, None]))
        elif self.kind in ("csa", "dsa"):
            ix = self.indexer
            assert cache.ikeys is not None
            if self.kind == "csa":
                assert cache.icomp is not None
                cache.ikeys.write_at(
                    rows, pos // self.ratio, ix.compressor.step(x, pos, cache.icomp, rows, self.entry_rope)
                )
            else:
                cache.ikeys.write_at(rows, pos, ix.keys(x, cos, sin)[:, 0])
            qi, wi = ix.queries(x, c_q, cos, sin)
            keys = cache.ikeys.read(view, self._step_span(pos, ix.ratio, ix.exclude_window))
            limit = visible_count(pos + 1, ix.ratio, ix.exclude_window)
            idx, valid = decode_indexer_topk(qi[:, 0], wi[:, 0], keys, limit, ix.topk)
            if self.observe_selection is not None:  # one query per row: q_pos = the rows' positions [B]
                self.observe_selection(self.layer_id, pos, torch.where(valid, idx, -1)[:, None])
            store = cache.raw if self.kind == "dsa" else cache.entries
            assert store is not None
            parts.append((store.gather(rows, idx, q.dtype), valid))
        return decode_attention(q[:, 0], parts, self.attn_sink, self.scale).unsqueeze(1)
