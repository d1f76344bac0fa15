"""DeepSeek-V3.2 attention: MLA with the V3.2 lightning indexer (docs/architecture.md, "The V3.2 family").

Projections (official V3.2 names): c_q = RMSNorm(h W_q_a) (q_norm), q = c_q W_q_b per head = [q_nope (d_n),
q_pe (d_r)]; [c_kv, k_pe] = h W_kv_a, c_kv = RMSNorm(c_kv) (kv_norm, the latent of kv_lora_rank dims);
W_kv_b maps c_kv to per-head [k_nope (d_n), v (d_v)]. q_pe and k_pe carry interleaved RoPE (last dims).
  score_ts = scale (q_nope_t . k_nope_s + q_pe_t . k_pe_s),  scale = (d_n + d_r)^-1/2 * mscale^2,
  o_t = W_o concat_h sum_{s in top-k(t)} softmax(score)_ts v_s,
over the indexer's top-k of every s <= t, with no window and no sink.
The fast path attends in the absorbed form (the official decode path, used here for every call): with
W_UK, W_UV the per-head blocks of W_kv_b, q_abs = [q_nope W_UK, q_pe] (kv_lora_rank + d_r dims) against the
shared row [c_kv, k_pe], so the layer is single-KV-head attention over the cached row itself, and
o = (sum p c_kv) W_UV^T. That is V4's DSA layer with window 0 and no sink: every kernel, cache store and
the indexer training of dsv4.model.attention serve it unchanged. `forward_expanded` is the plain twin:
the official prefill, which expands the latent into per-head keys and values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.kernels.attention import selection_mask
from dsv4.model.attention import Attention, Projected
from dsv4.model.indexer import V32Indexer
from dsv4.model.norm import RMSNorm
from dsv4.model.precision import KeepFP32
from dsv4.model.rope import apply_rope

NO_SINK = -1e30  # a sink logit whose exp is exactly 0 next to any real logit: V3.2 has no sink


def mla_scale(cfg: ModelConfig) -> float:
    """(d_n + d_r)^-1/2, times mscale^2 = (0.1 mscale_all_dim ln(factor) + 1)^2 under YaRN (official model.py
    applies it whenever its max_seq_len exceeds original_seq_len, which the shipped setting does;
    transformers applies it when rope_scaling has mscale_all_dim)."""
    scale = cfg.head_dim**-0.5
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        m_all = float(rs.get("mscale_all_dim", rs.get("mscale", 1.0)) or 0.0)
        if m_all and rs.get("factor", 1) > 1:
            mscale = 0.1 * m_all * math.log(rs["factor"]) + 1.0
            scale *= mscale * mscale
    return scale


class MLAttention(Attention):
    """One V3.2 layer's attention (kind "dsa", window 0, ratio 1; see the module docstring)."""

    fp32_names = ("attn_sink",)  # a buffer here [h]: NO_SINK

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        KeepFP32.__init__(self)
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.layer_id, self.kind, self.ratio = layer_id, "dsa", 1
        self.n_heads, self.window, self.eps, self.groups = h, 0, cfg.rms_norm_eps, 1  # one output projection
        self.nope, self.rope_dim, self.v_dim, self.rank = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        self.head_dim = cfg.kv_dim  # the attended row: latent + rope key
        self.scale = mla_scale(cfg)
        self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * cfg.head_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, d, bias=False)
        self.indexer = V32Indexer(cfg)
        self.register_buffer("attn_sink", torch.full((h,), NO_SINK), persistent=False)
        self.impl = "sparse"
        self.kv_transform = None
        self.act_transform = None
        self.observe_selection = None

    def init_buffers(self) -> None:
        self.attn_sink.fill_(NO_SINK)

    @property
    def uses_compress_rope(self) -> bool:
        return False

    def _uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_kv_b as per-head blocks: W_UK [h, d_n, rank], W_UV [h, d_v, rank]."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def latent_projections(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> c_q [B,T,q_lora], q [B,T,h,d_n+d_r] with q_pe roped, kv rows [B,T,rank+d_r] = [c_kv, k_pe] roped."""
        c_q = self.q_norm(self.wq_a(x))
        q = apply_rope(self.wq_b(c_q).unflatten(-1, (self.n_heads, -1)), cos, sin)
        kv = self.wkv_a(x)
        kv = apply_rope(torch.cat([self.kv_norm(kv[..., : self.rank]), kv[..., self.rank :]], -1), cos, sin)
        if self.kv_transform is not None:
            kv = self.kv_transform(kv)
        return c_q, q, kv

    def project_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Projected:
        """-> Projected(x, c_q, q_abs [B,T,h,rank+d_r] = [q_nope W_UK, q_pe], kv rows [B,T,rank+d_r], cos, sin)."""
        c_q, q, kv = self.latent_projections(x, cos, sin)
        w_uk, _ = self._uk_uv()
        q_abs = torch.einsum("bthn,hnc->bthc", q[..., : self.nope], w_uk.to(q.dtype))
        return Projected(x, c_q, torch.cat([q_abs, q[..., self.nope :]], -1), kv, cos, sin)

    def finish(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """o [B,T,h,rank+d_r] (attention-weighted rows) -> W_o of (o's latent part W_UV^T) per head."""
        _, w_uv = self._uk_uv()
        v = torch.einsum("bthc,hvc->bthv", o[..., : self.rank], w_uv.to(o.dtype))
        if self.act_transform is not None:
            v = self.act_transform(v)
        return self.wo(v.flatten(2))

    def expand(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv rows [B,T,rank+d_r] -> per-head keys [k_nope, k_pe] [B,T,h,d_n+d_r] and values [B,T,h,d_v]."""
        kvb = self.wkv_b(kv[..., : self.rank]).unflatten(-1, (self.n_heads, -1))
        k_pe = kv[:, :, None, self.rank :].expand(-1, -1, self.n_heads, -1)
        return torch.cat([kvb[..., : self.nope], k_pe], -1), kvb[..., self.nope :]

    def forward_expanded(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The plain twin (uncached, one document per row): the official prefill. The latent is expanded into
        per-head keys [k_nope, k_pe] and values, the indexer's top-k masks a dense causal softmax."""
        t = x.shape[1]
        c_q, q, kv = self.latent_projections(x, cos, sin)
        k, v = self.expand(kv)
        idx, _, visible = self.indexer(x, c_q, cos, sin, positions)
        mask = selection_mask(idx, t) & visible
        logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * self.scale
        p = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        o = torch.einsum("bhts,bshv->bthv", p, v.float()).to(x.dtype)
        return self.wo(o.flatten(2))
