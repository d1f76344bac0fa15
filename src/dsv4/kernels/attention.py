"""The V4 core attention op: one softmax (plus a per-head sink) over window keys and entries.

o_th = sum_s p_ths v_s,  p = softmax over {window keys of t} U {entries allowed for t} U {sink_h},
where the sink contributes exp(z_h) to the denominator only (spec section 2). K = V (MQA, one head).

`attention_reference` is the masked dense oracle: O(T^2) memory, used by tests and as the flag-selected
fallback. Fast paths (gather kernel, banded window) must match it forward and backward.
"""
from __future__ import annotations

import torch


def window_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[T] query positions, [S] key positions -> [T, S] bool: t - window < s <= t."""
    d = q_pos[:, None] - kv_pos[None, :]
    return (d >= 0) & (d < window)


def attention_reference(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float, window: int,
                        q_pos: torch.Tensor, kv_pos: torch.Tensor, entries: torch.Tensor | None = None,
                        entry_mask: torch.Tensor | None = None, return_entry_probs: bool = False):
    """q [B,T,H,c]; kv [B,S,c] raw keys at kv_pos [S]; entries [B,N,c] with entry_mask [B,T,N].

    Returns o [B,T,H,c] (and, if asked, the attention mass on each entry summed over heads [B,T,N]).
    """
    b, t, h, _ = q.shape
    logits = torch.einsum("bthc,bsc->bhts", q, kv).float() * scale
    logits = logits.masked_fill(~window_mask(q_pos, kv_pos, window), float("-inf"))
    parts = [logits]
    if entries is not None:
        le = torch.einsum("bthc,bnc->bhtn", q, entries).float() * scale
        parts.append(le.masked_fill(~entry_mask[:, None], float("-inf")))
    parts.append(sink.float().view(1, h, 1, 1).expand(b, h, t, 1))
    p = torch.cat(parts, dim=-1).softmax(dim=-1)
    s = kv.shape[1]
    o = torch.einsum("bhts,bsc->bthc", p[..., :s].to(kv.dtype), kv)
    probs = None
    if entries is not None:
        pe = p[..., s:s + entries.shape[1]]
        o = o + torch.einsum("bhtn,bnc->bthc", pe.to(entries.dtype), entries)
        probs = pe.sum(1) if return_entry_probs else None
    return (o, probs) if return_entry_probs else o


def selection_mask(idx: torch.Tensor, n_entries: int) -> torch.Tensor:
    """top-k ids [B,T,k] (-1 = none) -> bool mask [B,T,N]."""
    b, t, _ = idx.shape
    m = torch.zeros(b, t, n_entries + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(idx < 0, n_entries, idx), True)
    return m[..., :n_entries]
