"""Muon with V4's hybrid Newton-Schulz, plus AdamW groups, as one torch Optimizer (docs/spec.md section 8).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/), in the form of the V4 report's
Algorithm (and Moonlight, Liu et al. 2025, arXiv 2502.16982, for the RMS matching), for every logically
independent matrix W in R^{n x m} of a Muon group:

    M_t = mu M_{t-1} + G_t                                   (momentum, mu = 0.95)
    O   = HybridNS(mu M_t + G_t)      (Nesterov; HybridNS(M_t) without Nesterov)
    O'  = O * sqrt(max(n, m)) * gamma                        (gamma = 0.18: RMS(O') ~ AdamW's update RMS)
    W_t = W_{t-1} (1 - lr wd) - lr O'                        (decoupled weight decay, wd = 0.1)

HybridNS: X = M / ||M||_F, then X <- a X + b (X X^T) X + c (X X^T)^2 X for 8 steps with
(a, b, c) = (3.4445, -4.7750, 2.0315) (fast, leaves singular values in ~[0.7, 1.2]) and 2 steps with
(2, -1.5, 0.5) (p(1) = 1, p'(1) = 0: pulls them onto 1). X is transposed when n > m so X X^T is the
small Gram matrix. A 3-D parameter [E, n, m] (stacked routed experts) is E separate matrices, each
normalised and orthogonalised on its own (batched); a group's `blocks` > 1 splits the rows of each
matrix into that many independent matrices (used for the grouped output projection wo_a).

Groups with ``algorithm="adamw"`` take a plain AdamW step (Loshchilov & Hutter 2019; same arithmetic
as torch.optim.AdamW(foreach=False)) with their own betas/eps/weight_decay, so the whole V4 recipe
(Muon for matrices, AdamW for embedding, head, norms, mHC gates, sinks) is ONE Optimizer: one
``param_groups`` list for the scheduler and one ``state_dict`` for exact resume.

Why not torch.optim.Muon (torch 2.13): it accepts only 2-D parameters (no [E, n, m] expert stacks,
no row blocks), runs one coefficient set for ``ns_steps`` steps (no hybrid 8 + 2 schedule), always
orthogonalises in bf16, takes no AdamW groups, and its lr adjustments are Keller's sqrt(max(1, n/m))
or Moonlight's 0.2 sqrt(max(n, m)) instead of V4's 0.18 sqrt(max(n, m)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim import Optimizer

KELLER_ABC = (3.4445, -4.7750, 2.0315)
STABILISE_ABC = (2.0, -1.5, 0.5)
V4_NS_STEPS: tuple[tuple[float, float, float], ...] = (KELLER_ABC,) * 8 + (STABILISE_ABC,) * 2
NS_EPS = 1e-7
BATCH_NUMEL = 1 << 18  # parameters up to this many elements share a batched Newton-Schulz with their shape


def hybrid_newton_schulz(
    m: torch.Tensor,
    steps: Sequence[tuple[float, float, float]] = V4_NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate polar factor U V^T of every matrix in m [..., n, m'] (leading dims are a batch).

    Each matrix is divided by its own Frobenius norm, then X <- aX + b(XX^T)X + c(XX^T)^2 X per
    (a, b, c) in ``steps``. Computed in ``dtype`` (fp32 by default); returns that dtype.
    """
    if m.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(m.shape)}")
    shape = m.shape
    x = m.reshape(-1, shape[-2], shape[-1]).to(dtype)
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    norm = torch.linalg.matrix_norm(x.float(), keepdim=True).clamp_min(eps)
    x = (x.float() / norm).to(dtype)
    for a, b, c in steps:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    if tall:
        x = x.mT
    return x.reshape(shape)


def _is_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter (FSDP2): its update needs the whole matrix from every rank."""
    return type(p).__name__ == "DTensor"


def _local_matrices(p: torch.Tensor) -> bool:
    """A DTensor stack of matrices [E, n, m] sharded on the stack dimension only: each rank holds whole
    matrices (FSDP2 and expert parallelism shard dim 0), so Newton-Schulz needs no communication."""
    return p.ndim >= 3 and all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in p.placements)


def _dense_grads(group: dict, algo: str):
    """(param, grad) of the group's parameters that have a gradient; sparse gradients are an error."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{algo} does not support sparse gradients")
        yield p, p.grad


