"""Deterministic top-k for the lightning indexer: higher score first, then lower position.

torch.topk breaks ties by memory layout, so prefill and decode could disagree on exact-zero ReLU
ties (docs/spec.md section 2). A stable descending sort gives the one rule everywhere.
"""

import torch


def topk_indices(scores: torch.Tensor, k: int, visible: torch.Tensor | None = None) -> torch.Tensor:
    """scores [..., N] (masked entries may be -inf), visible [..., N] bool or None -> idx [..., min(k, N)].

    Entries that are not visible come back as -1 (a query with fewer than k visible entries takes all).
    """
    n = scores.shape[-1]
    k = min(k, n)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    if visible is None:
        return order
    ok = torch.gather(visible, -1, order)
    return torch.where(ok, order, torch.full_like(order, -1))


def topk_static(scores: torch.Tensor, k: int, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape-static twin of topk_indices for a decode step: scores/visible [B, N] -> (ids [B, min(k, N)],
    valid [B, min(k, N)]); the same set (score descending, then position ascending; fewer than k visible
    entries: all of them), in no particular order, with invalid slots instead of -1 padding.

    One int64 key per entry: order-preserving int32 of the fp32 score << 32 | (2^32 - 1 - position), so
    (score desc, position asc) is descending key order and every key of a row is distinct; invisible
    entries get the smallest key. No data-dependent shapes (torch.compile fuses it)."""
    n = scores.shape[-1]
    i = (scores.float() + 0.0).view(torch.int32)  # -0.0 -> +0.0
    o = torch.where(i < 0, i ^ 0x7FFFFFFF, i).long()
    pos = torch.arange(n, device=scores.device)
    key = (o << 32) | ((1 << 32) - 1 - pos)
    key = key.masked_fill(~visible, torch.iinfo(torch.int64).min)
    top = key.topk(min(k, n), dim=-1, sorted=False)
    return top.indices, visible.gather(-1, top.indices)


def topk_eager(scores: torch.Tensor, k: int, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_static's result for eager calls over long rows: one torch.topk of the float scores (k + 1 of
    them) is exact unless the k-th and (k+1)-th values tie (the boundary, where the position rule
    decides; also rows with fewer than k visible entries); only then the int64-key path runs."""
    n = scores.shape[-1]
    if n <= k:
        return topk_static(scores, k, visible)
    s = scores.float().masked_fill(~visible, float("-inf"))
    v, i = s.topk(k + 1, dim=-1, sorted=True)
    if bool((v[..., k - 1] == v[..., k]).any()):
        return topk_static(scores, k, visible)
    i = i[..., :k]
    return i, visible.gather(-1, i)
