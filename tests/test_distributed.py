"""torchrun jobs (gloo on the CPU, 2 ranks) against one process, through the real `dsv4 train`.

- Equivalence: a 2-rank FSDP2 run with Muon (indexer warm-up, then the LM stage with MTP and the MoE
  balancing biases) and a 1-process run of the same global batch log the same losses, and end with the
  same parameters (fp32, up to the order of the gradient sums).
- Expert parallelism with activation checkpointing (ep_size 2: each rank holds half of every layer's
  routed experts, tokens travel by all-to-all) equals one process too, and its checkpoint resumes in one
  process.
- Engram (its tables replicated on every rank, the row gradients gathered and averaged) equals one process:
  the model and the tables with their Adam state.
- Resharding: a checkpoint saved by 2 ranks resumes in 1 process, and one saved by 1 process resumes on
  2 ranks; the continued losses equal those of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_and_tokenizer
from safetensors import safe_open

from dsv4.config import ModelConfig
from dsv4.model.transformer import Transformer
from dsv4.parallel.checkpoint import is_distributed
from dsv4.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

STEPS, CKPT_AT = 4, 2
LR = 2e-3
RUN = [
    "--preset", "micro", "--steps", str(STEPS), "--no-progress",
    "seq_len=64", "batch_size=4", "dtype=fp32", "ns_dtype=fp32", "compile=off", "threads=1", "log_every=1",
    "indexer_warmup_steps=1", f"ckpt_every={CKPT_AT}", "eval_every=1000", "eval_batches=1",
    "final_eval_tokens=2048", f"lr={LR}",
]  # fmt: skip


ENGRAM = ["engram_layer_ids=[1]", "engram_rows_per_head=512", "engram_d_mem=64"]


def dsv4(*args: str, nproc: int = 1) -> None:
    """`dsv4 train ...` in a fresh interpreter (with --nproc, torchrun's 2 processes)."""
    cmd = [sys.executable, "-m", "dsv4", "train", *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV4_DIST_TIMEOUT": "120"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def params(run: Path) -> dict[str, torch.Tensor]:
    model = Transformer(ModelConfig.from_json(run / "model_config.json"))
    load_checkpoint(latest_checkpoint(run), model)
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Within 3e-5 relative over the whole model, and no element off by more than 5% of one learning-rate
    step: Muon and Adam normalise their updates, so a gradient that is ~1e-9 at initialisation (mHC scales)
    turns the last-bit differences of a different summation order into a small part of a step. The drift is
    CPU-dependent (1.03e-5 after 4 steps on one AMD EPYC, below 1e-5 on others); an averaging bug (a missing
    1/world size, a rank's gradient dropped) is off by 1e-2 or more."""
    num = sum(float((a[n] - b[n]).square().sum()) for n in a) ** 0.5
    den = sum(float(a[n].square().sum()) for n in a) ** 0.5
    assert num <= 3e-5 * den, num / den
    worst = max(a, key=lambda n: float((a[n] - b[n]).abs().max()))
    assert float((a[worst] - b[worst]).abs().max()) <= 0.05 * LR, worst


def resume_from(src: Path, dst: Path, step: int) -> Path:
    """A copy of run src as it stood when checkpoint `step` was written."""
    shutil.copytree(src, dst)
    for ck in list_checkpoints(dst):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus, tok = corpus_and_tokenizer(root)
    common = ["--data", str(corpus), "--tokenizer", str(tok), *RUN]
    one, two = root / "one", root / "two"
    dsv4("--out", str(one), *common)
    dsv4("--out", str(two), *common, nproc=2)
    two_to_one = resume_from(two, root / "two_to_one", CKPT_AT)
    dsv4("--out", str(two_to_one), "--resume", "--no-progress")
    one_to_two = resume_from(one, root / "one_to_two", CKPT_AT)
    dsv4("--out", str(one_to_two), "--resume", "--no-progress", nproc=2)
    ep = root / "ep"
    dsv4("--out", str(ep), *common, "ep_size=2", "activation_checkpoint=true", nproc=2)
    ep_to_one = resume_from(ep, root / "ep_to_one", CKPT_AT)
    dsv4("--out", str(ep_to_one), "--resume", "--no-progress")
    for name, nproc in (("engram_one", 1), ("engram_two", 2)):
        dsv4("--out", str(root / name), *common, *ENGRAM, nproc=nproc)
    return {
        "engram_one": root / "engram_one",
        "engram_two": root / "engram_two",
        "one": one,
        "two": two,
        "two_to_one": two_to_one,
        "one_to_two": one_to_two,
        "ep": ep,
        "ep_to_one": ep_to_one,
    }


def test_two_ranks_equal_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert is_distributed(latest_checkpoint(two)) and not is_distributed(latest_checkpoint(one))
    lo, lt = losses(one), losses(two)
    assert sorted(lo) == sorted(lt) == list(range(STEPS))
    assert_same_losses(lo, lt, range(STEPS))
    assert_same_params(params(one), params(two))
    final = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["world_size"] == 2


def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    resumed, straight = runs["two_to_one"], runs["two"]
    assert not is_distributed(latest_checkpoint(resumed))  # the resumed part saved as one process does
    assert sorted(losses(resumed)) == list(range(STEPS))
    assert_same_losses(losses(straight), losses(resumed), range(STEPS))
    assert_same_params(params(straight), params(resumed))


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    resumed, straight = runs["one_to_two"], runs["one"]
    assert is_distributed(latest_checkpoint(resumed))
    assert sorted(losses(resumed)) == list(range(STEPS))
    assert_same_losses(losses(straight), losses(resumed), range(STEPS))
    assert_same_params(params(straight), params(resumed))


def test_expert_parallel_equals_one_process_and_resumes_in_one(runs):
    one, ep, resumed = runs["one"], runs["ep"], runs["ep_to_one"]
    assert json.loads((ep / "train_config.json").read_text())["ep_size"] == 2
    assert_same_losses(losses(one), losses(ep), range(STEPS))
    assert_same_params(params(one), params(ep))
    assert_same_losses(losses(ep), losses(resumed), range(STEPS))
    assert_same_params(params(ep), params(resumed))


def engram_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every Engram tensor of a checkpoint (tables and their Adam moments), by file stem and key."""
    out = {}
    for f in sorted((ckpt / "engram").rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({f"{f.parent.name}/{f.stem}/{k}": st.get_tensor(k).float() for k in st.keys()})  # noqa: SIM118
    return out


def test_engram_tables_are_replicated_and_trained_as_in_one_process(runs):
    """After the first LM step the tables and their Adam moments agree to 1e-5 relative; at the end, the
    tables are within 5% of one Engram Adam step (lr x engram_lr_mult 5), like the model's parameters."""
    one, two = runs["engram_one"], runs["engram_two"]
    assert_same_losses(losses(one), losses(two), range(STEPS))
    assert_same_params(params(one), params(two))
    first = f"ckpt-{CKPT_AT:07d}"  # step 0 is the indexer warm-up, step 1 the first LM step
    ta, tb = engram_state(one / first), engram_state(two / first)
    assert ta.keys() == tb.keys() and any("/table-" in k for k in ta)
    for k in ta:
        assert float((ta[k] - tb[k]).norm()) <= 1e-5 * float(ta[k].norm()), k
    ta, tb = engram_state(latest_checkpoint(one)), engram_state(latest_checkpoint(two))
    tables = [k for k in ta if "/table-" in k]
    assert tables and all(float((ta[k] - tb[k]).abs().max()) <= 0.05 * 5 * LR for k in tables)


def test_a_sharded_checkpoint_converts_to_one_model_directory(runs, tmp_path):
    """dsv4 convert --to-model: the job's DCP shards -> config.json + model.safetensors (official names) +
    tokenizer, canonical map and Engram tables; the converted model computes what the checkpoint does."""
    from dsv4.cli import main
    from dsv4.run import load_run

    src, out = runs["engram_two"], tmp_path / "model"
    assert main(["convert", "--to-model", str(src), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "canonical_map.json", "engram"} <= {
        p.name for p in out.iterdir()
    }
    a, _ = load_run(src)
    b, _ = load_run(out)
    ids = torch.randint(0, a.cfg.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
