"""Deterministic top-k for the lightning indexer: higher score first, then lower position.

torch.topk breaks ties by memory layout, so prefill and decode could disagree on exact-zero ReLU
ties (spec section 2). A stable descending sort gives the one rule everywhere.
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
