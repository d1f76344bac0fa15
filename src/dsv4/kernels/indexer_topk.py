"""Chunked lightning-indexer top-k: no [T, N] score matrix is ever stored.

Score(t, s) = sum_j w_tj ReLU(q_tj . k_s)   (DeepSeek-V3.2 DSA lightning indexer; V4 report 2.3.1;
spec section 2), entry s visible to query t iff s < (t + 1 - exclude_window) // ratio (and the
optional same-document rule). The scores are computed in query chunks x key chunks; each query chunk
keeps a running top-k list that is merged with every new key chunk by a STABLE descending sort of
[current list, new chunk]. Key chunks come in increasing position order and the list is kept sorted
by (score desc, position asc), so equal scores stay ordered by position: the result is exactly
`dsv4.kernels.topk.topk_indices(full_scores, k, visible)` (score desc, then position asc, -1 padding).
Memory: O(chunk * key_chunk * n_heads) for the scores + O(T * k) for the result.
"""
from __future__ import annotations

from typing import Callable

import torch


def segment_same_doc(q_seg: torch.Tensor, key_seg: torch.Tensor) -> Callable:
    """q_seg [B,T], key_seg [B,N] document ids -> same_doc_fn(s0, s1, k0, k1) -> [B, s1-s0, k1-k0] bool."""
    def fn(s0: int, s1: int, k0: int, k1: int) -> torch.Tensor:
        return q_seg[:, s0:s1, None] == key_seg[:, None, k0:k1]
    return fn


@torch.no_grad()
def chunked_indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, k: int, q_pos: torch.Tensor,
                         ratio: int, exclude_window: int = 0, chunk: int = 128, key_chunk: int = 4096,
                         same_doc_fn: Callable | None = None, return_scores: bool = False):
    """Top-k entry ids of the lightning indexer, computed chunk by chunk.

    q [B,T,n,c] (fp32, roped), w [B,T,n] (scaled head weights), keys [B,N,c], q_pos [T] absolute
    query positions. same_doc_fn(s0, s1, k0, k1) -> [B, s1-s0, k1-k0] bool restricts visibility
    (see segment_same_doc). Returns idx [B,T,min(k,N)] (long, -1 = none) and, with return_scores,
    the selected scores [B,T,min(k,N)] (-inf on -1 slots; detached).
    Score formula and float ops are those of dsv4.model.indexer.Indexer.score, per block.
    """
    b, t, n_h, _ = q.shape
    n = keys.shape[1]
    kk = min(k, n)
    keys = keys.float()
    idx = torch.full((b, t, kk), -1, dtype=torch.long, device=q.device)
    scores = torch.full((b, t, kk), float("-inf"), dtype=torch.float32, device=q.device) if return_scores else None
    if t == 0 or kk == 0:
        return (idx, scores) if return_scores else idx
    limit = (q_pos + 1 - exclude_window).div(ratio, rounding_mode="floor")       # [T]
    starts = list(range(0, t, chunk))
    n_hi = limit[[min(s + chunk, t) - 1 for s in starts]].clamp(0, n).tolist()  # nondecreasing q_pos
    for s0, nh in zip(starts, n_hi):
        s1 = min(s0 + chunk, t)
        if nh == 0:
            continue
        qc, wc, lim = q[:, s0:s1], w[:, s0:s1], limit[s0:s1]
        best_s = best_p = None
        for k0 in range(0, nh, key_chunk):
            k1 = min(k0 + key_chunk, nh)
            s = torch.einsum("btnc,bsc->btns", qc, keys[:, k0:k1]).relu_()
            s = torch.einsum("btns,btn->bts", s, wc)
            pos = torch.arange(k0, k1, device=q.device)
            vis = (pos[None, :] < lim[:, None]).unsqueeze(0)                       # [1, C, Ck]
            if same_doc_fn is not None:
                vis = vis & same_doc_fn(s0, s1, k0, k1)
            vis = vis.expand(s.shape)
            s = s.masked_fill(~vis, float("-inf"))
            p = torch.where(vis, pos, -1)
            if best_s is not None:   # previous list first: its positions are all smaller
                s, p = torch.cat([best_s, s], -1), torch.cat([best_p, p], -1)
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :kk]
            best_s, best_p = s.gather(-1, order), p.gather(-1, order)
        m = best_p.shape[-1]
        idx[:, s0:s1, :m] = best_p
        if return_scores:
            scores[:, s0:s1, :m] = torch.where(best_p >= 0, best_s, float("-inf"))
    return (idx, scores) if return_scores else idx
