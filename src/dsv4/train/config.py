"""One flat training configuration; `key=value` overrides may name it or the model config."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from dsv4.config import ConfigError, ModelConfig


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # None = the Python standard library of this interpreter
    out: str = "runs/dsv4"
    tokenizer: str | None = None  # an existing tokenizer.json; None = train one on the training split
    steps: int | None = None  # total optimiser steps (including the indexer warm-up)
    minutes: float | None = None  # or a wall-clock budget; the schedule length is fixed after a few steps
    batch_size: int = 4
    seq_len: int = 1024
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # LR warm-up of the LM stage; None = min(20, 10% of its steps)
    weight_decay: float = 0.1
    optimizer: str = "muon"  # muon (Muon on matrices, AdamW on the rest; V4) | adamw (AdamW on everything)
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    doc_mask: bool = True  # sample-level attention masks at document boundaries
    # stage 1: dense attention, only the indexers learn (KL); None = min(30, 10% of the planned steps); 0 = off
    indexer_warmup_steps: int | None = None
    indexer_lr: float = 1e-3  # DSA paper's warm-up learning rate
    bias_update_speed: float | None = None  # None = model config's (gamma = 1e-3)
    max_bad_steps: int = 5  # consecutive NaN/inf losses before stopping with an error
    log_every: int = 5
    eval_every: int = 100
    eval_batches: int = 8
    final_eval_tokens: int = 262144  # the closing evaluation (and its xz baseline) covers this many val tokens
    ckpt_every: int = 200
    keep_last: int = 3
    dtype: str = "auto"  # auto | fp32 | bf16 (bf16 = autocast; auto measures which is faster here)
    ns_dtype: str = (
        "auto"  # Muon's Newton-Schulz iterations: auto | fp32 | bf16 (auto: bf16 where its matmul is faster)
    )
    threads: int = 0  # torch threads; 0 = leave torch's default
    device: str = "cpu"  # cpu | cuda | cuda:N (dtype=auto: fp32 on the CPU, bf16 autocast on a GPU that has it)
    compile: str = "auto"  # torch.compile the mHC maps: on | off | auto (on for runs >= 2 min or 200 steps)
    progress: bool = True
    activation_checkpoint: bool = False  # torchrun jobs: recompute each block in the backward (FSDP2)
    fp4_qat: bool = False  # fake-quantise the routed experts to MXFP4 in the forward (straight-through backward)
    ep_size: int = 1  # torchrun jobs: expert parallelism, 1 or the number of ranks (each holds E / ep_size experts)
    # Engram tables (models with engram_layer_ids): where the rows live and how they are fed and trained
    engram_store: str = "ram"  # ram | mmap (a memory-mapped .npy per layer under engram_dir)
    engram_dir: str | None = None  # mmap table files; None = RUN/engram_tables
    engram_prefetch: bool = True  # read the next batch's rows in a background thread
    engram_hot_rows: int = 0  # rows kept in a hot-row LRU cache in front of the store (0 = none)
    engram_lr_mult: float = 5.0  # sparse row-wise Adam lr = this x the current lr (Engram paper)

    def validate(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ConfigError("give exactly one of steps or minutes")
        for name in ("batch_size", "seq_len", "log_every", "eval_every", "ckpt_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: must be >= 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"minutes={self.minutes!r}: must be > 0")
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"optimizer={self.optimizer!r}: must be muon or adamw")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile={self.compile!r}: must be auto, on or off")
        self.validate_device()
        for key in ("dtype", "ns_dtype"):
            if getattr(self, key) not in ("auto", "fp32", "bf16"):
                raise ConfigError(f"{key}={getattr(self, key)!r}: must be auto, fp32 or bf16")
        if self.ep_size < 1:
            raise ConfigError(f"ep_size={self.ep_size!r}: must be >= 1")
        if self.engram_store not in ("ram", "mmap"):
            raise ConfigError(f"engram_store={self.engram_store!r}: must be ram or mmap")
        if self.engram_hot_rows < 0 or self.engram_lr_mult < 0:
            raise ConfigError("engram_hot_rows and engram_lr_mult must be >= 0")
        for name in ("warmup_steps", "indexer_warmup_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        for name in ("lr", "indexer_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a finite number > 0")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a finite number >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: must be in [0, 1)")

    def validate_device(self) -> None:
        """ConfigError in one line when `device` names no usable device on this machine."""
        from dsv4.device import resolve_device

        try:
            resolve_device(self.device, "device=")
        except ValueError as e:
            raise ConfigError(str(e).replace("device= ", "device=", 1)) from None

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def _coerce(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, (list, dict)) or like is None:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


_EXPECTED = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}


def _coerce_field(key: str, value: str, hint) -> object:
    """A TrainConfig override's value parsed by the field's annotation (int | None accepts 'none')."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        return _coerce(value, hint()) if hint in _EXPECTED else value
    except ValueError:
        raise ConfigError(f"override {key}={value!r}: expected {_EXPECTED[hint]}") from None


def apply_overrides(train: TrainConfig, model: ModelConfig, overrides: list[str]) -> tuple[TrainConfig, ModelConfig]:
    """Apply `key=value` strings; a key names a TrainConfig or ModelConfig field, else ConfigError."""
    tfields = typing.get_type_hints(TrainConfig)
    mfields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    t_upd, m_upd = {}, {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key in tfields:
            t_upd[key] = _coerce_field(key, value, tfields[key])
        elif key in mfields:
            try:
                m_upd[key] = _coerce(value, getattr(model, key))
            except ValueError as e:
                raise ConfigError(f"override {key}: {e}") from None
        else:
            raise ConfigError(f"unknown config field {key!r} in override {item!r} (not a training or model field)")
    return dataclasses.replace(train, **t_upd), model.replace(**m_upd)
