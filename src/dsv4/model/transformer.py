"""The V4 transformer: embedding, blocks with two mHC units each, hc head, LM head and MTP.

This is the only file that knows the block order (docs/spec.md sections 1 and 5; official model.py
`Block`, `MTPBlock`, `Transformer`). Parameter names equal the official checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.attention import Attention, IndexerOut
from dsv4.model.engram import Engram
from dsv4.model.mhc import hc_head, hc_post, hc_pre, init_hc_head, init_hc_unit
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.precision import KeepFP32
from dsv4.model.rope import Rotary

if TYPE_CHECKING:
    from dsv4.infer.cache import LayerCache, ModelCache, Rows


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when forward(compute_logits=False)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: position i predicts token i+1+k
    aux_loss: torch.Tensor | None = None  # sum of MoE sequence-wise balance losses (training only)
    indexer_loss: torch.Tensor | None = None  # sum over indexer layers of the KL loss (indexer_mode only)
    # return_stats: {"indexer": [IndexerOut.record per CSA/DSA layer], "res_maps": [attn, ffn maps per block],
    # "engram_gate": {layer: mean gate}}
    stats: dict | None = None
    hidden: torch.Tensor | None = None  # final 4-stream state before the hc head
    h: torch.Tensor | None = None  # final normed hidden [B, T, d] (the LM head's input)
    mtp_h: list[torch.Tensor] = field(default_factory=list)  # the same for each MTP depth
    indexers: list[IndexerOut] = field(default_factory=list)  # indexer_mode: each CSA/DSA layer's KL and count


@dataclass
class LayerStats:
    """What one block returns besides its streams when asked (indexer_mode or collect)."""

    indexer: IndexerOut | None = None  # CSA/DSA layers: the indexer's KL loss and (collect) record
    res_maps: tuple[torch.Tensor, ...] = ()  # collect: the attn and ffn units' mHC residual maps, detached
    engram_gate: torch.Tensor | None = None  # collect, Engram layers: the mean gate alpha, detached


class Trunk(NamedTuple):
    x: torch.Tensor  # final streams [B, T, hc, d]
    h: torch.Tensor  # normed hidden [B, T, d]
    aux: list[torch.Tensor]  # the blocks' balance losses
    ropes: dict  # "main" / "compress" -> (cos, sin)
    layers: list[LayerStats]  # one per block when indexer_mode or collect is given, else empty


HC_UNIT = tuple(f"hc_{u}_{p}" for u in ("attn", "ffn") for p in ("fn", "base", "scale"))
HC_HEAD = ("hc_head_fn", "hc_head_base", "hc_head_scale")


class Block(KeepFP32):
    fp32_names = HC_UNIT

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id, self.cfg = layer_id, cfg
        self.attn = Attention(cfg, layer_id)
        self.ffn = MoE(cfg, layer_id)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        mix, hcd = (2 + cfg.hc_mult) * cfg.hc_mult, cfg.hc_mult * cfg.hidden_size
        for unit in ("attn", "ffn"):
            setattr(self, f"hc_{unit}_fn", nn.Parameter(torch.empty(mix, hcd, dtype=torch.float32)))
            setattr(self, f"hc_{unit}_base", nn.Parameter(torch.empty(mix, dtype=torch.float32)))
            setattr(self, f"hc_{unit}_scale", nn.Parameter(torch.empty(3, dtype=torch.float32)))
        # Engram memory (docs/spec.md section 4): added to the streams before the attention unit
        self.engram = Engram(cfg, layer_id) if layer_id in cfg.engram_layer_ids else None

    def _hc(self, unit: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        return hc_pre(
            x,
            getattr(self, f"hc_{unit}_fn"),
            getattr(self, f"hc_{unit}_scale"),
            getattr(self, f"hc_{unit}_base"),
            c.hc_sinkhorn_iters,
            c.hc_eps,
            c.rms_norm_eps,
            c.hc_mode,
        )

    def forward(
        self,
        x: torch.Tensor,
        input_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        reference: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        engram_ids: torch.Tensor | None = None,
        engram_prefetched: tuple[torch.Tensor, torch.Tensor] | None = None,
        indexer_mode: str | None = None,
        collect: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerStats | None]:
        """x: [B, T, hc, d] residual streams -> (new streams, balance loss or None, LayerStats or None).
        engram_ids: canonical ids for the Engram layer (default input_ids). indexer_mode / collect (uncached):
        attention runs Attention.forward_indexer and the block returns its LayerStats; otherwise None."""
        observe = bool(indexer_mode) or collect
        gate = None
        if self.engram is not None:
            args = (
                x,
                input_ids if engram_ids is None else engram_ids,
                positions,
                cache,
                segment_ids,
                engram_prefetched,
            )
            if collect:
                e, alpha = self.engram.forward_gated(*args)
                gate = alpha.detach().mean()
            else:
                e = self.engram(*args)
            x = x + e
        u, post, res_attn = self._hc("attn", x)
        if observe:
            a, ix = self.attn.forward_indexer(self.attn_norm(u), rope, positions, segment_ids, indexer_mode, collect)
        else:
            a, ix = self.attn(self.attn_norm(u), *rope, positions, segment_ids, cache), None
        x = hc_post(a, x, post, res_attn)
        u, post, res_ffn = self._hc("ffn", x)
        y, aux = self.ffn(self.ffn_norm(u), input_ids, reference=reference)
        x = hc_post(y, x, post, res_ffn)
        if not observe:
            return x, aux, None
        return x, aux, LayerStats(ix, (res_attn.detach(), res_ffn.detach()) if collect else (), gate)


class MTPBlock(Block):
    """x = e_proj(enorm(Emb(t_{i+1}))) + h_proj(hnorm(X_i)) per stream, one SWA block, own hc head + norm."""

    fp32_names = HC_UNIT + HC_HEAD

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(  # type: ignore[override]  # an MTP block also takes the next tokens' embeddings
        self, x: torch.Tensor, emb: torch.Tensor, *block_args: Any, **block_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, LayerStats | None]:
        """x: main streams [B,T,hc,d] at positions i; emb: embeddings of tokens i+1 [B,T,d]; block_args:
        Block.forward's arguments after x -> (normed head input [B,T,d], new streams, balance loss or None,
        LayerStats or None)."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(-2) + self.h_proj(self.hnorm(x))
        x, aux, st = super().forward(x, *block_args, **block_kwargs)
        c = self.cfg
        h = hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.hc_eps, c.rms_norm_eps, c.hc_mode)
        return self.norm(h), x, aux, st


