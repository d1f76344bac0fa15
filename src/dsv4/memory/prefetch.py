"""Background row prefetch (docs/spec.md section 4: Engram row ids depend only on the
input ids, so the rows of the next batch / decode step are read while the current one computes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .stores import Rows, RowStore, _as_rows, _check_values

__all__ = ["PrefetchHandle", "Prefetcher"]


class PrefetchHandle:
    __slots__ = ("bounds", "futures", "overrides", "rows", "submitted")

    def __init__(self, rows: torch.Tensor, futures: list, bounds: list):
        self.rows, self.futures, self.bounds = rows, futures, bounds
        self.overrides = []  # (rows, values) written after submission, in order
        self.submitted = time.perf_counter()

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


class Prefetcher(RowStore):
    """prefetch(rows) -> handle starts store.read(rows) on a worker thread (split over `workers`
    threads); get(handle) -> [N, dim] blocks until ready. Also a RowStore: writes routed through
    it (e.g. SparseRowAdam(prefetcher, ...)) are applied to pending handles, so a prefetched row
    written before get() is returned with its new value."""

    def __init__(self, store: RowStore, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.store, self.workers = store, workers
        self.n_rows, self.dim = store.n_rows, store.dim
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="row-prefetch")
        self._pending: set[PrefetchHandle] = set()
        self._lock = threading.Lock()
        self._stats = {"prefetches": 0, "gets": 0, "rows": 0, "wait_s": 0.0, "read_s": 0.0, "ready_at_get": 0}

    @property
    def stats(self) -> dict:
        """prefetches, gets, rows, wait_s (time blocked in get), read_s (worker read time),
        ready_at_get (gets that did not block)."""
        return dict(self._stats)

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.store.read_background(rows)  # a disk-backed store issues every read at once, then waits
        dt = time.perf_counter() - t0
        with self._lock:
            self._stats["read_s"] += dt
        return out

    def prefetch(self, rows: Rows) -> PrefetchHandle:
        rows = _as_rows(rows, self.n_rows)
        n = rows.numel()
        parts = self.workers if n >= 4096 * self.workers else 1
        bounds = [n * i // parts for i in range(parts + 1)]
        futures = [self._pool.submit(self._read, rows[bounds[i] : bounds[i + 1]]) for i in range(parts)]
        h = PrefetchHandle(rows, futures, bounds)
        with self._lock:
            self._pending.add(h)
            self._stats["prefetches"] += 1
            self._stats["rows"] += n
        return h

    def get(self, handle: PrefetchHandle) -> torch.Tensor:
        ready = handle.done()
        t0 = time.perf_counter()
        parts = [f.result() for f in handle.futures]
        waited = time.perf_counter() - t0
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        with self._lock:
            self._pending.discard(handle)
            overrides, handle.overrides = handle.overrides, []
            self._stats["gets"] += 1
            self._stats["wait_s"] += waited
            self._stats["ready_at_get"] += int(ready)
        if overrides and out.numel():
            r = handle.rows.numpy()
            for w_rows, w_vals in overrides:
                wr = w_rows.numpy()
                order = np.argsort(wr)
                ws = wr[order]
                pos = np.minimum(np.searchsorted(ws, r), ws.size - 1)
                hit = ws[pos] == r
                if hit.any():
                    src = torch.from_numpy(order[pos[hit]])
                    out.index_copy_(0, torch.from_numpy(np.nonzero(hit)[0]), w_vals.index_select(0, src))
        return out

    def read(self, rows: Rows) -> torch.Tensor:
        return self.store.read(rows)

    def will_need(self, rows: Rows) -> None:
        self.store.will_need(rows)

    def run(self, fn: Callable, *args: object) -> Future:
        """Run fn(*args) on the prefetch worker (e.g. read-ahead hints for optimiser state); a Future."""
        return self._pool.submit(fn, *args)

    def write(self, rows: Rows, values: torch.Tensor) -> None:
        rows = _as_rows(rows, self.n_rows)
        vals = _check_values(rows, values, self.dim).clone()
        with self._lock:
            self.store.write(rows, vals)
            for h in self._pending:
                h.overrides.append((rows, vals))

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
