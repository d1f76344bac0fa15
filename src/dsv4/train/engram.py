"""Engram tables in training (docs/spec.md section 4): storage, prefetch, sparse row-wise Adam, checkpoints.

Per Engram layer: the table lives in a row store (RAM, or a memory-mapped file under
`engram_dir`), optionally behind a hot-row cache (CLOCK); a background prefetcher reads the rows of the
NEXT batch while the current step computes (rows depend on token ids only); after backward, the
touched rows get SparseRowAdam with lr = engram_lr_mult x the model's current lr and no weight decay
(Engram paper; lazy per-row Adam, see dsv4.memory.row_adam). Checkpoints hold each table and its
optimiser state as chunked safetensors (dsv4.memory.checkpoint) inside the checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.memory import (
    HotRowCache,
    MmapStore,
    Prefetcher,
    RamStore,
    SparseRowAdam,
    coalesce_rows,
    load_store,
    save_store,
)
from dsv4.model.transformer import Transformer
from dsv4.parallel import dist as pdist


class EngramTraining:
    """The Engram tables of a model in training: their stores, prefetchers and sparse row Adam."""

    def __init__(
        self,
        model: Transformer,
        store: str = "ram",
        table_dir: str | Path | None = None,
        prefetch: bool = True,
        hot_rows: int = 0,
        lr_mult: float = 5.0,
        seed: int = 0,
    ):
        if store not in ("ram", "mmap"):
            raise ValueError(f"engram_store must be 'ram' or 'mmap', got {store!r}")
        if store == "mmap" and table_dir is None:
            raise ValueError("engram_store=mmap needs engram_dir (where the table files live)")
        self.model, self.lr_mult = model, lr_mult
        self.layers = model.engrams()
        self.base, self.front, self.opt, self.pre = {}, {}, {}, {}
        std = model.cfg.initializer_range
        for i, eng in self.layers.items():
            n, dim = eng.table.n_rows, eng.table.dim
            if store == "mmap":
                d = Path(table_dir) / f"layer{i}"
                d.mkdir(parents=True, exist_ok=True)
                path = d / "table.npy"
                base = (
                    MmapStore.open(path)
                    if path.exists()
                    else MmapStore.create(path, n, dim, init_std=std, seed=seed * 1000 + i)
                )
                state_dir = d / "adam"
            else:
                base, state_dir = RamStore(n, dim, init_std=std, seed=seed * 1000 + i), None
            self.base[i] = base
            front = HotRowCache(base, hot_rows) if hot_rows else base
            if prefetch:
                self.pre[i] = front = Prefetcher(front)
            self.front[i] = front
            eng.set_table(front)
            self.opt[i] = SparseRowAdam(front, lr=lr_mult, state_dir=state_dir)
        self._handles = None

    def prefetch(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> None:
        """Start reading the rows a batch will need (call with the NEXT batch before the current step)."""
        if not self.pre:
            return
        rows = self.model.engram_rows(input_ids, segment_ids)
        for i in self.pre:  # the same rows get the optimiser step after backward: read their state ahead
            self.pre[i].run(self.opt[i].will_need, rows[i])
        self._handles = {i: (rows[i], self.pre[i].prefetch(rows[i])) for i in self.pre}

    def take_prefetched(self) -> dict | None:
        """{layer: (rows, values)} for forward(engram_prefetched=...), or None."""
        if self._handles is None:
            return None
        out = {i: (rows, self.pre[i].get(h)) for i, (rows, h) in self._handles.items()}
        self._handles = None
        return out

    def step(self, lr: float, apply: bool = True) -> dict:
        """Sparse Adam on the rows touched since the last call (grads are always collected).

        In a torchrun job every rank holds a whole replica of each table: the row gradients of all ranks
        are gathered and averaged (the job's mean loss), and every rank applies the same update, so the
        replicas stay equal."""
        grads = self.model.engram_table_grads()
        world = pdist.env_from_environ().world if torch.distributed.is_initialized() else 1
        n = 0
        for i, (rows, g) in grads.items():
            if world > 1 and apply:
                rows, g = pdist.all_gather_rows(rows, g)
                g = g / world
            if not apply or rows.numel() == 0:
                continue
            rows, g = coalesce_rows(rows, g)
            self.opt[i].lr = self.lr_mult * lr
            self.opt[i].step(rows, g)
            n += rows.numel()
        return {"engram_rows_updated": n}

    def stats(self) -> dict:
        out = {}
        for i, f in self.front.items():
            cache = f.store if isinstance(f, Prefetcher) else f
            if isinstance(cache, HotRowCache):
                out[f"engram{i}_hit_rate"] = cache.hit_rate
            if i in self.pre:
                s = self.pre[i].stats
                out[f"engram{i}_wait_s"] = s["wait_s"]
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: Path) -> None:
        for i, f in self.front.items():
            f.flush()
            save_store(self.base[i], Path(ckpt_dir) / "engram" / f"layer{i}", states=self.opt[i])

    def load(self, ckpt_dir: Path) -> None:
        for i in self.front:
            d = Path(ckpt_dir) / "engram" / f"layer{i}"
            if not d.exists():
                raise FileNotFoundError(f"checkpoint {ckpt_dir} has no Engram table for layer {i} ({d})")
            load_store(d, into=self.base[i], states=self.opt[i])
            cache = self.front[i].store if isinstance(self.front[i], Prefetcher) else self.front[i]
            if isinstance(cache, HotRowCache):
                cache.clear()
