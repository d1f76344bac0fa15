"""Long-context scoring through the cache: a context of any length is run in chunks through a ModelCache
(dsv4.infer.cache), so memory stays O(chunk) on the sparse kernels, and the logits of each chunk are handed
out as they come. The one long-context forward of `dsv4 eval retrieval` and `dsv4 eval loss-vs-position`;
equal to the plain uncached forward (tests/test_eval_long.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


@torch.no_grad()
def chunk_logits(model, ids: torch.Tensor, first: int = 0, chunk: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
    """ids [1, T] -> (start, logits [1, n, V] of positions start .. start + n - 1) for consecutive chunks that
    cover positions first .. T - 1; the positions before `first` are prefilled without the LM head."""
    from dsv4.infer.cache import ModelCache

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [1, T], got shape {tuple(ids.shape)}")
    t = ids.shape[1]
    if not 0 <= first < t or chunk < 1:
        raise ValueError(f"first={first} must be in [0, {t}) and chunk={chunk} >= 1")
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    cache = ModelCache(model, batch=1, capacity=min(t, 4096))  # the stores grow in pages past it
    pos = 0
    while pos < first:
        end = min(first, pos + chunk)
        model(ids[:, pos:end], cache=cache, compute_logits=False)
        pos = end
    while pos < t:
        end = min(t, pos + chunk)
        yield pos, model(ids[:, pos:end], cache=cache).logits
        pos = end


@torch.no_grad()
def position_losses(model, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """ids [1, T] -> the next-token loss (nats, fp32) of every position 0 .. T - 2 ([T - 1]): position p
    predicts token p + 1 from the p + 1 tokens up to it."""
    out = []
    for start, logits in chunk_logits(model, ids, 0, chunk):
        n = logits.shape[1]
        tgt = ids[0, start + 1 : start + n + 1].to(logits.device)
        out.append(F.cross_entropy(logits[0, : tgt.numel()].float(), tgt, reduction="none").cpu())
    return torch.cat(out)


@torch.no_grad()
def greedy_matches(model, ids: torch.Tensor, spans: list[tuple[int, int]], chunk: int = 4096) -> list[bool]:
    """For each answer span [a, b) of ids [1, T]: whether the model's argmax at positions a - 1 .. b - 2
    (teacher-forced) gives exactly ids[a:b]. Only the chunks holding those positions compute logits."""
    if not spans or any(not 1 <= a < b <= ids.shape[1] for a, b in spans):
        raise ValueError(f"answer spans {spans} must be non-empty and inside [1, {ids.shape[1]}]")
    first = min(a for a, _ in spans) - 1
    pred = torch.cat([lg[0].argmax(-1).cpu() for _, lg in chunk_logits(model, ids, first, chunk)])
    return [bool(torch.equal(pred[a - 1 - first : b - 1 - first], ids[0, a:b].cpu())) for a, b in spans]
