"""Engram conditional memory (docs/spec.md section 4; Engram paper): hashed n-gram rows of canonical ids,
a context-aware gate per mHC stream and a short depthwise causal conv. The canonical map P itself
(tokenizer side, spec 4.1) is dsv4.data.canonical; the model only sees the ids (set_canonical_map).

Shapes: B batch, T tokens, hc mHC streams, d hidden, H = len(orders) * heads hash heads,
dh = d_mem / H row width. Per Engram layer:
  e_t = concat_j table[offset_j + mix(t, n_j) mod p_j]                       (spec 4.2-4.4)
  k_m = e_t W_K^m, v = e_t W_V, s_m = RMSNorm(h_m) . RMSNorm(k_m) / sqrt(d)
  alpha_m = sigmoid(signed_sqrt(s_m)), u_m = alpha_m v                        (spec 4.5)
  Y = SiLU(Conv1D(RMSNorm(U))) + U, kernel K, dilation max(orders)            (spec 4.6)
Y [B, T, hc, d] is added to the streams before the block's attention unit (spec 4.7).

Conv reading: U = (u_1..u_hc) is hc * d channels; each stream m has its own RMSNorm and every
channel its own kernel (depthwise: streams are never mixed), as in the Engram reference code.

Parameters (names as in the state_dict, under `layers.<i>.engram.`):
  wk.<m>.weight [d, d_mem]    key projection W_K^m of stream m (hc of them)
  wv.weight [d, d_mem]        the shared value projection W_V
  h_norm.<m>, k_norm.<m>      RMSNorms of h_m and k_m in the gate
  conv_norm.<m>               RMSNorm of u_m before the conv
  conv_weight [K * hc * d]    depthwise conv weights, flat view of [K, hc, d]; tap k multiplies
                              position t - (K - 1 - k) * dilation; zero-initialised (Y = U at init)
The table ([sum_j p_j, dh], all heads' rows) is a row store, not a parameter: `read(rows) -> fp32
[N, dh]`, `write(rows, values)`, `n_rows`, `dim` (default dsv4.memory.stores.RamStore; set_table for
an MmapStore / HotRowCache / Prefetcher).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.norm import RMSNorm
from dsv4.model.precision import KeepFP32

if TYPE_CHECKING:
    from dsv4.config import ModelConfig
    from dsv4.infer.cache import LayerCache
    from dsv4.memory.stores import RowStore

_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------- hashing
def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def head_primes(rows_per_head: int, n: int) -> list[int]:
    """n distinct primes p_0 < p_1 < ... with p_0 >= rows_per_head (the per-head table sizes, spec 4.3)."""
    out: list[int]
    out, c = [], rows_per_head
    while len(out) < n:
        if _is_prime(c):
            out.append(c)
        c += 1
    return out


def table_shape(cfg: ModelConfig) -> tuple[list[int], int]:
    """(per-head primes p_j, row width d_mem / (len(orders) x heads)) of one Engram layer's table (spec 4.3)."""
    n_heads = len(cfg.engram_orders) * cfg.engram_heads
    return head_primes(cfg.engram_rows_per_head, n_heads), cfg.engram_d_mem // n_heads


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def hash_multipliers(seed: int, layer_id: int, max_order: int, max_id: int) -> torch.Tensor:
    """Odd multipliers m_0..m_{max_order-1} of one layer (spec 4.3), from splitmix64 of (seed, layer_id):
    m_k < (2^63 - 1) // (max_id + 1), so x * m_k never overflows int64 for ids x <= max_id."""
    bound = _INT64_MAX // (max_id + 1)
    if bound < 2:
        raise ValueError(f"ids up to {max_id} leave no room for an int64 multiplier")
    state, _ = _splitmix64(seed)
    state ^= (layer_id + 1) * 0x632BE59BD9B4E019 & _MASK64
    out = []
    for _ in range(max_order):
        state, z = _splitmix64(state)
        out.append(2 * (z % (bound // 2)) + 1 if bound // 2 else 1)
    return torch.tensor(out, dtype=torch.long)


def ngram_rows(
    ids: torch.Tensor,
    orders: Sequence[int],
    heads: int,
    primes: Sequence[int] | torch.Tensor,
    multipliers: Sequence[int] | torch.Tensor,
    pad_id: int,
    segment_ids: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global table rows [B, T, H] of the suffix n-grams of canonical ids [B, T] (spec 4.2-4.3):
    mix(t, n) = XOR_{k<n} x'_{t-k} m_k (int64), head j's row = offset_j + mix mod p_j, heads ordered by
    order then head. Positions before the start (or in an earlier segment) use pad_id. history [B, P]
    (P = max order - 1): the ids before ids[:, 0] (a decode cache), pad where there are none."""
    b, t = ids.shape
    p = max(orders) - 1
    dev = ids.device
    primes = torch.as_tensor(primes, dtype=torch.long, device=dev)
    mult = torch.as_tensor(multipliers, dtype=torch.long, device=dev)
    offsets = torch.cat([primes.new_zeros(1), primes.cumsum(0)[:-1]])
    if history is None:
        history = ids.new_full((b, p), pad_id)
    ext = torch.cat([history[:, history.shape[1] - p :], ids], 1).long()
    seg_ext = None if segment_ids is None else torch.cat([segment_ids.new_full((b, p), -1), segment_ids], 1)
    cols = []
    for oi, n in enumerate(orders):
        mix: torch.Tensor | None = None
        for k in range(n):
            tok = ext[:, p - k : p - k + t]
            if seg_ext is not None and k:
                assert segment_ids is not None  # seg_ext exists only with segment_ids
                tok = torch.where(seg_ext[:, p - k : p - k + t] == segment_ids, tok, pad_id)
            term = tok * mult[k]
            mix = term if mix is None else torch.bitwise_xor(mix, term)
        assert mix is not None  # every order n >= 1
        j = slice(oi * heads, (oi + 1) * heads)
        cols.append(torch.remainder(mix[..., None], primes[j]) + offsets[j])
    return torch.cat(cols, -1)


def signed_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sign(s) sqrt(max(|s|, 1e-6)) (spec 4.5; the Engram code's gate nonlinearity)."""
    return torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6))


# ---------------------------------------------------------------------------------------------- module
class Engram(KeepFP32):
    """One Engram layer: forward(x [B,T,hc,d], canonical ids [B,T]) -> Y [B,T,hc,d] to add to x."""

    fp32_names = ("conv_weight",)
    multipliers: torch.Tensor  # buffer [max order]: the hash multipliers m_k

    def __init__(self, cfg: ModelConfig, layer_id: int, init_std: float | None = None) -> None:
        super().__init__()
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.layer_id, self.d, self.hc, self.eps = layer_id, d, hc, cfg.rms_norm_eps
        self.orders, self.heads = list(cfg.engram_orders), cfg.engram_heads
        self.n_heads = len(self.orders) * self.heads
        self.d_mem = cfg.engram_d_mem
        self.primes, self.dim = table_shape(cfg)
        self.kernel, self.dilation = cfg.engram_conv_kernel, max(self.orders)
        self.pad_id = cfg.vocab_size  # ids are canonical ids < vocab_size: the pad never collides
        self.n_rows = sum(self.primes)
        self.seed = cfg.engram_seed
        self.register_buffer(
            "multipliers", hash_multipliers(cfg.engram_seed, layer_id, max(self.orders), self.pad_id), persistent=False
        )
        self.table_seed = _splitmix64(cfg.engram_seed * 1_000_003 + layer_id)[1] & _INT64_MAX
        self.init_std = cfg.initializer_range if init_std is None else init_std
        self.wk = nn.ModuleList(nn.Linear(self.d_mem, d, bias=False) for _ in range(hc))
        self.wv = nn.Linear(self.d_mem, d, bias=False)
        self.h_norm = nn.ModuleList(RMSNorm(d, self.eps) for _ in range(hc))
        self.k_norm = nn.ModuleList(RMSNorm(d, self.eps) for _ in range(hc))
        self.conv_norm = nn.ModuleList(RMSNorm(d, self.eps) for _ in range(hc))
        self.conv_weight = nn.Parameter(torch.zeros(self.kernel * hc * d, dtype=torch.float32))
        self._table: RowStore | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def init_buffers(self) -> None:
        """The hash multipliers from (seed, layer, orders) (after a meta-device build)."""
        self.multipliers.copy_(hash_multipliers(self.seed, self.layer_id, max(self.orders), self.pad_id))

    # ------------------------------------------------------------------ table
    @property
    def table(self) -> RowStore:
        """The row store; RamStore(n_rows, dim, init_std, table_seed) unless set_table was called."""
        if self._table is None:
            from dsv4.memory.stores import RamStore

            self._table = RamStore(self.n_rows, self.dim, self.init_std, self.table_seed)
        return self._table

    def set_table(self, store: RowStore) -> None:
        if (store.n_rows, store.dim) != (self.n_rows, self.dim):
            raise ValueError(
                f"Engram layer {self.layer_id} needs a table of {self.n_rows} x {self.dim} rows, "
                f"got {store.n_rows} x {store.dim}"
            )
        self._table = store

    def rows_for(self, ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Global rows [B, T, H] of canonical ids [B, T] (depends on ids only: prefetchable)."""
        return ngram_rows(ids, self.orders, self.heads, self.primes, self.multipliers, self.pad_id, segment_ids)

    def table_grads(self, clear: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique rows [N] (sorted), fp32 grads [N, dim]) summed over the lookups since the last call
        whose backward has run (gradient accumulation adds up); clear=True forgets them."""
        self._coalesce()
        rows, grads = (
            self._pending[0] if self._pending else (torch.zeros(0, dtype=torch.long), torch.zeros(0, self.dim))
        )
        if clear:
            self._pending = []
        return rows, grads

    def _coalesce(self) -> None:
        if len(self._pending) <= 1:
            return
        rows = torch.cat([r for r, _ in self._pending])
        grads = torch.cat([g.to(rows.device) for _, g in self._pending])
        u, inv = torch.unique(rows, return_inverse=True)
        self._pending = [(u, grads.new_zeros(u.numel(), self.dim).index_add_(0, inv, grads))]

    def _record(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self._pending.append((rows, grad.detach().float()))
        if len(self._pending) > 16:
            self._coalesce()

    def _lookup(
        self, rows: torch.Tensor, prefetched: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """e [B, T, d_mem]: gather from a leaf holding the unique rows (its grad goes to table_grads)."""
        b, t, _ = rows.shape
        uniq, inv = torch.unique(rows, return_inverse=True)
        if prefetched is not None:
            pu, vals = prefetched
            pu = pu.to(rows.device)
            idx = torch.searchsorted(pu, uniq).clamp_max(pu.numel() - 1)
            if pu.numel() == 0 or not bool((pu[idx] == uniq).all()):
                raise ValueError(f"Engram layer {self.layer_id}: prefetched rows miss rows of this batch")
            vals = vals.to(rows.device, torch.float32)
            values = vals if pu.numel() == uniq.numel() else vals[idx]
        else:
            values = self.table.read(uniq).to(rows.device, torch.float32)
        leaf = values.detach().requires_grad_(torch.is_grad_enabled())
        if leaf.requires_grad:
            leaf.register_hook(lambda g, u=uniq: self._record(u, g))
        return leaf[inv].reshape(b, t, self.d_mem).to(dtype)

    # ------------------------------------------------------------------ math
    @staticmethod
    def _norm(x: torch.Tensor, mods: Iterable[nn.Module], eps: float) -> torch.Tensor:
        """Per-stream RMSNorm of x [..., hc, d] in fp32 or wider."""
        w = torch.stack([cast(RMSNorm, m).weight for m in mods]).to(x.dtype)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w

    def _gate(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_m = sigmoid(signed_sqrt(RMSNorm(h_m) . RMSNorm(k_m) / sqrt(d))) [B, T, hc];
        u_m = alpha_m e W_V [B, T, hc, d]  ->  (u, alpha)."""
        cdt = torch.promote_types(x.dtype, torch.float32)
        b, t = e.shape[:2]
        k = F.linear(e, torch.cat([cast(nn.Linear, w).weight for w in self.wk])).view(b, t, self.hc, self.d)
        v = self.wv(e).to(cdt)
        s = (self._norm(x.to(cdt), self.h_norm, self.eps) * self._norm(k.to(cdt), self.k_norm, self.eps)).sum(-1)
        alpha = torch.sigmoid(signed_sqrt(s / math.sqrt(self.d)))
        return alpha[..., None] * v[:, :, None], alpha

    def _conv(
        self, z: torch.Tensor, hist: torch.Tensor | None, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal depthwise conv of z [B, T, hc, d]: sum_k w_k * z_{t - (K-1-k) dil}; hist [B, P, hc, d]
        (P = (K-1) dil) holds the inputs before z (zeros before position 0)."""
        b, t = z.shape[:2]
        p, kk = (self.kernel - 1) * self.dilation, self.kernel
        if hist is None:
            hist = z.new_zeros(b, p, self.hc, self.d)
        ext = torch.cat([hist.to(z.dtype), z], 1)
        seg_ext = None if segment_ids is None else torch.cat([segment_ids.new_full((b, p), -1), segment_ids], 1)
        w = self.conv_weight.view(kk, self.hc, self.d).to(z.dtype)
        y = torch.zeros_like(z)
        for k in range(kk):
            o = (kk - 1 - k) * self.dilation
            tap = ext[:, p - o : p - o + t]
            if seg_ext is not None and o:
                assert segment_ids is not None  # seg_ext exists only with segment_ids
                tap = tap * (seg_ext[:, p - o : p - o + t] == segment_ids)[..., None, None].to(z.dtype)
            y = y + w[k] * tap
        return y

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Y = forward_gated(...)[0] (the same arguments)."""
        return self.forward_gated(*args, **kwargs)[0]

    def forward_gated(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        segment_ids: torch.Tensor | None = None,
        prefetched: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,hc,d] streams, ids [B,T] canonical ids -> (Y = SiLU(Conv1D(RMSNorm(U))) + U [B,T,hc,d],
        the gate alpha [B, T, hc]).

        cache: a LayerCache whose `engram` state holds the previous ids and conv inputs (positions [T] for
        a chunk, [B, 1] for a decode step); prefetched: (sorted unique rows, values [N, dim]) covering the
        rows of this batch (default: read from the table)."""
        state = None if cache is None else cache.engram
        hist_ids: torch.Tensor | None = None
        hist_z: torch.Tensor | None = None
        p0: torch.Tensor | None = None
        if state is not None:
            assert cache is not None and cache.rows is not None and positions is not None  # a cached forward
            p0 = positions[:, 0] if positions.dim() == 2 else positions[:1].expand(ids.shape[0])
            hist_ids, hist_z = state.history(cache.rows, p0)
        rows = ngram_rows(
            ids, self.orders, self.heads, self.primes, self.multipliers, self.pad_id, segment_ids, hist_ids
        )
        u, alpha = self._gate(x, self._lookup(rows, prefetched, x.dtype))
        z = self._norm(u, self.conv_norm, self.eps)
        y = F.silu(self._conv(z, hist_z, segment_ids)) + u
        if state is not None:
            assert cache is not None and cache.rows is not None and p0 is not None
            state.write(cache.rows, p0, ids, z)
        return y.to(x.dtype), alpha

    # ------------------------------------------------------------------ oracle
    @torch.no_grad()
    def forward_reference(
        self, x: torch.Tensor, ids: torch.Tensor, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loop oracle of forward (per token, per head, per stream; Python-int hashing)."""
        b_, t_, hc, d = x.shape
        cdt = torch.promote_types(x.dtype, torch.float32)
        mult = [int(m) for m in self.multipliers]
        offsets = [sum(self.primes[:j]) for j in range(self.n_heads)]
        wv = self.wv.weight.to(cdt)
        cw = self.conv_weight.view(self.kernel, hc, d).to(cdt)

        def norm(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return v / torch.sqrt(v.square().mean() + self.eps) * w.to(cdt)

        def same(b: int, t: int, s: int) -> bool:
            return s >= 0 and (segment_ids is None or int(segment_ids[b, s]) == int(segment_ids[b, t]))

        u = torch.zeros(b_, t_, hc, d, dtype=cdt)
        for b in range(b_):
            for t in range(t_):
                parts = []
                for oi, n in enumerate(self.orders):
                    mix = 0
                    for k in range(n):
                        tok = int(ids[b, t - k]) if same(b, t, t - k) else self.pad_id
                        mix ^= tok * mult[k]
                    for h in range(self.heads):
                        j = oi * self.heads + h
                        row = offsets[j] + mix % self.primes[j]
                        parts.append(self.table.read(torch.tensor([row]))[0])
                e = torch.cat(parts).to(x.dtype).to(cdt)
                v = wv @ e
                for m in range(hc):
                    k_m = cast(nn.Linear, self.wk[m]).weight.to(cdt) @ e
                    s = (
                        norm(x[b, t, m].to(cdt), cast(RMSNorm, self.h_norm[m]).weight)
                        @ norm(k_m, cast(RMSNorm, self.k_norm[m]).weight)
                        / d**0.5
                    )
                    u[b, t, m] = torch.sigmoid(signed_sqrt(s)) * v
        z = torch.zeros_like(u)
        for b in range(b_):
            for t in range(t_):
                for m in range(hc):
                    z[b, t, m] = norm(u[b, t, m], cast(RMSNorm, self.conv_norm[m]).weight)
        y = torch.zeros_like(u)
        for b in range(b_):
            for t in range(t_):
                for m in range(hc):
                    c = torch.zeros(d, dtype=cdt)
                    for k in range(self.kernel):
                        s = t - (self.kernel - 1 - k) * self.dilation
                        if same(b, t, s):
                            c = c + cw[k, m] * z[b, s, m]
                    y[b, t, m] = F.silu(c) + u[b, t, m]
        return y.to(x.dtype)
