"""Muon on FSDP2-sharded matrices: each matrix is orthogonalised whole, as in one process.

Newton-Schulz needs the whole matrix (X X^T couples every row), while FSDP2 leaves each rank 1/world of
its rows. For every sharded matrix of a step, one owner rank (round-robin over the job, largest first,
so the work is spread) gathers the rows of the momentum update U from every rank, runs Newton-Schulz on
the full matrix (its row blocks and expert stacks stay independent matrices, as in one process) and
scatters each rank its rows of O back.

Communication per step, for a matrix of n elements in fp32: a gather of n * 4 bytes to its owner and a
scatter of n * 4 bytes from it, i.e. each rank sends and receives about 2 n (world - 1) / world * 4 bytes
per matrix: the same volume as one all-gather plus one reduce-scatter of the matrix, and half of a
naive all-gather in which every rank would orthogonalise every matrix. The owners' Newton-Schulz runs in
parallel, so its time falls by about the world size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    """local [r, ...] zero-padded to [rows, ...] (FSDP2 shards dim 0 like torch.chunk: the last may be short)."""
    if local.shape[0] == rows:
        return local.contiguous()
    out = local.new_zeros(rows, *local.shape[1:])
    out[: local.shape[0]] = local
    return out


def orthogonalize_sharded(
    updates: list[torch.Tensor], shapes: list[tuple[int, int]], ns: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """updates: DTensors (dim-0 sharded, full shape [..., R, C]); shapes: the (rows, cols) of the independent
    matrices of each -> this rank's rows of ns(U.reshape(-1, rows, cols)).reshape(U.shape), per update."""
    world, rank = dist.get_world_size(), dist.get_rank()
    order = sorted(range(len(updates)), key=lambda i: -updates[i].numel())
    owner = {i: k % world for k, i in enumerate(order)}
    chunk = [-(-u.shape[0] // world) for u in updates]  # rows of the largest shard
    locals_ = [u.to_local() for u in updates]
    gathered: dict[int, list[torch.Tensor]] = {}
    works = []
    for i in range(len(updates)):
        send = _padded(locals_[i], chunk[i])
        parts = [torch.empty_like(send) for _ in range(world)] if owner[i] == rank else None
        if parts is not None:
            gathered[i] = parts
        works.append(dist.gather(send, parts, dst=owner[i], async_op=True))
    for w in works:
        w.wait()
    outs, works = [], []
    for i, u in enumerate(updates):
        recv = torch.empty(chunk[i], *u.shape[1:], dtype=locals_[i].dtype, device=locals_[i].device)
        pieces = None
        if owner[i] == rank:
            full = torch.cat(gathered[i])[: u.shape[0]]
            rows, cols = shapes[i]
            o = ns(full.reshape(-1, rows, cols)).reshape(u.shape).to(recv.dtype)
            pieces = list(_padded(o, chunk[i] * world).split(chunk[i]))
        works.append(dist.scatter(recv, pieces, src=owner[i], async_op=True))
        outs.append(recv)
    for w in works:
        w.wait()
    return [o[: loc.shape[0]] for o, loc in zip(outs, locals_)]
