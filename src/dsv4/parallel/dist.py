"""The process group of a torchrun job, and the few collectives the trainer needs.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` joins that job with gloo on
the CPU and nccl on CUDA (the same code), and a single process (no WORLD_SIZE, or 1) needs no group at all.
A rank that dies stops the others: torchrun tears the job down, and every collective has a timeout
(DSV4_DIST_TIMEOUT seconds, default 300), so nothing waits forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "DSV4_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: rank r of `world` processes (local_rank on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes run files, logs and progress bars."""
        return self.rank == 0


SINGLE = DistEnv()


def env_from_environ(environ: dict | None = None) -> DistEnv:
    """The DistEnv torchrun's variables describe (SINGLE without them)."""
    e = os.environ if environ is None else environ
    world = int(e.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> DistEnv:
    """Join the torchrun job (idempotent): gloo for CPU, nccl for CUDA (each rank on cuda:LOCAL_RANK)."""
    env = env_from_environ()
    if not env.active or dist.is_initialized():
        return env
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, timeout=timeout)
    return env


def comm_device() -> torch.device:
    """Where collective buffers live: the current GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum / max / mean over the job (no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        buf = t.to(comm_device())
        dist.all_reduce(buf, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            buf.div_(dist.get_world_size())
        if buf is not t:
            t.copy_(buf)
    return t


def rank_rows(n: int, env: DistEnv) -> slice:
    """The rows of a global batch of n that rank env.rank trains on: contiguous, disjoint, n / world each."""
    if n % env.world:
        raise ValueError(f"batch_size={n} is not divisible by the {env.world} data-parallel ranks")
    k = n // env.world
    return slice(env.rank * k, (env.rank + 1) * k)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank src's value on every rank (a plan that must agree, such as the step count of a --minutes run)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_gather_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows [n_r], values [n_r, dim]), concatenated in rank order; n_r may differ by rank
    (the sparse row gradients of replicated Engram tables)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rows, values
    world, dev = dist.get_world_size(), comm_device()
    n = torch.tensor([rows.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(x.item()) for x in sizes]
    top = max(counts)
    r = torch.full((top,), -1, dtype=torch.int64, device=dev)
    v = torch.zeros(top, values.shape[1], dtype=values.dtype, device=dev)
    r[: rows.numel()], v[: rows.numel()] = rows.to(dev), values.to(dev)
    rs, vs = [torch.empty_like(r) for _ in range(world)], [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(rs, r)
    dist.all_gather(vs, v)
    out_r = torch.cat([x[:c] for x, c in zip(rs, counts)]).to(rows.device)
    out_v = torch.cat([x[:c] for x, c in zip(vs, counts)]).to(values.device)
    return out_r, out_v
