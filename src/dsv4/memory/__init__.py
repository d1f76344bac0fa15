"""Engram row memory (spec section 4, mapped in docs/architecture.md): row stores (RAM / mmap / hot-row cache),
background prefetch, sparse row-wise Adam and chunked safetensors checkpoints."""

from .checkpoint import load_store, save_store
from .prefetch import PrefetchHandle, Prefetcher
from .row_adam import SparseRowAdam, coalesce_rows
from .stores import (INIT_CHUNK_ROWS, HotRowCache, MmapStore, RamStore, RowStore, init_rows,
                     zeros_like)

__all__ = ["INIT_CHUNK_ROWS", "RowStore", "RamStore", "MmapStore", "HotRowCache", "init_rows",
           "zeros_like", "Prefetcher", "PrefetchHandle", "SparseRowAdam", "coalesce_rows",
           "save_store", "load_store"]
