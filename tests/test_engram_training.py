"""Engram in the trainer: tables train with sparse row-wise Adam, the mmap and RAM backends give
bitwise-equal runs, prefetching changes nothing, a resumed run equals the uninterrupted one, and a
trained run loads for cached generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import copy_corpus
from test_train import SMALL, _fast_cpu, _metrics, _tc, _train_losses  # noqa: F401  (_fast_cpu: autouse)

from dsv4.infer.engine import Engine
from dsv4.infer.sampling import SamplingParams
from dsv4.run import load_run
from dsv4.train.checkpoint import latest_checkpoint
from dsv4.train.config import TrainConfig
from dsv4.train.trainer import Trainer, train

ENGRAM = ["engram_layer_ids=[1]", "engram_heads=2", "engram_rows_per_head=997", "engram_d_mem=64"]
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return copy_corpus(tmp_path_factory.mktemp("ecorpus"), n=20)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    from dsv4.data import find_files, iter_documents, split_files, train_tokenizer

    path = tmp_path_factory.mktemp("etok") / "tokenizer.json"
    train_files, _ = split_files(find_files(corpus), 0.05)
    train_tokenizer((d.text for d in iter_documents(train_files)), 512, path, show_progress=False)
    return path


def _run(root, name, corpus, tokenizer, extra=(), **kw):
    out = root / name
    train(_tc(out, corpus, tokenizer, STEPS, **kw), SMALL + ENGRAM + list(extra))
    return out


@pytest.fixture(scope="module")
def runs(corpus, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("eruns")
    res = {
        "ram": _run(root, "ram", corpus, tokenizer),
        "mmap": _run(root, "mmap", corpus, tokenizer, ["engram_store=mmap", "engram_hot_rows=200"]),
        "noprefetch": _run(root, "nopf", corpus, tokenizer, ["engram_prefetch=false"]),
    }
    b = root / "B"
    real = Trainer.train_step

    def interrupting(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupting)
        with pytest.raises(KeyboardInterrupt):
            _run(root, "B", corpus, tokenizer)
    train(TrainConfig(out=str(b), progress=False), resume=True)
    res["resumed"] = b
    return res


def _table(run, layer=1):
    from safetensors.torch import load_file

    d = latest_checkpoint(run) / "engram" / f"layer{layer}"
    index = json.loads((d / "index.json").read_text())
    files = sorted(p for p in d.glob("table-*.safetensors"))
    assert files, index
    return torch.cat([next(iter(load_file(f).values())) for f in files])


def test_table_trains_and_only_touched_rows_move(runs):
    losses = _train_losses(runs["ram"])
    assert len(losses) == STEPS and all(np.isfinite(list(losses.values())))
    rec = [r for r in _metrics(runs["ram"]) if r["kind"] == "train"]
    assert rec[0]["engram_rows_updated"] == 0  # indexer warm-up: table frozen
    assert rec[-1]["engram_rows_updated"] > 0
    from dsv4.memory import init_rows

    t = _table(runs["ram"])
    init = init_rows(t.shape[0], t.shape[1], 0.02, 0 * 1000 + 1, 0, t.shape[0])
    moved = (t != init).any(-1)
    assert 0 < int(moved.sum()) < t.shape[0]  # sparse: most rows untouched


def test_mmap_and_prefetch_runs_are_bitwise_equal(runs):
    ref = _train_losses(runs["ram"])
    assert _train_losses(runs["mmap"]) == ref
    assert _train_losses(runs["noprefetch"]) == ref
    assert torch.equal(_table(runs["mmap"]), _table(runs["ram"]))
    assert (runs["mmap"] / "engram_tables" / "layer1" / "table.npy").exists()


def test_resume_restores_tables_exactly(runs):
    assert _train_losses(runs["resumed"]) == _train_losses(runs["ram"])
    assert torch.equal(_table(runs["resumed"]), _table(runs["ram"]))


def test_trained_engram_run_generates_with_cache(runs):
    model, tok = load_run(runs["ram"])
    assert model.engrams() and "canonical_ids" in model._buffers
    ids = tok.encode("def f(x):\n    return").ids
    from dsv4.infer.reference import generate

    ref = generate(model, ids, max_new_tokens=8, temperature=0, stop_at_eos=False)
    out = (
        Engine(model, max_batch=1)
        .generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        .output
    )
    assert out == ref
