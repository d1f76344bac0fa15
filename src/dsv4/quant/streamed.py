"""Routed experts streamed from the checkpoint shards: models larger than RAM (docs/inference.md).

A V4 model's routed experts are almost all of its bytes, and a decode token uses k of the E experts of
a layer. `StreamedExperts` holds none of them: a forward reads the experts its tokens route to from the
safetensors shards (one os.pread per tensor of the byte range the shard's header gives: MXFP4 codes and
scales as shipped, or plain weights) into an LRU cache bounded in bytes (`--max-resident-gb`), then
multiplies them exactly as `dsv4.quant.execution.MXFP4Experts` does, so a streamed model computes what
a kept one computes (tests compare the logits). The dense parts and the KV cache stay
resident.

Read-ahead. The router of layer l + 1 reads layer l's output, so its experts are known only after layer
l. `stream_experts` guesses them one layer early: when the MoE of layer l starts, the router of layer
l + 1 is applied to layer l's MoE input (for hash-routed layers the token table gives the exact
experts), and a worker thread reads the guessed experts while layer l computes (pread releases the
GIL). `ExpertStore.stats` counts how many of the experts a layer used had been guessed (the overlap that
is possible), cache hits, and bytes read; benchmarks/streamed_experts.py reports them.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from dsv4.model.moe import Experts
from dsv4.quant.execution import MXFP4Matrix
from dsv4.quant.formats import dequant_mxfp4

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
}
WEIGHTS = ("w1", "w2", "w3")


def tensor_ranges(path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, file offset, bytes) of every tensor of a safetensors file, from its header:
    an 8-byte little-endian length, then JSON giving each tensor's data_offsets from the header's end."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, meta in header.items():
        if name != "__metadata__":
            begin, end = meta["data_offsets"]
            out[name] = (_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin)
    return out


Entry = tuple[tuple[torch.Tensor, torch.Tensor | None], ...]  # per w1/w2/w3: (codes or weight, scale or None)


class ExpertStore:
    """The routed experts of a checkpoint directory, read on use into an LRU cache of at most max_bytes.

    Keys are (Experts module name, expert id); an entry holds w1, w2, w3 as stored (MXFP4: packed codes and
    e8m0 scales). One worker thread serves read_ahead."""

    def __init__(self, directory: str | Path, weight_map: dict[str, str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the expert cache needs a positive size, got {max_bytes} bytes")
        self.dir, self.where, self.max_bytes = Path(directory), weight_map, max_bytes
        self._ranges: dict[str, dict] = {}
        self._fds: dict[str, int] = {}
        self.cache: OrderedDict[tuple[str, int], Entry] = OrderedDict()
        self.bytes = 0
        self._pending: dict[tuple[str, int], Future] = {}
        self._guess: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dsv4-experts")
        self.stats: Counter = Counter()
        self.ahead = True  # read_ahead starts reads (False: guesses are still counted, nothing is read early)

    # ------------------------------------------------------------------ reads
    def _locate(self, name: str) -> tuple[int, tuple]:
        shard = self.where[name]
        if shard not in self._fds:
            self._ranges[shard] = tensor_ranges(self.dir / shard)
            self._fds[shard] = os.open(self.dir / shard, os.O_RDONLY)
        return self._fds[shard], self._ranges[shard][name]

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor straight from its shard's byte range (no mapping, no page of it stays in this process)."""
        fd, (dtype, shape, offset, nbytes) = self._locate(name)
        buf = bytearray(nbytes)
        got = os.preadv(fd, [buf], offset)
        if got != nbytes:
            raise OSError(f"{self.dir / self.where[name]}: short read of {name} ({got} of {nbytes} bytes)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if nbytes else torch.empty(shape)

    def _read(self, key: tuple[str, int]) -> Entry:
        t0 = time.perf_counter()
        prefix = f"{key[0]}.{key[1]}"
        entry = []
        for w in WEIGHTS:
            scale = f"{prefix}.{w}.scale"
            entry.append(
                (self.read_tensor(f"{prefix}.{w}.weight"), self.read_tensor(scale) if scale in self.where else None)
            )
        with self._lock:
            self.stats["read_bytes"] += _nbytes(tuple(entry))
            self.stats["reads"] += 1
            self.stats["read_seconds"] += time.perf_counter() - t0
        return tuple(entry)

    def _insert(self, key: tuple[str, int], entry: Entry) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if key in self.cache:
                return
            self.cache[key] = entry
            self.bytes += _nbytes(entry)
            while self.bytes > self.max_bytes and len(self.cache) > 1:
                _, old = self.cache.popitem(last=False)
                self.bytes -= _nbytes(old)
                self.stats["evictions"] += 1

    def _fetch_ahead(self, key: tuple[str, int]) -> Entry:
        entry = self._read(key)
        self._insert(key, entry)
        return entry

    def get(self, module: str, experts: list[int]) -> list[Entry]:
        """The entries of `experts` of one Experts module: cached, being read ahead (waited for), or read now."""
        out = []
        guessed = self._guess.pop(module, None)
        if guessed is not None:
            self.stats["guessed_used"] += len(guessed.intersection(experts))
            self.stats["used_after_guess"] += len(experts)
        for e in experts:
            key = (module, e)
            with self._lock:
                entry = self.cache.get(key)
                if entry is not None:
                    self.cache.move_to_end(key)
                fut = self._pending.get(key) if entry is None else None
            if entry is not None:
                self.stats["hits"] += 1
            elif fut is not None:
                self.stats["ahead_waits"] += 1
                entry = fut.result()
            else:
                self.stats["misses"] += 1
                entry = self._read(key)
                self._insert(key, entry)
            out.append(entry)
        return out

    def read_ahead(self, module: str, experts: list[int]) -> None:
        """Start reading the experts of `module` a coming forward is guessed to use (not cached, not pending)."""
        self._guess[module] = set(experts)
        if not self.ahead:
            return
        with self._lock:
            todo = [(module, e) for e in experts if (module, e) not in self.cache and (module, e) not in self._pending]
            for key in todo:
                self._pending[key] = self._pool.submit(self._fetch_ahead, key)
        self.stats["ahead_reads"] += len(todo)

    def drain(self) -> None:
        """Wait for every read-ahead in flight (benchmarks, shutdown)."""
        for fut in list(self._pending.values()):
            fut.result()

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _nbytes(entry: Entry) -> int:
    return sum(t.nbytes for pair in entry for t in pair if t is not None)


class StreamedStack:
    """One of w1 / w2 / w3 of a StreamedExperts, indexable like the stacked weight: an expert id, or a tensor
    of ids (any shape) -> the dequantised experts; `.full()` -> all of them."""

    def __init__(self, owner: StreamedExperts, j: int) -> None:
        self.owner, self.j = owner, j

    def _mat(self, entry: Entry) -> torch.Tensor:
        w, scale = entry[self.j]
        if scale is None:
            return w.to(self.owner.dtype)
        return dequant_mxfp4(w, scale, dtype=self.owner.dtype)

    def __getitem__(self, idx):
        o = self.owner
        if isinstance(idx, int):  # one expert: multiplied straight from its codes (MXFP4Matrix)
            w, scale = o.store.get(o.key, [idx])[0][self.j]
            return w.to(o.dtype) if scale is None else MXFP4Matrix(w, scale, o.dtype)
        uniq, inv = idx.unique(return_inverse=True)
        mats = torch.stack([self._mat(e) for e in o.store.get(o.key, uniq.tolist())])
        return mats[inv]

    def full(self) -> torch.Tensor:
        return torch.stack([self._mat(e) for e in self.owner.store.get(self.owner.key, list(range(self.owner.n)))])


class StreamedExperts(Experts):
    """A drop-in for model.moe.Experts whose weights stay in the checkpoint shards (read via `store`)."""

    compile_safe = False  # reads happen in Python: torch.compile cannot trace them

    def __init__(self, n: int, limit: float, store: ExpertStore, key: str) -> None:
        nn.Module.__init__(self)
        self.n, self.limit, self.weight_transform, self.act_transform = n, limit, None, None
        self.gather_experts = False  # the grouped loop reads each used expert once
        self.store, self.key, self.dtype = store, key, torch.float32

    def weights(self):  # type: ignore[override]  # lazy stacks, indexable like the weight tensors
        return tuple(StreamedStack(self, j) for j in range(3))

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.dtype))
        if probe.device.type != "cpu":
            raise ValueError("streamed experts run on the CPU (their shards are read into host memory)")
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self


