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
- The few-rows rule of dsv4.kernels.inductor: every product of a decode step (linear layers and
  experts of B <= 16 rows, scores of many cached keys against a few heads) becomes a vectorised,
  multi-threaded inductor reduction fused with its neighbours instead of a one-thread BLAS call (tiny
  preset, batch 1: 3.9 -> 1.9 ms per step).
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo

from dsv4.kernels.inductor import cpu_backend

if TYPE_CHECKING:
    from dsv4.infer.cache import ModelCache, Rows
    from dsv4.model.transformer import Transformer


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

    def __init__(self, model: Transformer, mode: str | None = None) -> None:
        self.model = model.eval()
        # one graph per bucket; the default limit (8) would fall back to eager after a few growths
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
        # no guards on the model's modules (they halve the per-call guard time): the model's structure,
        # dtypes and parameter shapes must stay as they are; weights may change in place. The cache is
        # guarded (store shapes and the bound rows pick the bucket).
        opts: dict[str, str | int | bool | Callable[..., Any]] = {
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe
        }
        if next(model.parameters()).device.type == "cpu" and mode is None:
            tune_malloc()
            self.fn = torch.compile(model.decode_logits, dynamic=False, backend=cpu_backend, options=opts)
        else:
            self.fn = torch.compile(model.decode_logits, dynamic=False, mode=mode, options=opts)
        self.compile_seconds: dict[tuple, float] = {}

    @staticmethod
    def bucket(cache: ModelCache, rows: torch.Tensor) -> tuple:
        """(batch, first row when the rows are contiguous -- whole-store reads are then slices, not
        gathers -- else None, every store's capacity)."""
        caps = tuple(s.data.shape[1] for lc in cache.layers for s in lc.stores())
        view = cache.layers[0].view if cache.layers else None
        return (rows.numel(), view.start if isinstance(view, slice) else None, caps)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: ModelCache, rows: Rows = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != 1:
            raise ValueError(f"a decode step takes ids of shape [batch, 1], got {tuple(ids.shape)}")
        rows = cache.rows_of(rows)
        if rows.numel() != ids.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} rows but {rows.numel()} cache rows were given")
        positions = cache.begin(rows, 1)  # grows the stores (eager), binds the rows
        key = self.bucket(cache, rows)
        t0 = time.perf_counter() if key not in self.compile_seconds else None
        logits = self.fn(ids, positions, cache)
        if t0 is not None:
            self.compile_seconds[key] = time.perf_counter() - t0
        cache.advance(rows, 1)
        return logits
