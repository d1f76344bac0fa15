"""DeepSeek's shipped checkpoint layout: read lazily, check whole, write back (docs/spec.md section 7).

A directory holds config.json (the official names, which are dsv4's), safetensors shards and
model.safetensors.index.json. Tensor by tensor:
- routed experts `...ffn.experts.E.w{1,2,3}.weight`: MXFP4, e2m1 codes packed two per byte [out, in/2]
  (low nibble = even element) with `.scale` [out, in/32] (e8m0);
- the other 2-D projection weights (attention, compressors, indexers, shared experts, MTP e/h
  projections): FP8 e4m3 with `.scale` per 128 x 128 block (V4.1: 32 x 32) in e8m0 or fp32;
- everything else (embedding, head, norms, router, mHC, sinks, position biases): bf16 or fp32.

Reading goes through `OfficialReader`: the index names each tensor's shard, safetensors maps the shard
into memory and reads a tensor only when asked, so the model is never in memory twice. Before anything
is read, `check_layout` compares every name and shape with the model the config describes and raises
ONE error that lists every missing, unexpected or mis-shaped tensor, each with the expected and found
shape. `load_official` then loads one layer at a time, dequantising as it goes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dsv4.config import ModelConfig
from dsv4.quant.formats import dequant_fp8_block, dequant_mxfp4, quant_fp8_block, quant_mxfp4
from dsv4.weights import INDEX, SINGLE, save_state_dict

FP8_BLOCKS = (128, 32)  # V4: 128 x 128 blocks; V4.1: 32 x 32
MTP_ALIASES = ("embed.weight", "head.weight")  # the official state dict repeats these under mtp.{k}.


class LayoutError(ValueError):
    """A checkpoint whose tensors do not fit its config: every problem, one per line after the first."""


def is_routed_expert(name: str) -> bool:
    return ".ffn.experts." in name and name.endswith(".weight")


def is_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """Stored as FP8 in the official layout: 2-D projection weights other than the embedding, the head, the
    router and the routed experts."""
    if len(shape) != 2 or not name.endswith(".weight") or is_routed_expert(name):
        return False
    return name not in ("embed.weight", "head.weight") and not name.endswith("ffn.gate.weight")


class OfficialReader:
    """Lazy access to a directory of safetensors shards (with an index) or one model.safetensors."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._open: dict[str, object] = {}
        if (self.dir / INDEX).exists():
            self.where = json.loads((self.dir / INDEX).read_text())["weight_map"]
        elif (self.dir / SINGLE).exists():
            self.where = dict.fromkeys(self._file_of(SINGLE).keys(), SINGLE)
        else:
            raise FileNotFoundError(f"no {INDEX} or {SINGLE} in {self.dir}")

    def _file_of(self, shard: str):
        if shard not in self._open:
            path = self.dir / shard
            if not path.exists():
                raise LayoutError(f"{self.dir}: shard {shard} is missing")
            try:
                self._open[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors' own error types for truncated / corrupt files
                raise LayoutError(f"corrupt or unreadable safetensors file {path}: {e}") from None
        return self._open[shard]

    def _file(self, name: str):
        return self._file_of(self.where[name])

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._file(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file(name).get_tensor(name)
        except LayoutError:
            raise
        except Exception as e:
            raise LayoutError(f"corrupt or unreadable tensor {name} in {self.dir / self.where[name]}: {e}") from None


def _fp8_block(shape: tuple[int, int], scale: tuple[int, ...]) -> int | None:
    for b in FP8_BLOCKS:
        if scale == (math.ceil(shape[0] / b), math.ceil(shape[1] / b)):
            return b
    return None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict (official names), with its (dequantised) shape."""
    from dsv4.flops import build_meta_model

    return {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}


def check_layout(reader: OfficialReader, cfg: ModelConfig) -> dict[str, str]:
    """name -> storage ("plain", "fp8", "mxfp4") for every model tensor; raises one LayoutError listing every
    missing, unexpected or mis-shaped tensor (shapes only: nothing is read)."""
    want = expected_shapes(cfg)
    have = set(reader.keys())
    problems, storage = [], {}
    for name, shape in want.items():
        if name not in have:
            problems.append(f"missing {name} (expected {list(shape)})")
            continue
        got, scale = reader.shape(name), name[: -len("weight")] + "scale"
        if scale in have and len(shape) == 2:
            s = reader.shape(scale)
            if got == shape and _fp8_block(shape, s):
                storage[name] = "fp8"
            elif got == (shape[0], shape[1] // 2) and s == (shape[0], shape[1] // 32):
                storage[name] = "mxfp4"
            else:
                problems.append(
                    f"{name}: expected {list(shape)} (FP8, scale {[math.ceil(d / 128) for d in shape]}) or "
                    f"{[shape[0], shape[1] // 2]} (MXFP4, scale {[shape[0], shape[1] // 32]}), "
                    f"found {list(got)} with scale {list(s)}"
                )
        elif got != shape:
            problems.append(f"{name}: expected {list(shape)}, found {list(got)}")
        else:
            storage[name] = "plain"
    known = set(want) | {n[: -len("weight")] + "scale" for n in storage if storage[n] != "plain"}
    aliases = {f"mtp.{k}.{a}" for k in range(cfg.num_nextn_predict_layers) for a in MTP_ALIASES}
    for name in sorted(have - known - aliases):
        problems.append(f"unexpected {name} ({list(reader.shape(name))})")
    if problems:
        raise LayoutError(
            f"{reader.dir}: {len(problems)} tensor(s) do not fit config.json:\n  " + "\n  ".join(problems)
        )
    return storage


def _read(reader: OfficialReader, name: str, storage: str, dtype: torch.dtype) -> torch.Tensor:
    w = reader.get(name)
    if storage == "plain":
        return w.to(dtype)
    scale = reader.get(name[: -len("weight")] + "scale")
    if storage == "mxfp4":
        return dequant_mxfp4(w, scale, dtype=dtype)
    return dequant_fp8_block(w, scale, block=_fp8_block(tuple(w.shape), tuple(scale.shape)) or 128, dtype=dtype)


def _group(name: str) -> str:
    """Tensors loaded together: one block at a time (its experts are stacked on load)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else ""


def load_official(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    keep_quantized: bool = False,
    max_resident_bytes: int | None = None,
):
    """A Transformer from an official-layout directory, checked first, then loaded block by block.
    keep_quantized: FP8 projections and MXFP4 experts stay in their format in memory and are dequantised
    at matmul time (dsv4.quant.execution); the other weights load in `dtype`. max_resident_bytes: the
    routed experts stay in the shards and are read on use into a cache of at most that many bytes
    (dsv4.quant.streamed). The model is built on the meta device and only what is loaded is allocated, so
    nothing is held twice and streamed experts are never allocated at all."""
    from dsv4.model import build_model

    directory = Path(directory)
    cfg = ModelConfig.from_json(directory / "config.json")
    if cfg.is_v32:  # the V3.2 family ships Hub names with FP8 experts (dsv4.convert.v32)
        from dsv4.convert.v32 import load_hub

        if keep_quantized or max_resident_bytes is not None:
            raise ValueError(f"{directory}: --keep-quantized and --max-resident-gb are V4-layout options")
        return load_hub(directory, dtype)
    reader = OfficialReader(directory)
    storage = check_layout(reader, cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    if max_resident_bytes is not None:
        from dsv4.quant.streamed import stream_experts

        storage = stream_experts(model, directory, reader.where, storage, max_resident_bytes)
    if keep_quantized:
        storage = _keep_quantized(model, reader, storage)
    model.to_empty(device="cpu")  # kept and streamed modules keep their codes (their own _apply)
    model.init_buffers()
    groups: dict[str, list[str]] = defaultdict(list)
    for name in storage:
        groups[_group(name)].append(name)
    for names in groups.values():
        part = {n: _read(reader, n, storage[n], torch.float32) for n in names}
        unexpected = model.load_state_dict(part, strict=False).unexpected_keys
        if unexpected:  # check_layout matched every name to the model: this would be a bug, not bad input
            raise LayoutError(f"{directory}: tensors the model did not take: {unexpected}")
    for k in range(cfg.num_nextn_predict_layers):  # the aliases must equal the shared tensors
        for a in MTP_ALIASES:
            alias = f"mtp.{k}.{a}"
            if alias in reader.where and not torch.equal(reader.get(alias).float(), reader.get(a).float()):
                raise LayoutError(f"{directory}: {alias} differs from {a}, which it must alias")
    return model.to(dtype) if dtype != torch.float32 else model


KEEP_FP32 = ("hc_", "attn_sink")  # parameters the model keeps in fp32 (mHC, sinks) stay fp32 when written


def _keep_quantized(model, reader: OfficialReader, storage: dict[str, str]) -> dict[str, str]:
    """Swap every FP8 nn.Linear for an FP8Linear and every all-MXFP4 Experts for MXFP4Experts holding the
    shards' codes; returns the storage map of what is left to load as usual."""
    from dsv4.model.moe import Experts
    from dsv4.quant.execution import FP8Linear, MXFP4Experts

    left = dict(storage)
    modules = dict(model.named_modules())
    for name, kind in storage.items():
        mod_name = name[: -len(".weight")]
        if kind == "fp8" and isinstance(modules.get(mod_name), nn.Linear):
            codes, scale = reader.get(name), reader.get(mod_name + ".scale")
            parent, _, leaf = mod_name.rpartition(".")
            setattr(
                modules[parent] if parent else model,
                leaf,
                FP8Linear(codes, scale, _fp8_block(codes.shape, scale.shape) or 128),
            )
            del left[name]
    for mod_name, mod in modules.items():
        if not isinstance(mod, Experts):
            continue
        keys = {w: [f"{mod_name}.{e}.{w}.weight" for e in range(mod.n)] for w in ("w1", "w2", "w3")}
        if not all(storage.get(k) == "mxfp4" for ks in keys.values() for k in ks):
            continue
        packed = {w: torch.stack([reader.get(k) for k in ks]) for w, ks in keys.items()}
        scales = {w: torch.stack([reader.get(k[: -len("weight")] + "scale") for k in ks]) for w, ks in keys.items()}
        parent, _, leaf = mod_name.rpartition(".")
        setattr(modules[parent], leaf, MXFP4Experts(mod.n, mod.limit, packed, scales))
        for ks in keys.values():
            for k in ks:
                del left[k]
    return left


def official_state_dict(model, plain_dtype: torch.dtype = torch.bfloat16, fp8_block: int = 128) -> dict:
    """The model's tensors as shipped: routed experts MXFP4, other projections FP8 (e8m0 block scales),
    the other parameters in plain_dtype (mHC and sinks in fp32); buffers keep their own dtype."""
    out: dict[str, torch.Tensor] = {}
    params = {n for n, _ in model.named_parameters()}
    for name, t in model.state_dict().items():
        t = t.detach()
        if is_routed_expert(name):
            out[name], out[name[: -len("weight")] + "scale"] = quant_mxfp4(t)
        elif is_fp8(name, tuple(t.shape)):
            out[name], out[name[: -len("weight")] + "scale"] = quant_fp8_block(t, fp8_block)
        elif name in params and not any(k in name for k in KEEP_FP32):
            out[name] = t.to(plain_dtype)
        else:
            out[name] = t
    return out


def save_official(
    model,
    out: str | Path,
    max_shard_bytes: int = 4 << 30,
    plain_dtype: torch.dtype = torch.bfloat16,
    fp8_block: int = 128,
) -> Path:
    """Write `model` in the official layout: config.json, shards and their index (FP8 blocks of fp8_block)."""
    if model.cfg.is_v32:
        from dsv4.convert.v32 import save_hub

        return save_hub(model, out, max_shard_bytes, fp8_block)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(official_state_dict(model, plain_dtype, fp8_block), out, max_shard_bytes=max_shard_bytes)
    model.cfg.to_json(out / "config.json")
    return out


def to_official_dir(src: str | Path, out: str | Path, fp8_block: int = 128) -> Path:
    """A run (its newest checkpoint, a torchrun job's shards too), checkpoint or model directory -> the
    shipped layout, with the tokenizer files and any Engram tables beside it. fp8_block: 128 (V4) or 32
    (V4.1's FP8 blocks)."""
    from dsv4.convert.checkpoint import copy_side_files
    from dsv4.run import load_weights

    if fp8_block not in FP8_BLOCKS:
        raise ValueError(f"FP8 blocks must be one of {FP8_BLOCKS} (V4, V4.1), got {fp8_block}")
    out = save_official(load_weights(src), out, fp8_block=fp8_block)
    copy_side_files(src, out)
    return out


def from_official_dir(src: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """A directory in the shipped layout -> a dsv4 model directory (one model.safetensors, official names, in
    bf16 or fp32), with its tokenizer files and Engram tables."""
    from dsv4.convert.checkpoint import copy_side_files
    from dsv4.weights import save_model

    out = Path(out)
    save_model(load_official(src, torch.bfloat16 if dtype == "bf16" else torch.float32), out)
    copy_side_files(src, out)
    return out