def muon_scale(rows: int, cols: int, gamma: float) -> float:
    """V4 update scale sqrt(max(n, m)) * gamma: an orthogonal n x m update has RMS 1/sqrt(max(n, m))."""
    return math.sqrt(max(rows, cols)) * gamma


class Muon(Optimizer):
    """Muon (V4 recipe) for groups with algorithm="muon" (default), AdamW for groups with "adamw".

    Muon group keys: lr, momentum (0.95), nesterov (True), weight_decay (0.1), update_scale (gamma,
    0.18), blocks (1; rows of each matrix split into this many independent matrices), ns_bf16 (False:
    Newton-Schulz in fp32). AdamW group keys: lr, betas ((0.9, 0.95)), eps (1e-8), weight_decay.
    Any group may carry lr_mult (read by dsv4.optim.schedule.set_lr, not here).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        update_scale: float = 0.18,
        blocks: int = 1,
        ns_bf16: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        algorithm: str = "muon",
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid lr={lr}, weight_decay={weight_decay} or momentum={momentum}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            update_scale=update_scale,
            blocks=blocks,
            ns_bf16=ns_bf16,
            betas=tuple(betas),
            eps=eps,
            algorithm=algorithm,
            lr_mult=1.0,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["algorithm"] not in ("muon", "adamw"):
            raise ValueError(f"param group algorithm must be 'muon' or 'adamw', got {group['algorithm']!r}")
        if group["algorithm"] == "muon":
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon needs parameters with ndim >= 2, got shape {tuple(p.shape)}; "
                        "put it in an algorithm='adamw' group"
                    )
                if p.shape[-2] % group["blocks"]:
                    raise ValueError(f"blocks={group['blocks']} does not divide the rows of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        """Momentum, Newton-Schulz, decay and update for every parameter of the group. Small parameters of
        the same matrix shape are orthogonalised together in one batched Newton-Schulz (each matrix is
        still normalised and iterated on its own, so the result equals one call per parameter)."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        dtype = torch.bfloat16 if group["ns_bf16"] else torch.float32
        pending: dict[tuple[int, int], list] = {}
        sharded: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        for p, g in _dense_grads(group, "Muon"):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)  # M_t = mu M_{t-1} + G_t
            u = g.add(buf, alpha=mu) if group["nesterov"] else buf
            rows, cols = p.shape[-2] // group["blocks"], p.shape[-1]
            if _is_sharded(p) and not _local_matrices(p):  # the owner rank orthogonalises whole matrices
                sharded.append((p, u, (rows, cols)))
                continue
            if _is_sharded(p):  # a stack of matrices split between ranks along the stack: each has its own
                o = hybrid_newton_schulz(u.to_local().reshape(-1, rows, cols), dtype=dtype)
                self._apply(group, [p.to_local()], o, lr, wd)
                continue
            mats = u.reshape(-1, rows, cols)
            if p.numel() > BATCH_NUMEL:  # large enough to keep the matmul units busy on its own
                self._apply(group, [p], hybrid_newton_schulz(mats, dtype=dtype), lr, wd)
            else:
                pending.setdefault((rows, cols), []).append((p, mats))
        for items in pending.values():
            ps = [p for p, _ in items]
            self._apply(group, ps, hybrid_newton_schulz(torch.cat([m for _, m in items]), dtype=dtype), lr, wd)
        if sharded:
            from dsv4.parallel.muon import orthogonalize_sharded

            shapes = [rc for _, _, rc in sharded]
            outs = orthogonalize_sharded(
                [u for _, u, _ in sharded], shapes, lambda m: hybrid_newton_schulz(m, dtype=dtype)
            )
            for (p, _, (rows, cols)), o in zip(sharded, outs):
                local = p.to_local()
                if wd:
                    local.mul_(1 - lr * wd)
                o = o.mul_(muon_scale(rows, cols, group["update_scale"]))  # as _apply, in the same order
                local.add_(o.to(local.dtype), alpha=-lr)

    @staticmethod
    def _apply(group: dict, params: list, o: torch.Tensor, lr: float, wd: float) -> None:
        """W <- W (1 - lr wd) - lr * scale * O for the parameters whose orthogonalised matrices o holds in order."""
        rows, cols = o.shape[-2:]
        o = o.mul_(muon_scale(rows, cols, group["update_scale"]))
        for p, op in zip(params, o.split([p.numel() // (rows * cols) for p in params])):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(op.reshape(p.shape).to(p.dtype), alpha=-lr)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p, g in _dense_grads(group, "AdamW"):
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr / (1 - beta1**t)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
