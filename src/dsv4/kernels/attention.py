"""The V4 core attention op: one softmax (plus a per-head sink) over window keys and entries.

o_th = sum_s p_ths v_s,  p = softmax over {window keys of t} U {entries allowed for t} U {sink_h},
where the sink contributes exp(z_h) to the denominator only (docs/spec.md section 2). K = V (MQA, one head).

`attention_reference` is the masked dense oracle: O(T^2) memory, kept for tests and selectable by a
flag. `attention_chunked` is the fast path for training lengths: queries in chunks, each chunk sees
only its band of window keys (chunk + window - 1 of them) and the entries, so memory and work are
O(T (chunk + window + N)) instead of O(T (T + N)). Both take optional document ids (`q_seg`,
`kv_seg`) that keep window keys inside the query's document.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def window_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[T] query positions, [S] key positions -> [T, S] bool: t - window < s <= t."""
    d = q_pos[:, None] - kv_pos[None, :]
    return (d >= 0) & (d < window)


def _softmax_with_sink(parts: list[torch.Tensor], sink: torch.Tensor) -> torch.Tensor:
    b, h, t = parts[0].shape[:3]
    parts = parts + [sink.to(parts[0].dtype).view(1, h, 1, 1).expand(b, h, t, 1)]
    return torch.cat(parts, dim=-1).softmax(dim=-1)


def _core(q, kv, sink, scale, wmask, entries, emask, want_probs):
    """One dense block: q [B,t,H,c], kv [B,s,c], wmask [B|1, t, s], entries [B,N,c], emask [B,t,N]."""
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (or fp64 for tests)
    logits = torch.einsum("bthc,bsc->bhts", q, kv).to(acc) * scale
    parts = [logits.masked_fill(~wmask[:, None], float("-inf"))]
    if entries is not None:
        le = torch.einsum("bthc,bnc->bhtn", q, entries).to(acc) * scale
        parts.append(le.masked_fill(~emask[:, None], float("-inf")))
    p = _softmax_with_sink(parts, sink)
    s = kv.shape[1]
    o = torch.einsum("bhts,bsc->bthc", p[..., :s].to(kv.dtype), kv)
    probs = None
    if entries is not None:
        pe = p[..., s : s + entries.shape[1]]
        o = o + torch.einsum("bhtn,bnc->bthc", pe.to(entries.dtype), entries)
        probs = pe.sum(1) if want_probs else None
    return o, probs


def _seg_mask(wm: torch.Tensor, q_seg, kv_seg) -> torch.Tensor:
    if q_seg is None:
        return wm.unsqueeze(0)
    return wm.unsqueeze(0) & (q_seg[:, :, None] == kv_seg[:, None, :])


def attention_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    window: int,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    entries: torch.Tensor | None = None,
    entry_mask: torch.Tensor | None = None,
    return_entry_probs: bool = False,
    q_seg: torch.Tensor | None = None,
    kv_seg: torch.Tensor | None = None,
):
    """q [B,T,H,c]; kv [B,S,c] raw keys at kv_pos [S]; entries [B,N,c] with entry_mask [B,T,N].

    Returns o [B,T,H,c] (and, if asked, the attention mass on each entry summed over heads [B,T,N]).
    """
    wm = _seg_mask(window_mask(q_pos, kv_pos, window), q_seg, kv_seg)
    o, probs = _core(q, kv, sink, scale, wm, entries, entry_mask, return_entry_probs)
    return (o, probs) if return_entry_probs else o


_REFERENCE = inspect.signature(attention_reference)


def attention_chunked(*args: Any, chunk: int = 128, **kwargs: Any):
    """attention_reference(*args, **kwargs) in query chunks of `chunk` (the same arguments and result); each
    chunk reads only its window band and the entries some query of it may see. kv_pos must be increasing
    (it is: cache order)."""
    a = _REFERENCE.bind(*args, **kwargs)
    a.apply_defaults()
    q, kv, sink, scale, window, q_pos, kv_pos = a.args[:7]
    entries, entry_mask, return_entry_probs, q_seg, kv_seg = a.args[7:]
    t = q.shape[1]
    outs, probs = [], []
    for s0 in range(0, t, chunk):
        s1 = min(s0 + chunk, t)
        qp = q_pos[s0:s1]
        lo = int(torch.searchsorted(kv_pos, qp[0] - window + 1))
        hi = int(torch.searchsorted(kv_pos, qp[-1], right=True))
        wm = _seg_mask(
            window_mask(qp, kv_pos[lo:hi], window),
            None if q_seg is None else q_seg[:, s0:s1],
            None if kv_seg is None else kv_seg[:, lo:hi],
        )
        ent = em = None
        if entries is not None:  # entries no query of the chunk can see are skipped
            used = entry_mask[:, s0:s1].any(1).any(0).nonzero()
            n_hi = int(used.max()) + 1 if used.numel() else 0
            ent, em = entries[:, :n_hi], entry_mask[:, s0:s1, :n_hi]
        o, p = _core(q[:, s0:s1], kv[:, lo:hi], sink, scale, wm, ent, em, return_entry_probs)
        outs.append(o)
        if return_entry_probs and entries is not None:
            p = torch.nn.functional.pad(p, (0, entries.shape[1] - p.shape[-1]))
        probs.append(p)
    o = torch.cat(outs, 1)
    if return_entry_probs:
        return o, (torch.cat(probs, 1) if entries is not None else None)
    return o


IMPLS = {"reference": attention_reference, "chunked": attention_chunked}


def selection_mask(idx: torch.Tensor, n_entries: int) -> torch.Tensor:
    """top-k ids [B,T,k] (-1 = none) -> bool mask [B,T,N]."""
    b, t, _ = idx.shape
    m = torch.zeros(b, t, n_entries + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(idx < 0, n_entries, idx), True)
    return m[..., :n_entries]
