"""The run directory: where a training run keeps its checkpoints, and how a path names a checkpoint.

A run folder RUN holds train_config.json, model_config.json, tokenizer.json (and optionally
chat_template.json), metrics.jsonl and checkpoints RUN/ckpt-NNNNNNN/ (dsv4.train.checkpoint writes
them; a complete one holds state.json). Every command that takes a checkpoint also takes the run folder
(its newest checkpoint) or a model folder (config.json + safetensors, as `dsv4 convert
--from-transformers` writes). `load_run` is the loader all of them use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ckpt-"
STATE_FILE = "state.json"  # inside a checkpoint folder: step, schedule, RNG metadata (dsv4.train.checkpoint)


@dataclass(frozen=True)
class RunDir:
    """The files of a training run folder: the one place that spells their names."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    train_config = property(lambda self: self.path / "train_config.json")  # dsv4.train.config.TrainConfig
    model_config = property(lambda self: self.path / "model_config.json")  # dsv4.config.ModelConfig
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    chat_template = property(lambda self: self.path / "chat_template.json")  # optional (dsv4.infer.chat)
    metrics = property(lambda self: self.path / "metrics.jsonl")  # one JSON record per line
    report = property(lambda self: self.path / "report")  # dsv4 report's plots and summary.md
    cache = property(lambda self: self.path / "cache")  # tokenized splits
    engram_tables = property(lambda self: self.path / "engram_tables")  # default mmap Engram tables

    def is_run(self) -> bool:
        return self.train_config.is_file()

    def train_settings(self) -> dict:
        """train_config.json as a plain dict ({} when the folder has none or it is unreadable)."""
        try:
            d = json.loads(self.train_config.read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run folder of a run, checkpoint or model path (see run_folder)."""
        return cls(run_folder(find_checkpoint(path)))


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself when it holds a model (a training checkpoint, or weights with
    their config.json as `dsv4 convert --from-transformers` writes), else a run folder's newest checkpoint.
    CheckpointError (one line) when it is neither, or a transformers model folder."""
    from dsv4.convert.transformers import is_transformers_folder

    path = Path(path)
    if is_transformers_folder(path):
        raise CheckpointError(
            f"{path} is a transformers model folder, not a dsv4 checkpoint; convert it with "
            f"`dsv4 convert --from-transformers {path} OUT`"
        )
    if (path / STATE_FILE).exists() or (path / "config.json").exists():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"no checkpoint found in {path} (expected a run folder, a ckpt-* folder or a model folder with config.json)"
            if path.is_dir()
            else f"{path} does not exist"
        )
    return ckpt


def run_folder(path: str | Path) -> Path:
    """The folder holding a checkpoint's tokenizer.json (and chat_template.json): `path` itself when it has
    one or its parent has none (a run folder, a converted model), else its parent (a ckpt-* folder)."""
    path = Path(path)
    if RunDir(path).tokenizer.exists() or not RunDir(path.parent).tokenizer.exists():
        return path
    return path.parent


def load_weights(path: str | Path, keep_quantized: bool = False, max_resident_gb: float | None = None):
    """The model (eval, on the CPU) of a run directory (its newest checkpoint), a checkpoint dir (a torchrun
    job's shards too) or a model dir (config.json + safetensors, plain or in the official FP8 / MXFP4
    layout), with its Engram tables and canonical map. keep_quantized: an official-layout model keeps its
    FP8 / MXFP4 weights in memory (dsv4.quant.execution); max_resident_gb: its routed experts stay in the
    shards, read on use into a cache of that many GB (dsv4.quant.streamed)."""
    from dsv4.config import ModelConfig
    from dsv4.model import build_model
    from dsv4.train.checkpoint import load_checkpoint
    from dsv4.weights import load_model

    ckpt = find_checkpoint(path)
    run = RunDir(run_folder(ckpt))
    if (ckpt / STATE_FILE).exists():
        if max_resident_gb is not None:
            raise CheckpointError(
                f"{ckpt}: --max-resident-gb streams the experts of a model directory in DeepSeek's layout "
                "(dsv4 convert --to-official), not of a training checkpoint"
            )
        model = build_model(ModelConfig.from_json(ckpt / "config.json"))
        load_checkpoint(ckpt, model)
    else:  # weights only (a converted model), copied into the fp32 model whatever dtype they were stored in
        try:
            model = load_model(ckpt, keep_quantized=keep_quantized, max_resident_gb=max_resident_gb)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if model.engrams():  # Engram tables (chunked safetensors in the checkpoint) and the canonical map
        from dsv4.data.canonical import canonical_map_path, load_canonical_map
        from dsv4.memory import load_store

        for i, eng in model.engrams().items():
            eng.set_table(load_store(ckpt / "engram" / f"layer{i}"))
        if canonical_map_path(run.tokenizer).exists():
            model.set_canonical_map(load_canonical_map(run.tokenizer))
    return model.eval()


def load_run(
    run_dir: str | Path,
    device="cpu",
    keep_quantized: bool = False,
    max_resident_gb: float | None = None,
    official_quant: bool = False,
):
    """(model, tokenizer) from a training run directory (its newest checkpoint), a checkpoint dir or a model
    dir (config.json + safetensors + tokenizer.json); the model is on `device` ("cpu", "cuda", "cuda:1", ...;
    ValueError when this machine has no such device). The one loader of every command, eval and benchmark."""
    from dsv4.data import load_tokenizer
    from dsv4.device import resolve_device

    device = resolve_device(device)
    run = RunDir(run_folder(find_checkpoint(run_dir)))
    if not run.tokenizer.exists():
        raise CheckpointError(f"no tokenizer.json in {run.path}")
    model = load_weights(run_dir, keep_quantized, max_resident_gb)
    if official_quant:  # FP8 activations, FP4 indexer, FP8 kv round trips (dsv4.quant.official_quant)
        from dsv4.quant.official_quant import enable_official_quant

        enable_official_quant(model)
    return model.to(device).eval(), load_tokenizer(run.tokenizer)
