"""Distributed checkpoints: torch.distributed.checkpoint (DCP) into safetensors shards, resharded on load.

A checkpoint saved by N ranks is the folder `ckpt-NNNNNNN/` of a one-process checkpoint (state.json,
config.json, rng/, optim.json) with the tensors in `dcp/`: one safetensors file per rank, each holding
that rank's rows of every tensor, with their offsets in the file header (DCP's Hugging Face storage
format; never pickle). Tensor names are `model.<parameter or buffer name>` and `optim.<parameter
name>.<state key>`; optim.json keeps the parameter groups (as parameter names) and the non-tensor state.

DCP plans every read from the saved offsets, so M ranks (M = 1 included) load what N ranks saved:
each reads only the rows of its own shards. `export_model` turns such a checkpoint into one
model.safetensors with the official names for the inference tools.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

DCP_DIR = "dcp"
OPTIM_META = "optim.json"


def is_distributed(path: str | Path) -> bool:
    """A checkpoint folder written by save_tensors (it has a dcp/ folder)."""
    return (Path(path) / DCP_DIR).is_dir()


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict keeps (routing biases, hash tables), by name."""
    out = {}
    for mname, mod in model.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = buf
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor to save or load, by name; optim.json's content) of a model and its optimiser."""
    tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    tensors.update({f"model.{n}": b for n, b in persistent_buffers(model).items()})
    meta: dict = {"param_groups": [], "state": {}}
    if optimizer is None:
        return tensors, meta
    names = _param_names(model)
    for g in optimizer.param_groups:
        meta["param_groups"].append(
            {k: ([names[id(p)] for p in v] if k == "params" else v) for k, v in g.items() if k != "param_names"}
        )
    for p, st in optimizer.state.items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{names[id(p)]}.{k}"] = v
                entry[k] = {"tensor": True}
            else:
                entry[k] = v
        meta["state"][names[id(p)]] = entry
    return tensors, meta


def save_tensors(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: every rank writes its shards of the model and optimiser into folder/dcp; rank 0 (or the
    only process) also writes folder/optim.json."""
    tensors, meta = _tensors(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / DCP_DIR), save_distributed=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (folder / OPTIM_META).write_text(json.dumps(meta))


def _init_state(meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The saved optimiser state's tensors as zeros shaped (and sharded) like their parameters, ready to load."""
    if optimizer is None:
        return
    params = dict(model.named_parameters())
    for name, entry in meta["state"].items():
        p = params[name]
        optimizer.state[p] = {k: torch.zeros_like(p) if v == {"tensor": True} else v for k, v in entry.items()}


def _restore_groups(meta: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None, where: str) -> None:
    """The saved groups' settings (lr, ...) into the optimiser, whose groups must hold the same parameters."""
    if optimizer is None:
        return
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{where}: {len(groups)} optimiser groups saved, this optimiser has {len(optimizer.param_groups)}"
        )
    names = _param_names(model)
    for saved, g in zip(groups, optimizer.param_groups):
        if saved["params"] != [names[id(p)] for p in g["params"]]:
            raise ValueError(f"{where}: the optimiser group {saved.get('name', '')!r} holds other parameters")
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})


def load_tensors(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: load a save_tensors checkpoint of any world size into this job's (sharded or whole)
    model and optimiser, in place."""
    folder = Path(folder)
    meta = json.loads((folder / OPTIM_META).read_text())
    _init_state(meta, model, optimizer)
    tensors, _ = _tensors(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that one process without a process group loads alone
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / DCP_DIR)))
    _restore_groups(meta, model, optimizer, str(folder))


def whole_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole (unsharded) model and optimiser state by name, taken before FSDP2 shards the model: a
    one-process checkpoint on its way into a torchrun job (load_whole)."""
    return _tensors(model, optimizer)


def load_whole(whole: tuple[dict[str, torch.Tensor], dict], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """whole_tensors' output into a sharded model and its new optimiser: each rank keeps its own rows."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    source, meta = whole
    _init_state(meta, model, optimizer)
    target, _ = _tensors(model, optimizer)
    for name, t in target.items():
        src = source[name]
        if isinstance(t, DTensor):
            t.to_local().copy_(distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None).to_local())
        else:
            t.copy_(src)
    _restore_groups(meta, model, optimizer, "the one-process checkpoint")
