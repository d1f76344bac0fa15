"""Row stores for Engram tables (docs/spec.md section 4): fp32 rows addressed by
global row id, held in RAM (RamStore), in a memory-mapped .npy file (MmapStore), or behind
a cache of hot rows (HotRowCache)."""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# row ids: a 1-D integer tensor, array or sequence (_as_rows makes an int64 CPU tensor of it)
Rows = torch.Tensor | np.ndarray | Sequence[int]

__all__ = [
    "INIT_CHUNK_ROWS",
    "HotRowCache",
    "MmapStore",
    "RamStore",
    "RowStore",
    "init_rows",
    "zeros_like",
]

# Fixed init chunk: the values of a row depend only on (seed, n_rows, dim, std, row id).
INIT_CHUNK_ROWS = 1 << 14
_MASK64 = (1 << 64) - 1


def _chunk_seed(seed: int, chunk: int) -> int:
    """splitmix64(seed * 2^32 + chunk), reduced to 63 bits for torch.Generator.manual_seed."""
    z = ((int(seed) << 32) + int(chunk) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def init_rows(n_rows: int, dim: int, std: float, seed: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a N(0, std^2) table: chunk c (INIT_CHUNK_ROWS rows) is
    std * randn(chunk_len, dim) from a Generator seeded with splitmix64(seed, c), so any backend
    reproduces the same bits without materialising the table."""
    if not 0 <= start <= stop <= n_rows:
        raise IndexError(f"init_rows range [{start}, {stop}) outside [0, {n_rows})")
    out = torch.zeros(stop - start, dim, dtype=torch.float32)
    if std == 0.0 or stop == start:
        return out
    gen = torch.Generator()
    for c in range(start // INIT_CHUNK_ROWS, (stop - 1) // INIT_CHUNK_ROWS + 1):
        c0 = c * INIT_CHUNK_ROWS
        c1 = min(c0 + INIT_CHUNK_ROWS, n_rows)
        gen.manual_seed(_chunk_seed(seed, c))
        block = torch.randn(c1 - c0, dim, generator=gen, dtype=torch.float32).mul_(std)
        lo, hi = max(start, c0), min(stop, c1)
        out[lo - start : hi - start] = block[lo - c0 : hi - c0]
    return out


def _as_rows(rows, n_rows: int) -> torch.Tensor:
    """Validate row ids: 1-D integer ids in [0, n_rows) -> int64 CPU tensor."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.as_tensor(np.asarray(rows))
    if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.is_complex():
        raise ValueError(f"row ids must be integers, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"row ids must be 1-D, got shape {tuple(rows.shape)}")
    rows = rows.to(device="cpu", dtype=torch.int64)
    if rows.numel():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= n_rows:
            raise IndexError(f"row ids must lie in [0, {n_rows}); got min {lo}, max {hi}")
    return rows


def _check_values(rows: torch.Tensor, values: torch.Tensor, dim: int, unique: bool = True) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(np.asarray(values))
    if values.dim() != 2 or values.shape[1] != dim or values.shape[0] != rows.numel():
        raise ValueError(f"values must have shape [{rows.numel()}, {dim}] (rows x dim), got {tuple(values.shape)}")
    if unique and rows.numel() > 1 and torch.unique(rows).numel() != rows.numel():
        raise ValueError("write() needs unique row ids (sum duplicate gradients first)")
    return values.detach().to(device="cpu", dtype=torch.float32)


class RowStore:
    """Interface: n_rows x dim float32 rows; read(rows)->[N, dim] copy; write(unique rows, values); flush()."""

    n_rows: int
    dim: int

    def read(self, rows: Rows) -> torch.Tensor:
        raise NotImplementedError

    def write(self, rows: Rows, values: torch.Tensor) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def will_need(self, rows: Rows) -> None:
        """Hint that `rows` will be read soon (a disk-backed store starts reading them); no-op here."""

    def read_background(self, rows: Rows) -> torch.Tensor:
        """read() for a background thread: no intra-op-parallel torch op (from a second thread it would
        start a second OpenMP team next to the model's), and a disk-backed store waits for its I/O
        without holding the GIL. Same values as read()."""
        return self.read(rows)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a new [stop-start, dim] tensor."""
        return self.read(torch.arange(start, stop, dtype=torch.int64))

    def write_range(self, start: int, values: torch.Tensor) -> None:
        self.write(torch.arange(start, start + values.shape[0], dtype=torch.int64), values)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * 4

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_rows={self.n_rows}, dim={self.dim})"


class RamStore(RowStore):
    """Rows in a host fp32 tensor [n_rows, dim]."""

    def __init__(
        self,
        n_rows: int,
        dim: int,
        init_std: float = 0.0,
        seed: int = 0,
        *,
        _data: torch.Tensor | None = None,
    ):
        if _data is None:
            if n_rows <= 0 or dim <= 0:
                raise ValueError(f"n_rows and dim must be positive, got {n_rows}, {dim}")
            _data = torch.zeros(n_rows, dim, dtype=torch.float32)
            if init_std:
                for s in range(0, n_rows, INIT_CHUNK_ROWS * 16):
                    e = min(s + INIT_CHUNK_ROWS * 16, n_rows)
                    _data[s:e] = init_rows(n_rows, dim, init_std, seed, s, e)
        self.data = _data
        self.n_rows, self.dim = int(_data.shape[0]), int(_data.shape[1])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> RamStore:
        """Wrap a 2-D tensor; shares its storage when it is already contiguous fp32 on CPU."""
        if t.dim() != 2:
            raise ValueError(f"expected a 2-D [n_rows, dim] tensor, got shape {tuple(t.shape)}")
        return cls(0, 0, _data=t.detach().to(device="cpu", dtype=torch.float32).contiguous())

    def read(self, rows: Rows) -> torch.Tensor:
        return self.data.index_select(0, _as_rows(rows, self.n_rows))

    def read_background(self, rows: Rows) -> torch.Tensor:
        return torch.from_numpy(self.data.numpy()[_as_rows(rows, self.n_rows).numpy()])  # numpy: one thread

    def write(self, rows: Rows, values: torch.Tensor) -> None:
        rows = _as_rows(rows, self.n_rows)
        self.data.index_copy_(0, rows, _check_values(rows, values, self.dim))

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop].clone()

    def write_range(self, start: int, values: torch.Tensor) -> None:
        n = values.shape[0]
        if start < 0 or start + n > self.n_rows:
            raise IndexError(f"rows [{start}, {start + n}) outside [0, {self.n_rows})")
        rows = torch.arange(start, start + n, dtype=torch.int64)
        self.data[start : start + n] = _check_values(rows, values, self.dim, unique=False)


class MmapStore(RowStore):
    """Rows in a float32 [n_rows, dim] .npy file opened as a numpy memmap; reads touch only
    the requested rows (sorted unique gather), writes go to the page cache until flush().
    The mapping is advised MADV_RANDOM: hashed rows are scattered, and the kernel's default
    read-around (up to the whole file on the first faults) would read far more than asked.
    will_need(rows) starts asynchronous reads of the rows' pages (posix_fadvise WILLNEED)."""

    PAGE = mmap.PAGESIZE

    def __init__(self, path: str | Path, mm: np.memmap, mode: str):
        self.path, self.mm, self.mode = Path(path), mm, mode
        self.n_rows, self.dim = int(mm.shape[0]), int(mm.shape[1])
        self._fd = None
        raw = getattr(mm, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_RANDOM"):
            raw.madvise(mmap.MADV_RANDOM)

    def will_need(self, rows: Rows) -> None:
        r = np.unique(_as_rows(rows, self.n_rows).numpy())
        if r.size == 0 or not hasattr(os, "posix_fadvise"):
            return
        row_bytes = self.dim * 4
        first = (self.mm.offset + r * row_bytes) // self.PAGE
        last = (self.mm.offset + (r + 1) * row_bytes - 1) // self.PAGE
        pages = np.unique(np.concatenate([first, last]))
        run_start = np.concatenate([[True], np.diff(pages) != 1])  # coalesce consecutive pages
        starts, ends = pages[run_start], np.append(pages[np.nonzero(run_start)[0][1:] - 1], pages[-1])
        fd = self._file()
        for a, b in zip(starts.tolist(), ends.tolist()):  # each call releases the GIL
            os.posix_fadvise(fd, a * self.PAGE, (b - a + 1) * self.PAGE, os.POSIX_FADV_WILLNEED)

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_background(self, rows: Rows) -> torch.Tensor:
        """will_need for every row first (the disk works on all of them at once), then one pread per
        unique row (each releases the GIL while it waits; the page cache is shared with the mapping, so
        the values are those of read())."""
        r = _as_rows(rows, self.n_rows).numpy()
        uniq, inv = np.unique(r, return_inverse=True)
        self.will_need(torch.from_numpy(uniq))
        out = np.empty((uniq.size, self.dim), dtype=np.float32)
        fd, row_bytes, base = self._file(), self.dim * 4, self.mm.offset
        view = memoryview(out).cast("B")
        for i, row in enumerate(uniq.tolist()):
            o = i * row_bytes
            if os.preadv(fd, [view[o : o + row_bytes]], base + row * row_bytes) != row_bytes:
                raise OSError(f"{self.path}: short read at row {row}")
        res = out if uniq.size == r.size and np.array_equal(uniq, r) else out[inv.reshape(-1)]
        return torch.from_numpy(np.ascontiguousarray(res))

    @classmethod
    def create(
        cls, path: str | Path, n_rows: int, dim: int, init_std: float = 0.0, seed: int = 0, chunk_rows: int = 1 << 16
    ) -> MmapStore:
        """New file with init_rows values (bitwise equal to RamStore(n_rows, dim, init_std, seed))."""
        if n_rows <= 0 or dim <= 0:
            raise ValueError(f"n_rows and dim must be positive, got {n_rows}, {dim}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        if init_std:
            for s in range(0, n_rows, chunk_rows):
                e = min(s + chunk_rows, n_rows)
                mm[s:e] = init_rows(n_rows, dim, init_std, seed, s, e).numpy()
        mm.flush()
        return cls(path, mm, "r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> MmapStore:
        if mode not in ("r+", "r"):
            raise ValueError(f"mode must be 'r+' or 'r', got {mode!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no row store file at {path}")
        mm = np.load(path, mmap_mode=mode)
        if mm.dtype != np.float32 or mm.ndim != 2:
            raise ValueError(f"{path}: expected a float32 2-D array, got {mm.dtype} {mm.shape}")
        return cls(path, mm, mode)

    def read(self, rows: Rows) -> torch.Tensor:
        r = _as_rows(rows, self.n_rows).numpy()
        if r.size == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        uniq, inv = np.unique(r, return_inverse=True)
        block = self.mm[uniq]  # fancy indexing: a new ndarray, rows read in file order
        out = block if uniq.size == r.size and np.array_equal(uniq, r) else block[inv.reshape(-1)]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _check_writable(self):
        if self.mode != "r+":
            raise PermissionError(f"{self.path} is opened read-only (mode {self.mode!r})")

    def write(self, rows: Rows, values: torch.Tensor) -> None:
        self._check_writable()
        rows = _as_rows(rows, self.n_rows)
        vals = _check_values(rows, values, self.dim)
        r = rows.numpy()
        order = np.argsort(r, kind="stable")
        self.mm[r[order]] = vals.numpy()[order]

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.mm[start:stop], dtype=np.float32))

    def write_range(self, start: int, values: torch.Tensor) -> None:
        self._check_writable()
        n = values.shape[0]
        if start < 0 or start + n > self.n_rows:
            raise IndexError(f"rows [{start}, {start + n}) outside [0, {self.n_rows})")
        rows = torch.arange(start, start + n, dtype=torch.int64)
        self.mm[start : start + n] = _check_values(rows, values, self.dim, unique=False).numpy()

    def flush(self) -> None:
        if self.mode == "r+":
            self.mm.flush()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        del self.mm

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"MmapStore({str(self.path)!r}, n_rows={self.n_rows}, dim={self.dim}, mode={self.mode!r})"


class HotRowCache(RowStore):
    """Up to capacity_rows rows of `store` in RAM, write-through, CLOCK (second-chance) eviction.
    A dict maps row -> slot, so a call costs O(its own rows), never O(capacity); a hit sets the
    slot's reference bit, the clock hand evicts slots whose bit is clear and clears the bits it passes.
    hits/misses count requested ids (with repeats) found / not found in the cache at call start;
    store_rows_read counts rows fetched from the store."""

    def __init__(self, store: RowStore, capacity_rows: int):
        if capacity_rows <= 0:
            raise ValueError(f"capacity_rows must be positive, got {capacity_rows}")
        self.store = store
        self.n_rows, self.dim = store.n_rows, store.dim
        self.capacity = int(min(capacity_rows, store.n_rows))
        self.slots = np.zeros((self.capacity, self.dim), dtype=np.float32)  # numpy: no OpenMP team in a worker
        self.slot_row = np.full(self.capacity, -1, dtype=np.int64)  # row id held by each slot
        self.ref = np.zeros(self.capacity, dtype=bool)  # CLOCK reference bits
        self.where: dict[int, int] = {}  # row id -> slot
        self.hand = 0
        self.hits = self.misses = self.store_rows_read = 0
        self._lock = threading.RLock()

    def clear(self) -> None:
        """Forget every cached row (after the store was changed behind the cache, e.g. a checkpoint load)."""
        with self._lock:
            self.slot_row.fill(-1)
            self.ref.fill(False)
            self.where.clear()
            self.hand = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def reset_stats(self) -> None:
        self.hits = self.misses = self.store_rows_read = 0

    def _lookup(self, r: np.ndarray):
        """(found mask, slot per id; -1 where missing)."""
        slot = np.fromiter(map(self.where.get, r.tolist(), itertools.repeat(-1)), dtype=np.int64, count=r.size)
        return slot >= 0, slot

    def will_need(self, rows: Rows) -> None:
        rows = _as_rows(rows, self.n_rows)
        with self._lock:
            found, _ = self._lookup(rows.numpy())
        if not found.all():  # numpy mask: a torch one would start an OpenMP team in the worker thread
            self.store.will_need(torch.from_numpy(rows.numpy()[~found]))

    def read_background(self, rows: Rows) -> torch.Tensor:
        return self.read(rows, background=True)

    def read(self, rows, background: bool = False) -> torch.Tensor:
        rows = _as_rows(rows, self.n_rows)
        r = rows.numpy()
        with self._lock:
            found, slot = self._lookup(r)
            n_hit = int(found.sum())
            self.hits += n_hit
            self.misses += r.size - n_hit
            out = np.empty((r.size, self.dim), dtype=np.float32)
            if n_hit:
                self.ref[slot[found]] = True
                out[found] = self.slots[slot[found]]
            if n_hit < r.size:
                miss_pos = np.nonzero(~found)[0]
                miss_rows, inv = np.unique(r[miss_pos], return_inverse=True)
                miss_t = torch.from_numpy(miss_rows)
                vals = (self.store.read_background(miss_t) if background else self.store.read(miss_t)).numpy()
                self.store_rows_read += miss_rows.size
                out[miss_pos] = vals[inv.reshape(-1)]
                self._insert(miss_rows, vals)
            return torch.from_numpy(out)

    def _victims(self, m: int) -> np.ndarray:
        """m distinct slots chosen by the clock hand (bit clear = victim; passed bits are cleared)."""
        taken, need = [], m
        while need:
            w = min(self.capacity, max(2 * need, 4096))
            idx = (self.hand + np.arange(w)) % self.capacity
            cand = idx[~self.ref[idx]][:need]
            if cand.size == need:  # stop the sweep just after the last victim
                passed = idx[: int((cand[-1] - self.hand) % self.capacity) + 1]
            else:
                passed = idx
            self.ref[passed] = False
            self.ref[cand] = True  # new rows start referenced; not picked twice in this call
            self.hand = int((passed[-1] + 1) % self.capacity)
            taken.append(cand)
            need -= cand.size
        return np.concatenate(taken)

    def _insert(self, new_rows: np.ndarray, vals: np.ndarray) -> None:
        """Put unique uncached rows (at most capacity of them) into slots chosen by the clock."""
        m = min(new_rows.size, self.capacity)
        new_rows, vals = new_rows[:m], vals[:m]
        victims = self._victims(m)
        for old in self.slot_row[victims].tolist():
            if old >= 0:
                del self.where[old]
        self.slot_row[victims] = new_rows
        self.slots[victims] = vals
        self.where.update(zip(new_rows.tolist(), victims.tolist()))

    def write(self, rows: Rows, values: torch.Tensor) -> None:
        rows = _as_rows(rows, self.n_rows)
        vals = _check_values(rows, values, self.dim)
        with self._lock:
            self.store.write(rows, vals)
            found, slot = self._lookup(rows.numpy())
            if found.any():
                self.slots[slot[found]] = vals.numpy()[found]

    def flush(self) -> None:
        self.store.flush()


def zeros_like(store: RowStore, dim: int | None = None, path: str | Path | None = None) -> RowStore:
    """A zero store with the backend of `store` (through wrappers) and n_rows rows of width dim."""
    inner = store
    while not isinstance(inner, (RamStore, MmapStore)) and hasattr(inner, "store"):
        inner = inner.store
    d = store.dim if dim is None else dim
    if isinstance(inner, MmapStore):
        if path is None:
            raise ValueError("an mmap-backed store needs a path for its companion store")
        return MmapStore.create(path, store.n_rows, d)
    return RamStore(store.n_rows, d)
