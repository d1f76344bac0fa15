"""Sparse row-wise Adam for Engram tables (docs/spec.md section 4: table rows use sparse
Adam, lr x5 of the base lr, no weight decay). Update of Kingma & Ba 2015 (Algorithm 1), written
with the same tensor ops as torch.optim.Adam's single-tensor path:
    k_r += 1;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^k_r) * m / (sqrt(v) / sqrt(1 - b2^k_r) + eps)
k_r is a per-row step count (bias correction per row). Consequences:
  * rows touched at every step so far: bitwise the dense torch.optim.Adam (weight_decay=0,
    foreach=False) on those rows;
  * rows touched less often: "lazy Adam" - an untouched row, its m, v and k_r stay unchanged, and
    a row evolves exactly as dense Adam fed only the gradients of the steps that touched it (no
    moment decay and no momentum drift on skipped steps; unlike TF LazyAdam, the bias correction
    uses the row's own count, not the global step)."""

from __future__ import annotations

from pathlib import Path

import torch

from .stores import MmapStore, Rows, RowStore, _as_rows, _check_values, zeros_like

__all__ = ["SparseRowAdam", "coalesce_rows"]


def coalesce_rows(rows: Rows, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique sorted rows, summed grads): the gradient of a row read several times is the sum."""
    rows = torch.as_tensor(rows).to(device="cpu", dtype=torch.int64).reshape(-1)
    grads = grads.reshape(rows.numel(), -1)
    uniq, inv = torch.unique(rows, return_inverse=True)
    out = torch.zeros(uniq.numel(), grads.shape[1], dtype=torch.float32, device=grads.device)
    out.index_add_(0, inv.to(grads.device), grads.to(torch.float32))
    return uniq, out


class SparseRowAdam:
    """Adam on the rows of a RowStore; state m, v (n_rows x dim) and step k (n_rows x 1, fp32:
    exact counts up to 2^24) live in stores of the table's kind (RAM, or mmap files in state_dir,
    reopened when present)."""

    STATE_NAMES = ("exp_avg", "exp_avg_sq", "step")

    def __init__(
        self,
        store: RowStore,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state_dir: str | Path | None = None,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Adam hyper-parameters lr={lr} betas={betas} eps={eps}")
        self.store, self.lr, self.betas, self.eps = store, lr, tuple(betas), eps
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.state: dict[str, RowStore] = {}
        for name in self.STATE_NAMES:
            dim = 1 if name == "step" else store.dim
            path = None if self.state_dir is None else self.state_dir / f"{name}.npy"
            if path is not None and path.exists():
                s = MmapStore.open(path, "r+")
                if (s.n_rows, s.dim) != (store.n_rows, dim):
                    raise ValueError(f"{path}: state shape {(s.n_rows, s.dim)} does not match {(store.n_rows, dim)}")
            else:
                s = zeros_like(store, dim=dim, path=path)
            self.state[name] = s

    def state_stores(self) -> dict[str, RowStore]:
        return dict(self.state)

    def will_need(self, rows: Rows) -> None:
        """Read-ahead hint for the state rows a coming step will update (disk-backed state only)."""
        for s in self.state.values():
            s.will_need(rows)

    @torch.no_grad()
    def step(self, rows: Rows, grads: torch.Tensor) -> None:
        """One Adam step on the unique `rows` with gradients grads [N, dim]."""
        rows = _as_rows(rows, self.store.n_rows)
        grads = _check_values(rows, grads, self.store.dim)  # also rejects repeated rows
        if rows.numel() == 0:
            return
        beta1, beta2 = self.betas
        param = self.store.read(rows)
        exp_avg = self.state["exp_avg"].read(rows)
        exp_avg_sq = self.state["exp_avg_sq"].read(rows)
        k = self.state["step"].read(rows).reshape(-1).add_(1)
        exp_avg.lerp_(grads, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        counts = torch.unique(k)
        groups = (
            [(float(counts[0]), None)]
            if counts.numel() == 1
            else [(float(c), (k == c).nonzero().reshape(-1)) for c in counts]
        )
        for kc, idx in groups:
            bias_correction1 = 1 - beta1**kc
            bias_correction2 = 1 - beta2**kc
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            if idx is None:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
            else:
                p = param.index_select(0, idx)
                denom = (exp_avg_sq.index_select(0, idx).sqrt() / bias_correction2_sqrt).add_(self.eps)
                p.addcdiv_(exp_avg.index_select(0, idx), denom, value=-step_size)
                param.index_copy_(0, idx, p)
        self.state["exp_avg"].write(rows, exp_avg)
        self.state["exp_avg_sq"].write(rows, exp_avg_sq)
        self.state["step"].write(rows, k.reshape(-1, 1))
        self.store.write(rows, param)

    def flush(self) -> None:
        self.store.flush()
        for s in self.state.values():
            s.flush()
