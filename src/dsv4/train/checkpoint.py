"""Training checkpoints: safetensors only, written atomically, the last K kept.

A checkpoint is a directory `ckpt-0000123/` holding model.safetensors (official tensor names),
optim.safetensors + optim.json (optimiser tensors / everything else), rng.safetensors, state.json
(step, data position, schedule length, stage, counters) and config.json. It is written to a temporary
sibling directory and renamed into place, so an interrupted write never leaves a checkpoint that loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsv4.run import PREFIX, STATE_FILE, CheckpointError, latest_checkpoint, list_checkpoints
from dsv4.weights import load_state_dict, save_state_dict

__all__ = ["CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]


def _flatten_optim(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
                entry[k] = {"tensor": f"{pid}.{k}"}
            else:
                entry[k] = v
        meta["state"][str(pid)] = entry
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return (
        tensors,
        {
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": repr(random.getstate()),
        },
    )


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    import ast

    random.setstate(ast.literal_eval(meta["python"]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep_last: int = 3,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write run_dir/ckpt-{step} atomically; prune to the newest keep_last checkpoints.
    extra(tmp_dir): writes more files into the checkpoint before it is published (Engram tables).
    In a torchrun job (more than one rank) this is collective: every rank writes its shards of the model
    and optimiser with DCP (dsv4.parallel.checkpoint) and rank 0 the rest and the rename."""
    from dsv4.parallel import dist as pdist

    run_dir = Path(run_dir)
    env = pdist.env_from_environ() if torch.distributed.is_initialized() else pdist.SINGLE
    final = run_dir / f"{PREFIX}{step:07d}"
    if env.active:
        tmp = run_dir / f".tmp-{PREFIX}{step:07d}-dcp"  # one name for every rank
        if env.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        pdist.barrier()
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-{PREFIX}{step:07d}-"))
    try:
        if env.active:
            from dsv4.parallel.checkpoint import save_tensors

            save_tensors(tmp, model, optimizer)
        else:
            save_state_dict(model.state_dict(), tmp)
            tensors, meta = _flatten_optim(optimizer.state_dict())
            save_state_dict(tensors, tmp / "optim") if tensors else (tmp / "optim").mkdir()
            (tmp / "optim.json").write_text(json.dumps(meta))
        if env.active and not env.main:
            pdist.barrier()  # rank 0 publishes
            return final
        model.cfg.to_json(tmp / "config.json")
        rt, rm = rng_state()
        save_state_dict(rt, tmp / "rng")
        if extra is not None:
            extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "rng": rm}, indent=1))
        for f in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if env.active:
            pdist.barrier()
    except BaseException:
        if env.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (+ optimiser and RNG state) into model/optimizer; returns the saved state dict."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        from dsv4.parallel.checkpoint import is_distributed, load_tensors

        if is_distributed(path):  # saved by a torchrun job: DCP reshards it to this job (one process too)
            load_tensors(path, model, optimizer)
            set_rng_state(load_state_dict(path / "rng"), state["rng"])
            return state
        weights = load_state_dict(path)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if optimizer is not None:
            meta = json.loads((path / "optim.json").read_text())
            tensors = load_state_dict(path / "optim") if (path / "optim" / "model.safetensors").exists() else {}
            optimizer.load_state_dict(_unflatten_optim(tensors, meta))
        set_rng_state(load_state_dict(path / "rng"), state["rng"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {str(e).splitlines()[0]}") from None
    return state
