"""Engram row memory (docs/spec.md section 4): row stores (RAM / mmap / hot-row cache),
background prefetch, sparse row-wise Adam and chunked safetensors checkpoints."""

from .checkpoint import load_store, save_store
from .prefetch import Prefetcher, PrefetchHandle
from .row_adam import SparseRowAdam, coalesce_rows
from .stores import INIT_CHUNK_ROWS, HotRowCache, MmapStore, RamStore, RowStore, init_rows, zeros_like

__all__ = [
    "INIT_CHUNK_ROWS",
    "HotRowCache",
    "MmapStore",
    "PrefetchHandle",
    "Prefetcher",
    "RamStore",
    "RowStore",
    "SparseRowAdam",
    "coalesce_rows",
    "init_rows",
    "load_store",
    "save_store",
    "zeros_like",
]
