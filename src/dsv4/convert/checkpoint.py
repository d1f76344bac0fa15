"""A training checkpoint (one process's, or a torchrun job's DCP shards) -> one model directory.

The directory holds what the inference tools load (dsv4.run.load_run): config.json, model.safetensors with
the official tensor names, tokenizer.json with its chat template and canonical map, and the Engram tables
of an Engram model. The DCP shards are read and resharded into one process by
dsv4.train.checkpoint.load_checkpoint, so a checkpoint of any world size converts the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dsv4.data.canonical import canonical_map_path
from dsv4.run import RunDir, find_checkpoint, load_weights, run_folder
from dsv4.weights import save_model


def copy_side_files(src: str | Path, out: str | Path) -> None:
    """What travels with the weights of `src` (a run, checkpoint or model directory) into `out`: the
    tokenizer with its chat template and canonical map, and the Engram tables."""
    ckpt, out = find_checkpoint(src), Path(out)
    run = RunDir(run_folder(ckpt))
    for f in (run.tokenizer, run.chat_template, canonical_map_path(run.tokenizer)):
        if f.exists():
            shutil.copy(f, out / f.name)
    if (ckpt / "engram").is_dir():
        shutil.copytree(ckpt / "engram", out / "engram", dirs_exist_ok=True)


def checkpoint_to_model_dir(src: str | Path, out: str | Path) -> Path:
    """Write the model directory `out` from a run (its newest checkpoint) or a checkpoint folder."""
    out = Path(out)
    save_model(load_weights(src), out)
    copy_side_files(src, out)
    return out
