"""FSDP2 (`fully_shard`) for a dsv4 Transformer: every block (main and MTP) is one unit, then the root
(embedding, head, final norms). Parameters become DTensors sharded on dim 0 across the job; a unit's
parameters are all-gathered for its forward and backward and its gradients reduce-scattered (averaged),
so each rank holds 1/world of the parameters, gradients and optimiser state.

Mixed precision (CUDA, dtype bf16): parameters are gathered in bf16 and gradients reduced in fp32.
Activation checkpointing (`checkpoint=True`) recomputes each block in the backward; the composable
`checkpoint` keeps the parameter names unchanged, so checkpoints load either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


class Root(nn.Module):
    """The FSDP2 root around a Transformer: root(fn, *args) runs fn(transformer, *args) with the root's own
    parameters (embedding, head, final norms, mHC head) gathered, so that a loss that uses the head weight
    outside Transformer.forward (the fused head + cross entropy) and evaluation see whole tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The sharding units below the root: the main blocks, then the MTP blocks."""
    return [*model.layers, *model.mtp]


def job_mesh(device: torch.device) -> DeviceMesh:
    """The 1-D mesh of the whole job (FSDP2's data-parallel dimension, and expert parallelism's)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(
    model: nn.Module,
    param_dtype: torch.dtype | None = None,
    checkpoint: bool = False,
    mesh: DeviceMesh | None = None,
    ignored: set[nn.Parameter] | None = None,
) -> Root:
    """Apply FSDP2 to `model` in place over `mesh` (default: the whole job) and return its Root.
    param_dtype: the dtype of gathered parameters (None: as stored); gradients are reduced in fp32.
    ignored: parameters sharded otherwise (expert parallelism), left to their owner."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    kw = dict(mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    for blk in blocks(model):
        if checkpoint:
            from torch.distributed._composable import checkpoint as activation_checkpoint

            activation_checkpoint(blk)
        fully_shard(blk, **kw)
    root = Root(model)
    fully_shard(root, **kw)
    return root
