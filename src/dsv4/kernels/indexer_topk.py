"""Chunked lightning-indexer top-k: no [T, N] score matrix is ever stored.

Score(t, s) = sum_j w_tj ReLU(q_tj . k_s)   (DeepSeek-V3.2 DSA lightning indexer; V4 report 2.3.1;
spec section 2), entry s visible to query t iff s < (t + 1 - exclude_window) // ratio (and the
optional same-document rule). The scores are computed in query chunks x key chunks; each query chunk
keeps a running top-k list that is merged with every new key chunk: candidates = [current list, new
chunk]; key chunks come in increasing position order and the list is kept sorted by (score desc,
position asc), so among equal scores array order is position order. The merge selects the k best in
O(L) (threshold = k-th largest value; ties at the threshold taken in array order) and then STABLE-sorts
those k by score descending. The result is exactly
`dsv4.kernels.topk.topk_indices(full_scores, k, visible)` (score desc, then position asc, -1 padding).
Memory: O(chunk * key_chunk * n_heads) for the scores + O(T * k) for the result.
"""
from __future__ import annotations

from typing import Callable

import torch


def _merge(s: torch.Tensor, p: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top kk of candidate rows s [..., L] (positions p) by (score desc, position asc).

    Requires: among equal scores, array order == position order (true for [sorted list, new chunk]).
    O(L) selection (torch.topk for the kk-th value, the first ties by a cumsum) + a sort of kk items:
    everything > v_k is in; of the entries == v_k the first kk - #(> v_k) in array order are.
    """
    n = s.shape[-1]
    if n > kk:
        vk = s.topk(kk, dim=-1, sorted=False).values.amin(-1, keepdim=True)   # kk-th largest value
        gt, eq = s > vk, s == vk
        take = gt | (eq & (eq.cumsum(-1) <= kk - gt.sum(-1, keepdim=True)))  # exactly kk per row
        rank = torch.arange(n, 0, -1, device=s.device)                        # distinct, earlier = larger
        sel = torch.where(take, rank, 0).topk(kk, dim=-1, sorted=False).indices.sort(-1).values
        s, p = s.gather(-1, sel), p.gather(-1, sel)                           # array order kept
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    return s.gather(-1, order), p.gather(-1, order)


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
            s = s.add_(0.0).masked_fill_(~vis, float("-inf"))   # + 0.0: -0.0 -> +0.0 (one zero for every sort)
            p = torch.where(vis, pos, -1)
            if best_s is not None:   # previous list first: its positions are all smaller
                s, p = torch.cat([best_s, s], -1), torch.cat([best_p, p], -1)
            best_s, best_p = _merge(s, p, kk)
        m = best_p.shape[-1]
        idx[:, s0:s1, :m] = best_p
        if return_scores:
            scores[:, s0:s1, :m] = torch.where(best_p >= 0, best_s, float("-inf"))
    return (idx, scores) if return_scores else idx


def _selected_chunk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b, t, k = idx.shape
    n = keys.shape[1]
    flat = (idx.clamp_min(0) + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
    kg = keys.reshape(b * n, -1).index_select(0, flat).view(b, t, k, -1).to(q.dtype)
    s = torch.einsum("btnc,btkc->btnk", q, kg).relu()
    s = torch.einsum("btnk,btn->btk", s, w)
    return torch.where(idx >= 0, s, 0.0)


def indexer_selected_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor,
                            chunk: int = 128) -> torch.Tensor:
    """Differentiable indexer scores of the SELECTED entries only: out[b,t,i] = Score(t, idx[b,t,i])
    = sum_j w_tj ReLU(q_tj . keys[idx]) (0 on -1 slots), [B,T,k].

    For the sparse-stage indexer KL restricted to the selected set (DSA paper; spec section 2):
    indexer_kl(out, probs_selected, idx >= 0) equals indexer_kl(full_scores, mass, selection_mask).
    Query chunks under activation checkpointing: memory O(chunk * k * (c_I + n_I)) instead of the
    O(T * k * (c_I + n_I)) a plain gather would keep for backward.
    """
    from torch.utils.checkpoint import checkpoint

    t = q.shape[1]
    grad = torch.is_grad_enabled() and (q.requires_grad or w.requires_grad or keys.requires_grad)
    outs = []
    for s0 in range(0, t, chunk):
        args = (q[:, s0:s0 + chunk], w[:, s0:s0 + chunk], keys, idx[:, s0:s0 + chunk])
        outs.append(checkpoint(_selected_chunk, *args, use_reentrant=False) if grad else _selected_chunk(*args))
    if not outs:
        return q.new_zeros(idx.shape, dtype=torch.float32)
    return torch.cat(outs, 1)
