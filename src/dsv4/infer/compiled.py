"""A compiled decode step: torch.compile of Transformer.decode_logits over a ModelCache.

A decode step has static shapes: every store of the cache has a fixed capacity between the page
growths that ModelCache.begin performs, reads are whole stores under validity masks, the indexer's
top-k is shape-static (dsv4.kernels.topk.topk_static) and the MoE runs its routing-independent path
(Experts.forward_static). So inductor (its C++/OpenMP backend on CPU, Triton on CUDA) fuses the whole
step -- the mHC maps with their Sinkhorn iterations, norms, router, gathered experts, attention -- into
~180 calls instead of ~2,700 eager ops. One compilation per shape bucket: the batch size and every
store's capacity (capacities grow by doubling, so a context of n tokens costs O(log n) buckets), and
where a contiguous row range starts (whole stores are then read as slices; other row sets index by a
row tensor, one graph per batch size); inductor also keeps its compiled code on disk, so a later
process pays much less.
Engram layers read their tables outside the graph (a graph break), which still works.

On CPU two more things matter, both measured with benchmarks/decode.py (docs/performance.md):
- Products of a few rows (every linear layer and expert of a decode step: y = x W^T with x [B, d],
  B <= SMALL_ROWS) or of a few columns (scores of many cached keys against a few heads) are handed to inductor as y[b, n] = sum_k x[b, k] W[n, k], a reduction, instead of
  a BLAS call. BLAS runs such matrix-vector products on one thread at ~8 GB/s from memory; inductor's
  reduction is vectorised, splits the outputs over all threads and fuses the neighbouring elementwise
  maths and the experts' gather into its loads (tiny preset, batch 1: 3.9 -> 1.9 ms per step).
- glibc's allocator gives large blocks back to the system after each step and maps them again on the
  next (page faults on every step's buffers); tune_malloc keeps them (batch 8: ~5-20% of a step).

The eager step (model(ids, cache=...), or Transformer.decode_logits uncompiled) is the reference
twin; tests compare the two.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

import torch
import torch._dynamo
import torch._inductor.custom_graph_pass

aten = torch.ops.aten
SMALL_ROWS = 16   # products with at most this many rows become reductions (CPU)
LARGE_WEIGHT = 1 << 20   # bytes: larger weights are read outputs-first when M > 1


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


def _cpu_backend(gm, example_inputs):
    """Inductor with the few-rows products as reductions and the C++ wrapper (the kernel-launching code
    in C++ too: ~15% off a tiny step)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), aten.mm.default: _mm, aten.addmm.default: _addmm,
             aten.bmm.default: _bmm}
    return compile_fx(gm, example_inputs, decompositions=table,
                      config_patches={"cpp_wrapper": True, "post_grad_custom_pre_pass": _RuleKey()})


def tune_malloc() -> bool:
    """Keep freed heap memory in the process (glibc: mmap threshold 32 MiB, trim threshold 1 GiB), so a
    decode step's buffers are not unmapped and faulted in again every step. Process-wide; off with
    DSV4_TUNE_MALLOC=0; a no-op (False) without glibc."""
    if os.environ.get("DSV4_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


class CompiledDecoder:
    """dec = CompiledDecoder(model); logits = dec(ids [B, 1], cache, rows=None) -> [B, V] next-token
    logits, advancing the cache rows by one. compile_seconds: {bucket: seconds of its first call}."""

    def __init__(self, model, mode: str | None = None):
        self.model = model.eval()
        # one graph per bucket; the default limit (8) would fall back to eager after a few growths
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)
        # no guards on the model's modules (they halve the per-call guard time): the model's structure,
        # dtypes and parameter shapes must stay as they are; weights may change in place. The cache is
        # guarded (store shapes and the bound rows pick the bucket).
        opts = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if next(model.parameters()).device.type == "cpu" and mode is None:
            tune_malloc()
            self.fn = torch.compile(model.decode_logits, dynamic=False, backend=_cpu_backend, options=opts)
        else:
            self.fn = torch.compile(model.decode_logits, dynamic=False, mode=mode, options=opts)
        self.compile_seconds: dict[tuple, float] = {}

    @staticmethod
    def bucket(cache, rows: torch.Tensor) -> tuple:
        """(batch, first row when the rows are contiguous -- whole-store reads are then slices, not
        gathers -- else None, every store's capacity)."""
        caps = tuple(s.data.shape[1] for lc in cache.layers for s in lc.stores())
        view = cache.layers[0].view if cache.layers else None
        return (rows.numel(), view.start if isinstance(view, slice) else None, caps)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache, rows=None) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != 1:
            raise ValueError(f"a decode step takes ids of shape [batch, 1], got {tuple(ids.shape)}")
        rows = cache.rows_of(rows)
        if rows.numel() != ids.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} rows but {rows.numel()} cache rows were given")
        positions = cache.begin(rows, 1)            # grows the stores (eager), binds the rows
        key = self.bucket(cache, rows)
        t0 = time.perf_counter() if key not in self.compile_seconds else None
        logits = self.fn(ids, positions, cache)
        if t0 is not None:
            self.compile_seconds[key] = time.perf_counter() - t0
        cache.advance(rows, 1)
        return logits
