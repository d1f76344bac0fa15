"""Inductor with the few-rows rule: small products as reductions, for CPU graphs (decode and training).

Products of a few rows (every linear layer and expert of a decode step: y = x W^T with x [B, d],
B <= SMALL_ROWS) or of a few columns (scores of many cached keys against a few heads; the 4 x 4 mHC
stream mixing of a training step) are handed to inductor as y[b, n] = sum_k x[b, k] W[n, k], a
reduction, instead of a BLAS call. BLAS runs such products on one thread (matrix-vector products at
~8 GB/s from memory, batches of 4 x 4 products one small call at a time); inductor's reduction is
vectorised, splits the outputs over all threads and fuses the neighbouring elementwise maths into its
loads. `cpu_backend` is the torch.compile backend with the rule; the plain matmul is its reference
(tests compare the two).
"""

from __future__ import annotations

import torch
import torch._inductor.custom_graph_pass

aten = torch.ops.aten
SMALL_ROWS = 16  # products with at most this many rows become reductions (CPU)
LARGE_WEIGHT = 1 << 20  # bytes: larger weights are read outputs-first when M > 1


def _few_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A product of few rows (a decode step's linear layers) or few columns (its scores of many cached
    keys against a few query heads)."""
    return a.device.type == "cpu" and min(a.shape[-2], b.shape[-1]) <= SMALL_ROWS


def _product(a, b):
    """a [..., M, K] @ b [..., K, N] as a sum over k: y[m, n] = sum_k a[m, k] b[k, n]. When b is a large
    transposed weight (contiguous in k, more than a core's L2) and M > 1, the loops run outputs-first,
    y^T[n, m] = sum_k b^T[n, k] a[m, k], so each weight row is read once for all M rows instead of once
    per row (the LM head at batch 8: 64 MB read -> 8 MB)."""
    if a.shape[-2] > 1 and b.stride(-2) == 1 and b.shape[-2] * b.shape[-1] * b.element_size() > LARGE_WEIGHT:
        return (b.transpose(-1, -2).unsqueeze(-2) * a.unsqueeze(-3)).sum(-1).transpose(-1, -2)
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _mm(a, b):
    return _product(a, b) if _few_rows(a, b) else NotImplemented


def _addmm(c, a, b, beta=1, alpha=1):
    return beta * c + alpha * _product(a, b) if _few_rows(a, b) else NotImplemented


def _bmm(a, b):
    return _product(a, b) if _few_rows(a, b) else NotImplemented


class _RuleKey(torch._inductor.custom_graph_pass.CustomGraphPass):
    """Inductor keys its on-disk cache by the graph and its config, not by the decomposition table. This
    pass changes nothing; its uuid (a hash of this file) puts the few-rows rule into the key, so a graph
    compiled without the rule is never taken from the cache for one compiled with it, or the reverse."""

    def __call__(self, graph):
        return None

    def uuid(self):
        return torch._inductor.custom_graph_pass.get_hash_for_files((__file__,))


def cpu_backend(gm, example_inputs):
    """Inductor with the few-rows products as reductions and the C++ wrapper (the kernel-launching code
    in C++ too: ~15% off a tiny step)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), aten.mm.default: _mm, aten.addmm.default: _addmm, aten.bmm.default: _bmm}
    return compile_fx(
        gm,
        example_inputs,
        decompositions=table,
        config_patches={"cpp_wrapper": True, "post_grad_custom_pre_pass": _RuleKey()},
    )
