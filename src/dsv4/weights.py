"""Safetensors weight IO (never pickle): single files or HF-style shards with an index, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # copies on the CPU: views that share storage (stacked experts split per expert) must be separate
        # tensors, and device tensors are written from host memory
        save_file(
            {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"format": "pt", **(metadata or {})},
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 0) -> None:
    """Write model.safetensors, or shards + model.safetensors.index.json when max_shard_bytes > 0."""
    directory = Path(directory)
    if max_shard_bytes <= 0:
        _atomic_save(state, directory / SINGLE)
        return
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    tmp = directory / (INDEX + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, directory / INDEX)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, or a directory holding model.safetensors or an index + shards."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX).exists():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            out = {}
            for f in files:
                out.update(load_state_dict(path / f))
            return out
        if (path / SINGLE).exists():
            path = path / SINGLE
        else:
            raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}")
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {e}") from None


def save_model(model, directory: str | Path) -> None:
    """config.json + model.safetensors with the official tensor names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), directory)
    model.cfg.to_json(directory / "config.json")


def load_model(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    keep_quantized: bool = False,
    max_resident_gb: float | None = None,
):
    """Build a Transformer from config.json and load its safetensors weights: one model.safetensors or
    shards with an index, plain or in the official FP8 / MXFP4 layout (dequantised). Names and shapes are
    checked before anything is read, with one error listing every problem (dsv4.convert.official); the
    shards are read lazily, one block at a time. The model is built for real, so the buffers no checkpoint
    holds (rope frequencies, canonical token ids, MoE loads) are the model's own; weights land in the fp32
    model unless `dtype` says otherwise. keep_quantized / max_resident_gb: FP8 / MXFP4 weights kept as
    shipped, routed experts streamed from the shards (dsv4.convert.official.load_official)."""
    from dsv4.convert.official import load_official

    if max_resident_gb is not None and not max_resident_gb > 0:
        raise ValueError(f"--max-resident-gb must be a positive number of GB, got {max_resident_gb}")
    cap = None if max_resident_gb is None else int(max_resident_gb * 2**30)
    return load_official(directory, dtype or torch.float32, keep_quantized=keep_quantized, max_resident_bytes=cap)
