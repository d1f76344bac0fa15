"""Expert parallelism: each rank of the job holds E / ep_size of every MoE layer's routed experts.

A token's k routed (token, expert) pairs travel to the ranks that hold those experts and back with
`all_to_all_single` (uneven splits: the router decides the counts), as in DeepSeek's and torchtitan's EP:

    1. sort the pairs by expert (so by owner rank), exchange the per-expert counts (one small all-to-all);
    2. send each owner its rows of x; it runs its experts on what it received, grouped by expert;
    3. send the outputs back in the same order and add them into their tokens (in fp32).

The backward runs the two exchanges in reverse (the gradient of an all-to-all is the all-to-all with the
splits swapped), so each expert's gradient sums the contributions of every rank's tokens. The routing
weights travel with the rows and multiply W2's input, as in one process; their gradient comes back
through the same exchange. Hash routing needs nothing more: its expert ids come from the token ids, and
travel like the learned ones.

The expert weights are DTensors sharded on dim 0 (the expert index) over the job's mesh, so DCP saves
and reshards them like every FSDP2 parameter, and the parameter names stay `...experts.w1` etc. Their
gradients are divided by the world size after the backward: every other gradient is averaged over the
ranks by FSDP2's reduce-scatter, and an expert's gradient has summed the ranks' local mean losses.
Here ep_size equals the world size (one expert group spanning the job).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from dsv4.model.moe import MoE, swiglu


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: rows x [sum(send), ...] -> [sum(recv), ...]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        ctx.send, ctx.recv = send, recv
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv)
        return out, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv)


class ExpertParallel(nn.Module):
    """The routed experts of one MoE layer, E / world of them on each rank (a drop-in for model.moe.Experts:
    forward(x [N, d], idx [N, k], weights [N, k]) -> [N, d])."""

    def __init__(self, experts: nn.Module, mesh: DeviceMesh) -> None:
        super().__init__()
        world, rank = mesh.size(), mesh.get_local_rank()
        if experts.n % world:
            raise ValueError(f"n_routed_experts={experts.n} is not divisible by ep_size={world}")
        self.n, self.limit, self.world, self.rank = experts.n, experts.limit, world, rank
        self.local = experts.n // world
        rows = slice(rank * self.local, (rank + 1) * self.local)
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name).detach()
            shard = DTensor.from_local(full[rows].clone(), mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(shard))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        _, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # by expert, so by owner rank
        tok = order // k
        counts = torch.bincount(flat, minlength=self.n)  # pairs per global expert, from this rank
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts)  # got[s * local + j]: pairs rank s sends to my expert j
        send = counts.view(self.world, self.local).sum(1).tolist()
        got_by_src = got.view(self.world, self.local)
        recv = got_by_src.sum(1).tolist()
        xs = all_to_all(x.index_select(0, tok), send, recv)  # grouped by source rank, then by my expert
        ws = weights.flatten().index_select(0, order).to(x.dtype)
        wr = all_to_all(ws[:, None], send, recv)[:, 0]  # each pair's routing weight travels with it
        # regroup the received rows by my local expert (stable within each expert: source order)
        local_ids = torch.arange(self.local, device=x.device).repeat(self.world)
        expert_of_row = torch.repeat_interleave(local_ids, got_by_src.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        per_expert = got_by_src.sum(0).tolist()
        w1, w2, w3 = self.w1.to_local(), self.w2.to_local(), self.w3.to_local()
        outs, start, ys, yw = [], 0, xs.index_select(0, by_expert), wr.index_select(0, by_expert)
        for j, cnt in enumerate(per_expert):
            if cnt:
                sl = slice(start, start + cnt)
                outs.append(swiglu(ys[sl], w1[j], w2[j], w3[j], self.limit, yw[sl]))
            start += cnt
        y = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[1])
        y = torch.empty_like(y).index_copy(0, by_expert, y)  # back to the received order
        back = all_to_all(y, recv, send)  # in this rank's sorted pair order
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, back.float())

    forward_reference = forward


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    """The expert-parallel parameters (left out of FSDP2: they are sharded already)."""
    return {p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Replace every MoE layer's routed experts by its ExpertParallel shard, in place (before FSDP2)."""
    for m in model.modules():
        if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallel):
            m.experts = ExpertParallel(m.experts, mesh)


def scale_expert_grads(model: nn.Module, world: int) -> None:
    """Expert gradients / world, after the backward (see the module docstring); an expert that no token
    reached on this rank gets a zero gradient, so that every rank takes part in the same collectives."""
    for p in expert_params(model):
        if p.grad is not None:
            p.grad.div_(world)
        elif p.requires_grad:
            p.grad = torch.zeros_like(p)
