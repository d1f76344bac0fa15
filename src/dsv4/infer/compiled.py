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

The eager step (model(ids, cache=...), or Transformer.decode_logits uncompiled) is the reference
twin; tests compare the two.
"""
from __future__ import annotations

import time

import torch
import torch._dynamo


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
        if next(model.parameters()).device.type == "cpu":
            opts["cpp_wrapper"] = True   # the kernel-launching wrapper in C++ too: ~15% off a tiny step
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