class Transformer(KeepFP32):
    fp32_names: tuple[str, ...] = HC_HEAD
    canonical_ids: torch.Tensor  # buffer [vocab_size] (Engram models): canonical id of each token id

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        r = cfg.qk_rope_head_dim
        self.rope_main = Rotary(r, cfg.rope_theta)
        self.rope_compress = Rotary(r, cfg.compress_rope_theta, cfg.rope_scaling)
        if cfg.engram_layer_ids:  # canonical ids for the Engram hash (spec 4.1); identity until set
            self.register_buffer("canonical_ids", torch.arange(cfg.vocab_size), persistent=False)
        self.register_load_state_dict_pre_hook(Transformer._shared_aliases)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @staticmethod
    def _shared_aliases(module: Transformer, state_dict: dict, prefix: str, *_: object) -> None:
        """The official state dict also names the shared embedding and head under each MTP block
        (`mtp.{k}.embed.weight`, `mtp.{k}.head.weight`): accept them when they equal the shared tensors."""
        for k in range(len(module.mtp)):
            for name in ("embed.weight", "head.weight"):
                alias = state_dict.pop(f"{prefix}mtp.{k}.{name}", None)
                if alias is None:
                    continue
                shared = state_dict.setdefault(prefix + name, alias)
                if shared is not alias and not torch.equal(shared, alias):
                    raise ValueError(f"{prefix}mtp.{k}.{name} differs from {prefix}{name}, which it must alias")

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Linear/embedding ~ N(0, initializer_range); norms 1; sinks, ape 0; mHC near a plain residual;
        tid2eid: K distinct random experts per token."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std, hc = self.cfg.initializer_range, self.cfg.hc_mult
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("w1", "w2", "w3") or name.endswith("ffn.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif leaf in ("attn_sink", "ape"):
                p.zero_()
        mtp = list(cast("Iterable[MTPBlock]", self.mtp))
        owners = [self] + mtp
        for blk in list(cast("Iterable[Block]", self.layers)) + mtp:
            for unit in ("attn", "ffn"):
                init_hc_unit(
                    getattr(blk, f"hc_{unit}_fn"),
                    getattr(blk, f"hc_{unit}_scale"),
                    getattr(blk, f"hc_{unit}_base"),
                    hc,
                    std,
                    self.cfg.hc_mode,
                )
            gate = blk.ffn.gate
            if gate.hash:
                gate.tid2eid.copy_(torch.rand(gate.tid2eid.shape[0], gate.n, generator=gen).argsort(-1)[:, : gate.topk])
            else:
                gate.bias.zero_()
        for o in owners:
            init_hc_head(o.hc_head_fn, o.hc_head_scale, o.hc_head_base, hc, std, self.cfg.hc_mode)
        for eng in self.engrams().values():
            eng.conv_weight.zero_()  # the conv path starts as identity (spec 4.6); the table is a row store

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute every buffer no checkpoint holds (rotary frequencies, Engram hash multipliers, routing
        counts, identity canonical ids): after a build on the meta device and `to_empty`, which leave them
        uninitialised (dsv4.convert.official builds a model that way, so it is never allocated twice)."""
        for mod in self.modules():
            init = getattr(mod, "init_buffers", None) if mod is not self else None
            if callable(init):
                init()
        if self.cfg.engram_layer_ids:
            self.canonical_ids.copy_(torch.arange(self.cfg.vocab_size))

    # ---------------------------------------------------------------- engram
    def engrams(self) -> dict[int, Engram]:
        """layer id -> Engram module (empty when engram_layer_ids is empty)."""
        return {b.layer_id: b.engram for b in cast("Iterable[Block]", self.layers) if b.engram is not None}

    def set_canonical_map(self, cmap: torch.Tensor) -> None:
        """Canonical ids [vocab_size] for the Engram hash (dsv4.data.canonical.canonical_map(tokenizer))."""
        cmap = torch.as_tensor(cmap, dtype=torch.long).reshape(-1)
        v = self.cfg.vocab_size
        if cmap.numel() != v or int(cmap.min()) < 0 or int(cmap.max()) >= v:
            raise ValueError(f"canonical map must hold {v} ids in [0, {v}), got {cmap.numel()} ids")
        dev = self.embed.weight.device
        if "canonical_ids" in self._buffers:
            self.canonical_ids = cmap.to(dev)
        else:
            self.register_buffer("canonical_ids", cmap.to(dev), persistent=False)

    def canonical(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.canonical_ids[input_ids] if "canonical_ids" in self._buffers else input_ids

    def engram_rows(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """layer id -> sorted unique table rows the batch reads (for a prefetcher: they depend on ids only);
        pass {layer: (rows, table.read(rows))} as forward(engram_prefetched=...)."""
        ids = self.canonical(input_ids)
        return {i: e.rows_for(ids, segment_ids).unique() for i, e in self.engrams().items()}

    def engram_table_grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer id -> (unique rows, fp32 grads [N, dim]) accumulated since the last call (after backward)."""
        return {i: e.table_grads() for i, e in self.engrams().items()}

    # --------------------------------------------------------------- forward
    def ropes(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"main": self.rope_main.cos_sin(positions), "compress": self.rope_compress.cos_sin(positions)}

    def set_attention_impl(self, name: str) -> None:
        """The one switch of the uncached attention kernel (Attention.impl): 'sparse' (default: gather /
        banded kernels), 'chunked' or 'reference' (masked dense oracle). Forwards that expose the indexer
        (indexer_mode, return_stats) need every entry's attention mass, so there 'sparse' runs 'chunked'
        (Attention.masked_impl). Cached forwards always take the sparse path."""
        from dsv4.kernels.attention import IMPLS

        if name not in IMPLS and name != "sparse":
            raise ValueError(f"unknown attention implementation {name!r}; choose from {sorted(IMPLS) + ['sparse']}")
        for mod in self.modules():
            if isinstance(mod, Attention):
                mod.impl = name

    def mtp_forward(
        self,
        x: torch.Tensor,
        next_ids: torch.Tensor,
        cache: ModelCache,
        rows: Rows = None,
        depth: int = 0,
        compute_logits: bool = True,
        last_only: bool = False,
    ) -> torch.Tensor | None:
        """Cached MTP block `depth` (docs/spec.md section 5): x [B,T,hc,d] = main streams at the next positions the
        MTP cache has not seen, next_ids [B,T] = the tokens one ahead -> logits of the token after those."""
        rows = cache.rows_of(rows)
        positions = cache.begin(rows, x.shape[1], mtp=True)
        h, _, _, _ = self.mtp[depth](
            x, self.embed(next_ids), next_ids, self.ropes(positions)["main"], positions, cache=cache.mtp_layers[depth]
        )
        cache.advance(rows, x.shape[1], mtp=True)
        if not compute_logits:
            return None
        return self.head(h[:, -1:] if last_only else h)

    def trunk(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        reference: bool = False,
        segment_ids: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        engram_prefetched: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        indexer_mode: str | None = None,
        collect: bool = False,
    ) -> Trunk:
        """Embedding, the blocks and the hc head -> Trunk(final streams, normed hidden, balance losses, ropes,
        per-block LayerStats: only with indexer_mode or collect). positions [T], or [B, 1] for a cached
        decode step."""
        b, t = input_ids.shape
        ropes = self.ropes(positions)
        h = self.embed(input_ids)
        x = h.unsqueeze(2).expand(b, t, self.cfg.hc_mult, h.shape[-1]).contiguous()
        aux, layers = [], []
        eids = self.canonical(input_ids) if self.cfg.engram_layer_ids else None
        pre = engram_prefetched or {}
        for i, layer in enumerate(cast("Iterable[Block]", self.layers)):
            rope = ropes["compress"] if layer.attn.uses_compress_rope else ropes["main"]
            x, a, st = layer(
                x,
                input_ids,
                rope,
                positions,
                reference,
                segment_ids,
                None if cache is None else cache.layers[i],
                eids,
                pre.get(i),
                indexer_mode,
                collect,
            )
            if a is not None:
                aux.append(a)
            if st is not None:
                layers.append(st)
        c = self.cfg
        out = self.norm(
            hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.hc_eps, c.rms_norm_eps, c.hc_mode)
        )
        return Trunk(x, out, aux, ropes, layers)

    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """One cached decode step with static shapes: input_ids [B, 1] at positions [B, 1] of rows already
        bound by cache.begin -> next-token logits [B, V]. The caller advances the cache. This is the
        function dsv4.infer.compiled compiles."""
        return self.head(self.trunk(input_ids, positions, cache=cache)[1][:, -1])

    def forward(
        self,
        input_ids: torch.Tensor,
        return_mtp: bool = False,
        return_stats: bool = False,
        reference: bool = False,
        segment_ids: torch.Tensor | None = None,
        indexer_mode: str | None = None,
        compute_logits: bool = True,
        cache: ModelCache | None = None,
        rows: Rows = None,
        last_only: bool = False,
        engram_prefetched: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, V] (+ MTP logits [B, T-k, V] per depth, balance loss, stats).

        segment_ids [B, T]: nondecreasing document ids for sample-level attention masks (packed rows).
        reference=True uses the plain MoE expert loop (the attention oracle is set_attention_impl).
        indexer_mode: None (normal), "dense" (warm-up: dense attention over all visible entries + indexer
        KL) or "sparse" (top-k attention + indexer KL on the selected entries); see docs/spec.md section 2.
        compute_logits=False skips the LM head (out.logits is None; the trainer applies a fused head + CE
        to out.h / out.mtp_h).
        cache: a dsv4.infer.cache.ModelCache; input_ids continue the cached rows `rows` (default all), which
        then advance by T. last_only: logits of the last position only ([B, 1, V]).
        engram_prefetched: layer id -> (sorted unique rows, values) read ahead (see engram_rows)."""
        if indexer_mode not in (None, "dense", "sparse"):
            raise ValueError(f"indexer_mode must be None, 'dense' or 'sparse', got {indexer_mode!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"segment_ids shape {tuple(segment_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        b, t = input_ids.shape
        if cache is not None:
            if segment_ids is not None or indexer_mode or return_stats or return_mtp:
                raise ValueError("a cached forward takes no segment_ids, indexer_mode, return_stats or return_mtp")
            rows = cache.rows_of(rows)
            if rows.numel() != b:
                raise ValueError(f"input_ids has {b} rows but {rows.numel()} cache rows were given")
            positions = cache.begin(rows, t)
        else:
            positions = torch.arange(t, device=input_ids.device)
        x, out, aux, ropes, layers = self.trunk(
            input_ids, positions, reference, segment_ids, cache, engram_prefetched, indexer_mode, return_stats
        )
        if cache is not None:
            assert isinstance(rows, torch.Tensor)  # cache.rows_of(rows) above
            cache.advance(rows, t)
        logits = None if not compute_logits else self.head(out[:, -1:] if last_only else out)
        mtp_logits, mtp_h = [], []
        if return_mtp:
            xk = x
            for k, blk in enumerate(self.mtp, start=1):
                if t - k < 1:
                    break
                emb = self.embed(input_ids[:, k:])
                cos, sin = ropes["main"]
                seg = None if segment_ids is None else segment_ids[:, : t - k]
                # an MTP block with an indexer (V3.2's) trains it as the main layers do
                mode = indexer_mode if getattr(blk.attn, "indexer", None) is not None else None
                hk, xk, a, st = blk(
                    xk[:, : t - k],
                    emb,
                    input_ids[:, k:],
                    (cos[: t - k], sin[: t - k]),
                    positions[: t - k],
                    reference,
                    seg,
                    indexer_mode=mode,
                )
                if a is not None:
                    aux.append(a)
                if st is not None:
                    layers.append(st)
                mtp_h.append(hk)
                if compute_logits:
                    mtp_logits.append(self.head(hk))
        ixs = [s.indexer for s in layers if s.indexer is not None]
        il = [ix.loss for ix in ixs if ix.loss is not None]
        stats = None
        if return_stats:
            stats = {
                "indexer": [ix.record for ix in ixs],
                "res_maps": [r for s in layers for r in s.res_maps],
                "engram_gate": {i: s.engram_gate for i, s in enumerate(layers) if s.engram_gate is not None},
            }
        return ModelOutput(
            logits,
            mtp_logits,
            torch.stack(aux).sum() if aux else None,
            torch.stack(il).sum() if il else None,
            stats,
            x,
            out,
            mtp_h,
            [ix for ix in ixs if ix.loss is not None],
        )
