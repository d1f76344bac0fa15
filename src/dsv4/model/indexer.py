"""Lightning indexer (DeepSeek-V3.2 DSA; V4 report section 2.3.1; docs/spec.md section 2).

Score(t, s) = sum_j w_tj * ReLU(q_tj . k_s) with q = c_q W_q (n_I heads of c_I, RoPE), w = h W_w
scaled by c_I^-1/2 n_I^-1/2, and keys k_s from the indexer's own compressor (CSA) or, for DSA
(ratio 1), from its own per-token projection. Entry s is visible to query t iff s < (t + 1) // m.
In DSA the raw window is always attended, so the indexer ranks only the tokens outside it
(s <= t - n_win) and the key set window + top-k is disjoint.
visible_count / window_count below are the one statement of these counts (masks, FLOPs, cache sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.kernels.topk import topk_indices
from dsv4.model.compressor import Compressor
from dsv4.model.rope import apply_rope


@overload
def visible_count(t_plus_1: torch.Tensor, ratio: int, exclude_window: int = 0) -> torch.Tensor: ...
@overload
def visible_count(
    t_plus_1: int | np.integer | np.ndarray, ratio: int, exclude_window: int = 0
) -> int | np.integer | np.ndarray: ...
def visible_count(
    t_plus_1: int | np.integer | np.ndarray | torch.Tensor, ratio: int, exclude_window: int = 0
) -> int | np.integer | np.ndarray | torch.Tensor:
    """Entries of a ratio-m layer visible to query t, given t + 1 (int, numpy array or tensor):
    entry s is visible iff s < (t + 1 - exclude_window) // m, so the count is max(0, that)."""
    if not exclude_window:
        return t_plus_1 // ratio  # t + 1 >= 0: never negative
    n = (t_plus_1 - exclude_window) // ratio
    return n.clamp_min(0) if isinstance(n, torch.Tensor) else np.maximum(n, 0)


def window_count(t_plus_1: int | np.integer | np.ndarray, window: int) -> np.integer | np.ndarray:
    """Raw keys of query t in the sliding window (t - n_win, t]: min(t + 1, n_win) (int or numpy array)."""
    return np.minimum(t_plus_1, window)


def visible_entries(positions: torch.Tensor, n_entries: int, ratio: int, exclude_window: int = 0) -> torch.Tensor:
    """[*, T] absolute query positions -> [*, T, N] bool: s < visible_count(t + 1, m, exclude_window), i.e.
    causally complete, and with exclude_window = n_win (DSA) outside the raw window (s <= t - n_win)."""
    limit = visible_count(positions + 1, ratio, exclude_window)
    return torch.arange(n_entries, device=positions.device) < limit.unsqueeze(-1)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, window: int = 0) -> None:
        """window: the layer's raw window, which a DSA indexer (ratio 1) does not rank (0: every s <= t)."""
        super().__init__()
        self.exclude_window = window if ratio == 1 else 0
        self.ratio, self.n_heads, self.head_dim, self.topk = (
            ratio,
            cfg.index_n_heads,
            cfg.index_head_dim,
            cfg.index_topk,
        )
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(
            cfg.hidden_size, self.head_dim, ratio, overlap=ratio == CSA_RATIO, eps=cfg.rms_norm_eps
        )
        # q_transform(q) -> the queries scored (None: as computed); with compressor.out_transform on the keys
        # it carries dsv4.quant.official_quant's Hadamard + FP4
        self.q_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def queries(
        self, h: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q [B, T, n_I, c_I] (roped, fp32), head weights [B, T, n_I] (fp32, scaled)."""
        q = self.wq_b(c_q).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rope(q, cos, sin).float()
        if self.q_transform is not None:
            q = self.q_transform(q)
        w = F.linear(h.float(), self.weights_proj.weight.float()) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q, w

    def keys(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """-> indexer keys [B, N, c_I]: the indexer's compressed entries (CSA) or per-token keys (DSA)."""
        return self.compressor(h, cos, sin)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The queries' RoPE: interleaved pairs on the last dims (V4)."""
        return apply_rope(x, cos, sin)

    @staticmethod
    def score(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [B,T,n,c], w [B,T,n], keys [B,N,c] -> scores [B,T,N] (fp32)."""
        s = torch.einsum("btnc,bsc->btns", q, keys.float()).relu_()
        return torch.einsum("btns,btn->bts", s, w) + 0.0  # -0.0 -> +0.0: one zero for every sort (CUDA)

    def forward(
        self,
        h: torch.Tensor,
        c_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        same_doc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (top-k entry ids [B,T,k] with -1 for none, scores [B,T,N], visible [B,T,N]).
        same_doc [B,T,N] (optional) restricts visibility to entries of the query's document."""
        keys = self.keys(h, cos, sin)
        q, w = self.queries(h, c_q, cos, sin)
        scores = self.score(q, w, keys)
        visible = visible_entries(positions, keys.shape[1], self.ratio, self.exclude_window)
        visible = visible.expand(scores.shape) if same_doc is None else visible & same_doc
        return topk_indices(scores, self.topk, visible), scores, visible


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on the FIRST 2 cos.shape[-1] dims of x [B, T, (H,) D] (the V3.2 indexer's layout):
    dims i and i + r/2 of that slice rotate together by angle theta_i. cos/sin [T, r/2]."""
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rope, rest = x[..., :r].float(), x[..., r:]
    a, b = rope[..., : r // 2], rope[..., r // 2 :]
    rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)
    return torch.cat([rot, rest], dim=-1)


class V32Indexer(Indexer):
    """The DeepSeek-V3.2 lightning indexer (docs/architecture.md, "V3.2 DSA"): the same score as Indexer,
    sum_j w_tj ReLU(q_tj . k_s) with w scaled by n_I^-1/2 c_I^-1/2, but keys k_s = LayerNorm(h_s W_k) (with a
    bias), RoPE half-split on the first qk_rope_head_dim dims of q and k, and every s <= t a candidate
    (no window is excluded). Parameter names: wq_b, wk, k_norm, weights_proj (the official V3.2 names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.exclude_window, self.ratio = 0, 1
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.q_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def keys(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = F.layer_norm(self.wk(h).float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float())
        return self.rope(k, cos, sin).to(h.dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """V3.2's indexer RoPE: half-split on the first dims (queries and keys)."""
        return apply_rope_half(x, cos, sin)


def kl_queries(allowed: torch.Tensor, total_mass: torch.Tensor) -> torch.Tensor:
    """The queries indexer_kl averages over: bool [B,T], those with an allowed entry that holds attention
    mass (total_mass [B,T] = the mass on the allowed entries)."""
    return allowed.any(-1) & (total_mass > 0)


def indexer_kl(scores: torch.Tensor, attn_mass: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """DSA indexer loss (V3.2 report): mean over queries of KL(p_t || softmax(I_t)) on the allowed entries.

    p_t = the main attention's mass on each entry, summed over heads and L1-normalised over the allowed
    set (all visible entries in the dense warm-up, the selected ones in sparse training); attn_mass must
    come detached. Queries with no allowed entry do not count.
    """
    mass = torch.where(allowed, attn_mass.float(), 0.0)
    total = mass.sum(-1, keepdim=True)
    has = kl_queries(allowed, total.squeeze(-1))
    if not has.any():
        return scores.sum() * 0.0
    p = mass / total.clamp_min(1e-30)
    logq = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), 0.0)
    return terms.sum(-1)[has].mean()
