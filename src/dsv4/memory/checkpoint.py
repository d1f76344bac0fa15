"""Chunked safetensors checkpoints of row stores (Engram tables, docs/spec.md section 4):
each store is written as files of at most chunk_rows rows ("rows" tensor, crc32 recorded) plus
index.json; the directory appears atomically (written to a temp dir, then renamed)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .stores import RamStore, RowStore

__all__ = ["INDEX_NAME", "load_store", "save_store"]

INDEX_NAME = "index.json"
FORMAT = "dsv4-rowstore"


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().numpy().view("uint8").data) & 0xFFFFFFFF


def _states_of(states) -> dict:
    if states is None:
        return {}
    if hasattr(states, "state_stores"):
        return states.state_stores()
    return dict(states)


def _save_one(store: RowStore, name: str, tmp: Path, chunk_rows: int) -> dict:
    files = []
    for i, start in enumerate(range(0, store.n_rows, chunk_rows)):
        stop = min(start + chunk_rows, store.n_rows)
        t = store.read_range(start, stop)
        fname = f"{name}-{i:05d}.safetensors"
        save_file({"rows": t}, str(tmp / fname), metadata={"start": str(start), "stop": str(stop)})
        files.append({"file": fname, "start": start, "stop": stop, "crc32": _crc(t)})
    return {"n_rows": store.n_rows, "dim": store.dim, "dtype": "float32", "chunk_rows": chunk_rows, "files": files}


def save_store(store: RowStore, directory: str | Path, chunk_rows: int = 1 << 20, states: object = None) -> Path:
    """Write `store` as "table" and each optimizer state (a dict name -> RowStore, or an object
    with state_stores(), e.g. SparseRowAdam) under its name; replaces an existing directory."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stores = {"table": store, **_states_of(states)}
        index = {
            "format": FORMAT,
            "version": 1,
            "stores": {n: _save_one(s, n, tmp, chunk_rows) for n, s in stores.items()},
        }
        with open(tmp / INDEX_NAME, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _load_one(entry: dict, name: str, into: RowStore, directory: Path) -> None:
    if (entry["n_rows"], entry["dim"]) != (into.n_rows, into.dim):
        raise ValueError(
            f"{directory}: store {name!r} has shape ({entry['n_rows']}, {entry['dim']}), "
            f"target has ({into.n_rows}, {into.dim})"
        )
    covered = 0
    for fe in entry["files"]:
        path = directory / fe["file"]
        if not path.exists():
            raise FileNotFoundError(f"missing checkpoint chunk {path} (rows [{fe['start']}, {fe['stop']}) of {name!r})")
        try:
            t = load_file(str(path))["rows"]
        except Exception as e:  # safetensors raises SafetensorError or others on bad bytes
            raise ValueError(f"corrupt checkpoint chunk {path}: {e}") from e
        n = fe["stop"] - fe["start"]
        if fe["start"] != covered or tuple(t.shape) != (n, entry["dim"]) or t.dtype != torch.float32:
            raise ValueError(
                f"corrupt checkpoint chunk {path}: got {t.dtype} {tuple(t.shape)}, "
                f"expected float32 ({n}, {entry['dim']}) at row {covered}"
            )
        if _crc(t) != fe["crc32"]:
            raise ValueError(f"corrupt checkpoint chunk {path}: crc32 mismatch")
        into.write_range(fe["start"], t)
        covered = fe["stop"]
    if covered != entry["n_rows"]:
        raise ValueError(f"{directory}: store {name!r} chunks cover {covered} of {entry['n_rows']} rows")
    into.flush()


def load_store(directory: str | Path, into: RowStore | None = None, states: object = None) -> RowStore:
    """Restore the table into `into` (RAM or mmap; a new RamStore when None) and the named
    optimizer states into `states` (dict or object with state_stores()); returns the table store."""
    directory = Path(directory)
    ipath = directory / INDEX_NAME
    if not ipath.exists():
        raise FileNotFoundError(f"no {INDEX_NAME} in {directory}")
    try:
        index = json.loads(ipath.read_text())
        entries = index["stores"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt checkpoint index {ipath}: {e}") from e
    if index.get("format") != FORMAT:
        raise ValueError(f"{ipath}: not a {FORMAT} checkpoint")
    if into is None:
        e = entries["table"]
        into = RamStore(e["n_rows"], e["dim"])
    _load_one(entries["table"], "table", into, directory)
    for name, s in _states_of(states).items():
        if name not in entries:
            raise KeyError(f"{directory}: checkpoint has no state {name!r} (has {sorted(entries)})")
        _load_one(entries[name], name, s, directory)
    return into