def stream_experts(
    model: nn.Module, directory: str | Path, weight_map: dict[str, str], storage: dict[str, str], max_bytes: int
) -> dict[str, str]:
    """Swap every routed Experts module of `model` (built on the meta device, or real) for a StreamedExperts
    over one shared ExpertStore, and chain the read-ahead hooks of consecutive MoE layers. storage: name ->
    "plain" / "fp8" / "mxfp4" (dsv4.convert.official.check_layout); returns the part still to load."""
    store = ExpertStore(directory, weight_map, max_bytes)
    left = dict(storage)
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if not isinstance(mod, Experts) or isinstance(mod, StreamedExperts):
            continue
        keys = [f"{name}.{e}.{w}.weight" for e in range(mod.n) for w in WEIGHTS]
        if any(storage.get(k) not in ("mxfp4", "plain") for k in keys):
            raise ValueError(f"{name}: streamed experts must be stored MXFP4 or plain, found {storage.get(keys[0])}")
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent], leaf, StreamedExperts(mod.n, mod.limit, store, name))
        for k in keys:
            del left[k]
    _chain_read_ahead(model, store)
    model.expert_store = store  # the owner of the shards' file handles (benchmarks read its stats)
    return left


def _chain_read_ahead(model: nn.Module, store: ExpertStore) -> None:
    """A forward pre-hook on each MoE of the main layers: guess the next layer's experts from this layer's MoE
    input and start reading them."""
    moes = [blk.ffn for blk in model.layers]
    for moe, nxt in itertools.pairwise(moes):
        if not isinstance(nxt.experts, StreamedExperts):
            continue

        def hook(_mod, args, kwargs, nxt=nxt):
            x = args[0] if args else kwargs["x"]
            ids = args[1] if len(args) > 1 else kwargs.get("input_ids")
            with torch.no_grad():
                _w, idx, _s = nxt.gate(x.reshape(-1, x.shape[-1]), ids)
            store.read_ahead(nxt.experts.key, idx.unique().tolist())

        moe.register_forward_pre_hook(hook, with_kwargs=True)
