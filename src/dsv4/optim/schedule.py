"""Learning-rate schedule: linear warmup, then cosine decay to min_ratio * max_lr.

lr(s) = max_lr (s + 1) / warmup                                   for s < warmup
lr(s) = lr_min + (max_lr - lr_min) (1 + cos(pi (s - warmup) / (total - warmup))) / 2   for warmup <= s < total
lr(s) = lr_min = min_ratio max_lr                                 for s >= total
so lr(0) = max_lr / warmup (the first step already moves), lr(warmup) = max_lr, lr(total) = lr_min.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

clip_grad_norm = torch.nn.utils.clip_grad_norm_  # returns the total norm before clipping


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lr_min = min_ratio * max_lr
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return lr_min
    progress = (step - warmup) / max(1, total - warmup)
    return lr_min + (max_lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """group['lr'] = lr * group['lr_mult'] (1 when absent) for every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
