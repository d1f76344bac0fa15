"""LM head + cross entropy without materialising all [N, V] logits at once (fast path).

loss = mean_i (logsumexp_v (h_i . w_v) - h_i . w_{y_i}). The reference is F.cross_entropy(h @ W^T, y).
In training the fused op works through rows in chunks and computes the gradients in the same pass,
d loss / d logits = (softmax - onehot) / N, so the [N, V] logits never exist whole and are never
recomputed (the same trick as Liger-Kernel's fused linear cross entropy).

Speed on CPU (benchmarks/train_throughput.py, tiny preset, 4096 rows x vocab 8192): a chunk's logits
are kept to about CHUNK_BYTES so that the passes over them (log-softmax, exp, the one-hot update) run
from the last-level cache; the log-softmax gives both the loss and, exponentiated in place, the
softmax; the 1/N scale is applied to the small [rows, d] operands, not to the [rows, V] block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 8 << 20  # fp32 logits per chunk (8 MiB: 256 rows of an 8K vocab)


def default_chunk(vocab: int) -> int:
    """Rows per chunk so that a chunk's fp32 logits take about CHUNK_BYTES (at least 16 rows)."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy_reference(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).to(torch.promote_types(h.dtype, torch.float32)), target)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, chunk):
        n = h.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 softmax (fp64 in tests)
        total = torch.zeros((), dtype=acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=acc) if need_w else None
        w_h = w.to(h.dtype)  # the products below take explicit dtypes (out= and in-place are not autocast)
        for s in range(0, n, chunk):
            hs, ts = h[s : s + chunk], target[s : s + chunk]
            logp = torch.log_softmax(F.linear(hs, w).to(acc), -1)
            total -= logp.gather(1, ts[:, None]).sum()
            g = logp.exp_()  # softmax
            g[torch.arange(len(ts)), ts] -= 1.0  # d CE / d logits, times n
            g = g.to(h.dtype)
            if need_h:
                torch.mm(g, w_h, out=grad_h[s : s + chunk]).mul_(1.0 / n)
            if need_w:
                if grad_w.dtype == h.dtype:
                    grad_w.addmm_(g.T, hs, alpha=1.0 / n)
                else:
                    grad_w += (g.T @ hs).to(acc) * (1.0 / n)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(w.dtype) if need_w else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """h [N, d], w [V, d], target [N] -> mean CE (fp32). Same value and gradients as the reference.
    chunk: rows per step (default: default_chunk(V))."""
    chunk = chunk or default_chunk(w.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _FusedLinearCE.apply(h, w, target, chunk)
    total = sum(
        F.cross_entropy(F.linear(h[s : s + chunk], w).float(), target[s : s + chunk], reduction="sum")
        for s in range(0, h.shape[0], chunk)
    )
    return total / h.shape[0]
