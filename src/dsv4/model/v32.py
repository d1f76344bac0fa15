"""The DeepSeek-V3.2 family: pre-norm residual blocks of MLA + V3.2 DSA attention (dsv4.model.mla) and a dense
SwiGLU FFN (the first first_k_dense_replace layers) or DeepSeekMoE with V3 group-limited sigmoid routing,
a final RMSNorm and LM head, and V3-style MTP (docs/architecture.md, "The V3.2 family"; official V3.2
inference model.py `Block`, `Transformer`). Parameter names are the official inference names.

  x_{l+1/2} = x_l + Attn(RMSNorm(x_l)),   x_{l+1} = x_{l+1/2} + FFN(RMSNorm(x_{l+1/2})),
  MTP depth k: x = W_eh [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(x^{k-1}_i)], one block, RMSNorm, shared head.

Everything around the blocks (forward, MTP loop, caches, engine, trainer) is dsv4.model.transformer's:
V32Transformer only replaces the residual stream (one stream instead of mHC's hc_mult).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.mla import MLAttention
from dsv4.model.moe import Expert, MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import Rotary
from dsv4.model.transformer import Block, LayerStats, Transformer, Trunk

if TYPE_CHECKING:
    from dsv4.infer.cache import LayerCache, ModelCache


class V32Block(Block):
    fp32_names: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        nn.Module.__init__(self)
        self.layer_id, self.cfg = layer_id, cfg
        self.attn = MLAttention(cfg, layer_id)
        dense = layer_id < cfg.first_k_dense_replace
        ffn = Expert(cfg.hidden_size, cfg.intermediate_size, 0.0) if dense else MoE(cfg, layer_id)
        self.ffn = ffn  # type: ignore[assignment]  # dense layers: one SwiGLU (official `MLP`), not an MoE
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.engram = None

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
        """x: [B, T, d] hidden -> (new hidden, balance loss or None, LayerStats or None), as Block.forward."""
        observe = bool(indexer_mode) or collect
        h = self.attn_norm(x)
        if observe:
            a, ix = self.attn.forward_indexer(h, rope, positions, segment_ids, indexer_mode, collect)
        else:
            a, ix = self.attn(h, *rope, positions, segment_ids, cache), None
        x = x + a
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(h, input_ids, reference=reference)
        else:
            y, aux = self.ffn(h), None
        x = x + y
        return x, aux, (LayerStats(ix) if observe else None)


class V32MTPBlock(V32Block):
    """MTP depth k (V3 report section 2.2): x = eh_proj([enorm(Emb(t_{i+k})); hnorm(x_i)]), one block, norm."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(  # type: ignore[override]  # an MTP block also takes the next tokens' embeddings
        self, x: torch.Tensor, emb: torch.Tensor, *block_args: Any, **block_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, LayerStats | None]:
        """x: hidden [B,T,d] at positions i; emb: embeddings of tokens i+1 -> (normed head input, new hidden,
        balance loss or None, LayerStats or None), as MTPBlock.forward."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(x)], -1))
        x, aux, st = super().forward(x, *block_args, **block_kwargs)
        return self.norm(x), x, aux, st


class V32Transformer(Transformer):
    """Embedding, V32Blocks, final RMSNorm, head and V3 MTP blocks; Transformer's forward, trunk API and
    caches. ropes(): one YaRN rotary (the main MLA rope and the indexer's) under both keys."""

    fp32_names: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig) -> None:
        if not cfg.is_v32:
            raise ValueError(f"V32Transformer needs model_type deepseek_v32, got {cfg.model_type!r}")
        nn.Module.__init__(self)
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(V32Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(V32MTPBlock(cfg, n + k) for k in range(cfg.num_nextn_predict_layers))
        self.rope_main = Rotary(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_load_state_dict_pre_hook(Transformer._shared_aliases)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Linear/embedding ~ N(0, initializer_range); norms 1 (LayerNorm biases 0); routing bias 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                mod.weight.fill_(1.0)
                if isinstance(mod, nn.LayerNorm) and mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("w1", "w2", "w3") or name.endswith("ffn.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for blk in list(cast("Iterable[V32Block]", self.layers)) + list(cast("Iterable[V32Block]", self.mtp)):
            if isinstance(blk.ffn, MoE):
                blk.ffn.gate.bias.zero_()

    def ropes(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cs = self.rope_main.cos_sin(positions)
        return {"main": cs, "compress": cs}

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
        """As Transformer.trunk with one residual stream: Trunk.x is the last block's output [B,T,d] (the
        MTP blocks' input), Trunk.h = RMSNorm of it."""
        rope = self.ropes(positions)
        x = self.embed(input_ids)
        aux, layers = [], []
        for i, layer in enumerate(cast("Iterable[V32Block]", self.layers)):
            x, a, st = layer(
                x,
                input_ids,
                rope["main"],
                positions,
                reference,
                segment_ids,
                None if cache is None else cache.layers[i],
                None,
                None,
                indexer_mode,
                collect,
            )
            if a is not None:
                aux.append(a)
            if st is not None:
                layers.append(st)
        return Trunk(x, self.norm(x), aux, rope, layers)
