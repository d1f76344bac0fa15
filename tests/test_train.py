"""End-to-end tests of the trainer (dsv4.train) and of `dsv4 train / generate / report` on a tiny run.

Every run here uses a few dozen small stdlib files copied to a temporary folder, a shared 512-token
tokenizer and a model of ~0.6 M parameters, so the whole file takes well under two minutes on 2 cores.
Expensive things (the uninterrupted/interrupted+resumed pair of runs, the CLI subprocesses) are module
fixtures that several tests read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import copy_corpus

import dsv4.train.checkpoint as ckpt_mod
import dsv4.train.trainer as trainer_mod
import dsv4.weights as weights_mod
from dsv4.config import ModelConfig
from dsv4.data import DataWarning, find_files, iter_documents, split_files, train_tokenizer, val_batches
from dsv4.eval.recall import indexer_recall
from dsv4.model.transformer import Transformer
from dsv4.optim.groups import build_optimizer
from dsv4.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from dsv4.train.config import TrainConfig, apply_overrides
from dsv4.train.trainer import Trainer, TrainingError, train
from dsv4.weights import load_state_dict

# A ~0.6 M parameter V4: SWA, CSA (m=4), HCA (m'=16) main layers + an SWA MTP layer.
MODEL = (
    "vocab_size=512 hidden_size=64 num_attention_heads=2 head_dim=32 qk_rope_head_dim=8 q_lora_rank=32 "
    "o_lora_rank=32 o_groups=2 moe_intermediate_size=64 index_n_heads=4 index_head_dim=16 index_topk=8 "
    "sliding_window=16 compress_ratios=[0,4,16,0] num_hidden_layers=3"
).split()
# dtype=fp32, ns_dtype=fp32: no bf16-vs-fp32 timing at start-up, and bitwise-reproducible arithmetic.
RUN = (
    "seq_len=64 batch_size=2 progress=false dtype=fp32 ns_dtype=fp32 log_every=1 eval_every=2 eval_batches=2 "
    "ckpt_every=2 keep_last=2 indexer_warmup_steps=2 warmup_steps=2"
).split()
SMALL = MODEL + RUN


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """One torch thread (two threads on two cores shared with other jobs can run 50x slower, spinning)
    and no 0.5 s matmul-peak measurement per run (it only feeds the MFU column)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "measure_matmul_peak", lambda *a, **k: 1e11)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return copy_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    """One 512-token BPE for all runs (each run would otherwise train its own)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_files, _ = split_files(find_files(corpus), 0.05)
    train_tokenizer((d.text for d in iter_documents(train_files)), 512, path, show_progress=False)
    return path


def _tc(out: Path, corpus: Path, tokenizer: Path | None, steps: int, **kw) -> TrainConfig:
    return TrainConfig(
        data=str(corpus),
        out=str(out),
        tokenizer=None if tokenizer is None else str(tokenizer),
        steps=steps,
        progress=False,
        **kw,
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_losses(run: Path) -> dict[int, float]:
    rows = [r for r in _metrics(run) if r["kind"] == "train"]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered train steps in {run}: {steps}"
    return {r["step"]: r["loss"] for r in rows}


STEPS = 8
INTERRUPT_AT = 4


@pytest.fixture(scope="module")
def runs(corpus, tokenizer, tmp_path_factory):
    """Run A: 8 steps straight. Run B: the same settings, Ctrl-C before step 4, then --resume to step 8."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "A", root / "B"
    train(_tc(a, corpus, tokenizer, STEPS), SMALL)

    real_step = Trainer.train_step

    def interrupting_step(self, step):
        if step == INTERRUPT_AT:
            raise KeyboardInterrupt
        return real_step(self, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupting_step)
        with pytest.raises(KeyboardInterrupt):
            train(_tc(b, corpus, tokenizer, STEPS), SMALL)
    interrupted = {"ckpts": [p.name for p in list_checkpoints(b)], "losses": _train_losses(b)}
    final_b = train(TrainConfig(out=str(b), progress=False), resume=True)
    return {"A": a, "B": b, "interrupted": interrupted, "final_B": final_b}


# ------------------------------------------------------------------------- 1. resume determinism
def test_interrupt_saves_a_checkpoint_at_the_interrupted_step(runs):
    it = runs["interrupted"]
    assert it["ckpts"][-1] == f"ckpt-{INTERRUPT_AT:07d}"
    assert sorted(it["losses"]) == list(range(INTERRUPT_AT))


def test_resumed_run_matches_uninterrupted_run_exactly(runs):
    a, b = runs["A"], runs["B"]
    la, lb = _train_losses(a), _train_losses(b)
    assert sorted(la) == list(range(STEPS))
    assert lb == la  # exact float equality, step by step
    stages = {r["step"]: r["stage"] for r in _metrics(b) if r["kind"] == "train"}
    assert stages[0] == "indexer_warmup" and stages[STEPS - 1] == "sparse"
    # the evaluations B has agree exactly with A's (periodic ones, and the final one)
    va = {r["step"]: r["val_loss"] for r in _metrics(a) if r["kind"] == "val"}
    vb = {r["step"]: r["val_loss"] for r in _metrics(b) if r["kind"] == "val"}
    assert vb and all(va.get(s) == v for s, v in vb.items()), (va, vb)
    fa, fb = ([r for r in _metrics(run) if r["kind"] == "final"] for run in (a, b))
    assert len(fa) == len(fb) == 1 and fa[0]["val_bpb"] == fb[0]["val_bpb"] == runs["final_B"]["val_bpb"]


def test_resumed_run_keeps_the_evaluation_logged_at_the_checkpoint_step(runs):
    va = sorted(r["step"] for r in _metrics(runs["A"]) if r["kind"] == "val")
    vb = sorted(r["step"] for r in _metrics(runs["B"]) if r["kind"] == "val")
    assert INTERRUPT_AT in va
    assert vb == va


def test_interrupt_inside_a_step_still_resumes_exactly(runs, corpus, tokenizer, tmp_path):
    b = tmp_path / "B"
    real_step = Trainer.train_step

    def step_interrupted_after_update(self, step):
        if step == INTERRUPT_AT:
            real_opt_step = self.optimizer.step

            def opt_step(*a, **k):  # Ctrl-C arrives just after the parameters were updated
                real_opt_step(*a, **k)
                raise KeyboardInterrupt

            self.optimizer.step = opt_step
        return real_step(self, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", step_interrupted_after_update)
        with pytest.raises(KeyboardInterrupt):
            train(_tc(b, corpus, tokenizer, STEPS), SMALL)
    train(TrainConfig(out=str(b), progress=False), resume=True)
    assert _train_losses(b) == _train_losses(runs["A"])


def test_restart_before_the_first_checkpoint_does_not_duplicate_metrics(corpus, tokenizer, tmp_path):
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def crashing_step(self, step):
        if step == 1:
            raise RuntimeError("simulated crash")
        return real_step(self, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", crashing_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(_tc(run, corpus, tokenizer, 2), SMALL)
    assert latest_checkpoint(run) is None and (run / "metrics.jsonl").exists()
    train(TrainConfig(out=str(run), progress=False), resume=True)
    assert sorted(_train_losses(run)) == [0, 1]


def test_resumed_run_final_weights_are_bitwise_equal(runs):
    name = f"ckpt-{STEPS:07d}"
    for sub in ("", "optim"):
        wa = load_state_dict(runs["A"] / name / sub)
        wb = load_state_dict(runs["B"] / name / sub)
        assert wa.keys() == wb.keys() and wa
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{len(diff)} tensors differ in {sub or 'model'}, e.g. {diff[:3]}"


# ------------------------------------------------------------------------------- 6. keep_last
def test_keep_last_keeps_only_the_newest_checkpoints(runs):
    for run in (runs["A"], runs["B"]):
        names = sorted(p.name for p in run.iterdir() if p.name.startswith(("ckpt-", ".tmp")))
        assert names == ["ckpt-0000006", "ckpt-0000008"], run
        assert [p.name for p in list_checkpoints(run)] == names
        assert latest_checkpoint(run).name == "ckpt-0000008"


# --------------------------------------------------------------------------- 2. indexer warm-up
def test_indexer_warmup_raises_mass_recall_above_init_and_random(corpus, tokenizer, tmp_path):
    # seq_len 128, CSA m=4: up to 32 entries per query, of which the indexer keeps 4.
    over = [o for o in MODEL if not o.startswith(("index_topk", "compress_ratios"))] + [
        "index_topk=4",
        "compress_ratios=[4,4,16,0]",
        "seq_len=128",
        "batch_size=2",
        "progress=false",
        "dtype=fp32",
        "indexer_warmup_steps=40",
        "indexer_lr=3e-2",
        "log_every=10",
        "eval_every=1000",
        "ckpt_every=1000",
        "eval_batches=1",
        "seed=0",
    ]
    tr = Trainer.create(_tc(tmp_path / "run", corpus, tokenizer, 40), over)
    assert tr.mc.layer_kinds[:2] == ["csa", "csa"]
    vb = next(val_batches(tr.data.val_stream, 2, 128))

    def recall():
        rc = indexer_recall(tr.model, vb.input_ids, vb.segment_ids)
        assert sorted(rc) == [0, 1] and all(v["queries"] > 100 for v in rc.values())
        return (sum(v["recall"] for v in rc.values()) / len(rc), sum(v["random"] for v in rc.values()) / len(rc))

    init, rand = recall()
    tr.fit()
    after, rand2 = recall()
    assert rand2 == rand  # same seed, same visible sets
    stages = {r["stage"] for r in _metrics(tmp_path / "run") if r["kind"] == "train"}
    assert stages == {"indexer_warmup"}
    assert after > init + 0.02, (init, after, rand)
    assert after > rand + 0.02, (init, after, rand)


# ------------------------------------------------------------------------------ binary file
def test_binary_file_in_corpus_is_skipped_with_a_warning(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "blob.dat").write_bytes(bytes(range(256)) * 8)
    assert data / "blob.dat" in split_files(find_files(data), 0.05)[0]  # in the training split
    with pytest.warns(DataWarning, match=r"skipping 1 of \d+ files that are not UTF-8 text: .*blob\.dat \(binary\)"):
        final = train(_tc(tmp_path / "run", data, None, 2), SMALL)  # trains its own tokenizer too
    assert math.isfinite(final["val_bpb"])
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-0000002"


# ------------------------------------------------------------------------------- 5. NaN losses
def _nan_on(calls: set[int] | None):
    real = trainer_mod.lm_losses
    count = {"n": 0}

    def lm_losses(*args, **kwargs):
        lm, mtp = real(*args, **kwargs)
        i = count["n"]
        count["n"] += 1
        if calls is None or i in calls:
            lm = lm * float("nan")
        return lm, mtp

    return lm_losses


def test_nan_steps_are_skipped_and_training_continues(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "lm_losses", _nan_on({2, 3}))  # sparse from step 0: call i = step i
    real_step = Trainer.train_step
    unchanged = {}

    def watching_step(self, step):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        rec = real_step(self, step)
        unchanged[step] = all(torch.equal(before[n], p) for n, p in self.model.named_parameters())
        return rec

    monkeypatch.setattr(Trainer, "train_step", watching_step)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-finite"):
        final = train(_tc(run, corpus, tokenizer, 6), SMALL + ["indexer_warmup_steps=0", "max_bad_steps=3"])
    rows = {r["step"]: r for r in _metrics(run) if r["kind"] == "train"}
    assert sorted(rows) == list(range(6))
    assert [rows[s]["skipped"] for s in range(6)] == [False, False, True, True, False, False]
    assert all(math.isnan(rows[s]["loss"]) for s in (2, 3))
    assert all(math.isfinite(rows[s]["loss"]) for s in (0, 1, 4, 5))
    assert [unchanged[s] for s in range(6)] == [False, False, True, True, False, False]
    assert final["skipped"] == 2 and final["step"] == 6 and math.isfinite(final["val_bpb"])
    w = load_state_dict(latest_checkpoint(run))
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_too_many_consecutive_nan_steps_stop_the_run(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "lm_losses", _nan_on(None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(TrainingError, match=r"\b3 consecutive steps"):
            train(_tc(tmp_path / "run", corpus, tokenizer, 10), SMALL + ["indexer_warmup_steps=0", "max_bad_steps=3"])


# ----------------------------------------------------------- 4. interrupted checkpoint writes
def _tiny_model_and_optimizer():
    _, mc = apply_overrides(TrainConfig(), ModelConfig.preset("tiny"), MODEL)
    torch.manual_seed(0)
    model = Transformer(mc)
    model.init_weights(seed=0)
    opt = build_optimizer(model, 1e-3, 0.1)
    ids = torch.randint(2, 512, (1, 32))
    torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("fail_at", ["model", "optim", "rng", "rename"])
@pytest.mark.parametrize("cleanup", [True, False], ids=["exception", "killed"])
def test_interrupted_checkpoint_write_never_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, fail_at, cleanup):
    model, opt = _tiny_model_and_optimizer()
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, model, opt, {"marker": "one"})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save, real_replace, real_rmtree = weights_mod.save_file, os.replace, shutil.rmtree
    calls = {"n": 0}
    which = {"model": 0, "optim": 1, "rng": 2}

    def failing_save(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] - 1 == which.get(fail_at):
            real_save(dict(list(tensors.items())[:1]), filename, *a, **k)  # a partial file on disk
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, *a, **k)

    def failing_replace(src, dst, *a, **k):
        if fail_at == "rename" and Path(src).name.startswith(".tmp-ckpt-"):
            raise OSError("power cut (simulated)")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(weights_mod, "save_file", failing_save)
    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    if not cleanup:  # a killed process runs no cleanup: the temporary directory stays behind
        monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run, 2, model, opt, {"marker": "two"})
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)

    leftovers = [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert bool(leftovers) == (not cleanup)
    if fail_at == "rename" and not cleanup:
        assert (leftovers[0] / "state.json").exists()  # complete but unpublished: still ignored
    assert not (run / "ckpt-0000002").exists()
    assert all((p / "state.json").exists() for p in run.glob("ckpt-*"))
    assert list_checkpoints(run) == [first] and latest_checkpoint(run) == first

    fresh = Transformer(model.cfg)
    fresh_opt = build_optimizer(fresh, 1e-3, 0.1)
    state = load_checkpoint(latest_checkpoint(run), fresh, fresh_opt)
    assert state["marker"] == "one" and state["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

    # the next save works and pruning is not confused by a leftover temporary directory
    monkeypatch.undo()
    second = save_checkpoint(run, 3, model, opt, {"marker": "three"}, keep_last=1)
    assert list_checkpoints(run) == [second]


# -------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(trainer_mod.__file__).parents[2])}
    return subprocess.Popen(
        [sys.executable, "-m", "dsv4", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def cli(runs, corpus, tmp_path_factory):
    """All CLI invocations of this file, started together (each pays torch's import time) and awaited."""
    root = tmp_path_factory.mktemp("cli")
    empty = root / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("not a document")
    corrupt = root / "corrupt"
    shutil.copytree(runs["A"], corrupt, ignore=shutil.ignore_patterns("report"))
    newest = latest_checkpoint(corrupt) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    not_a_run = root / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    model_args = [o for o in SMALL if not o.startswith("progress")]
    procs = {
        "empty_data": _cli(
            "train", "--data", empty, "--out", root / "o1", "--steps", "2", "--no-progress", *model_args
        ),
        "unknown_field": _cli(
            "train", "--data", corpus, "--out", root / "o2", "--steps", "2", "--no-progress", *model_args, "foo=1"
        ),
        "corrupt_resume": _cli("train", "--out", corrupt, "--resume", "--no-progress"),
        "corrupt_generate": _cli("generate", "--ckpt", corrupt, "--prompt", "def ", "--max-new-tokens", "2"),
        "resume_not_a_run": _cli("train", "--out", not_a_run, "--resume", "--no-progress"),
        "no_such_device": _cli(
            "train",
            "--data",
            corpus,
            "--out",
            root / "o3",
            "--steps",
            "2",
            "--no-progress",
            "--device",
            "cuda:99",
            *model_args,
        ),
        "generate": _cli("generate", "--ckpt", runs["A"], "--prompt", "def ", "--max-new-tokens", "5"),
        "report": _cli("report", runs["A"]),
    }
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return {
        "results": results,
        "empty": empty,
        "corrupt": corrupt,
        "newest": newest.parent.name,
        "not_a_run": not_a_run,
        "root": root,
    }


@pytest.mark.parametrize(
    "case, facts",
    [
        ("empty_data", ["no text documents", "{empty}"]),
        ("unknown_field", ["unknown config field", "'foo'"]),
        ("corrupt_resume", ["corrupt", "{newest}"]),
        ("corrupt_generate", ["corrupt", "{newest}"]),
        ("resume_not_a_run", ["not a dsv4 run", "{not_a_run}"]),
        ("no_such_device", ["device=cuda:99"]),
    ],
)
def test_cli_bad_input_is_one_line_error_with_status_2(cli, case, facts):
    rc, _out, err = cli["results"][case]
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("dsv4: error:")
    for fact in facts:
        fact = fact.format(**{k: v for k, v in cli.items() if k != "results"})
        assert fact in lines[0], (fact, lines[0])


def test_cli_bad_input_leaves_no_checkpoints(cli):
    for out in ("o1", "o2", "o3"):
        assert list_checkpoints(cli["root"] / out) == []


def test_cli_generate_continues_the_prompt(cli):
    rc, out, err = cli["results"]["generate"]
    assert rc == 0, err[-2000:]
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")


def test_cli_report_writes_summary(cli, runs):
    rc, _out, err = cli["results"]["report"]
    assert rc == 0, err[-2000:]
    summary = runs["A"] / "report" / "summary.md"
    assert summary.exists() and summary.stat().st_size > 0


# ------------------------------------------------------------------------- dsv4 eval bpb
def test_eval_bpb_on_the_validation_files_equals_the_runs_final_validation(runs, corpus, tmp_path):
    """`dsv4 eval bpb` on a copy of the run's validation files, with the run's windows, reproduces the
    bpb the trainer logged at the end (same tokens, windows, byte accounting), and xz on the same bytes."""
    from dsv4.eval.text_bpb import bpb_on_text

    run = runs["A"]
    tc = TrainConfig.from_json(run / "train_config.json")
    _, val_files = split_files(find_files(corpus), tc.val_fraction)
    folder = tmp_path / "val"
    folder.mkdir()
    for f in val_files:
        shutil.copy(f, folder / f.name)
    final = [r for r in _metrics(run) if r["kind"] == "final"][-1]
    r = bpb_on_text(run, folder, seq_len=tc.seq_len, batch_size=tc.batch_size, progress=False)
    assert r["bytes"] == final["val_bytes"]
    assert abs(r["bpb"] - final["val_bpb"]) < 1e-5
    assert abs(r["xz_bpb"] - final["xz_bpb"]) < 1e-9
    capped = bpb_on_text(run, folder, seq_len=16, batch_size=2, max_tokens=40, progress=False)
    assert capped["tokens"] == 64 and capped["bytes"] < r["bytes"]  # 2 batches of 2 x 16 targets


def test_cli_eval_bpb_prints_the_demo_line_and_rejects_bad_input(runs, corpus, tmp_path):
    out_json = tmp_path / "bpb.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv4",
            "eval",
            "bpb",
            "--ckpt",
            str(runs["A"]),
            "--data",
            str(corpus),
            "--seq-len",
            "64",
            "--max-tokens",
            "256",
            "--quiet",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("bits per byte:")]
    assert len(line) == 1 and "xz -9 on the same" in line[0]
    assert json.loads(out_json.read_text())["tokens"] == 256
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsv4",
            "eval",
            "bpb",
            "--ckpt",
            str(runs["A"]),
            "--data",
            str(tmp_path / "missing"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dsv4: error:") and "missing" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------- the demo
def test_train_demo_runs_a_fixed_step_budget_and_prints_the_bpb_line(corpus, tmp_path, monkeypatch):
    """`dsv4 demo` trains a fixed number of steps (not a wall-clock budget) with pinned settings, then
    reports, samples and prints the bpb line in its documented form. Small model and corpus here."""
    import dsv4.app.train_demo as demo

    assert demo.DEMO_STEPS > 0 and demo.DEMO_CONFIG["dtype"] in ("fp32", "bf16")
    monkeypatch.setattr(demo, "DEMO_STEPS", 3)
    monkeypatch.setitem(demo.DEMO_CONFIG, "final_eval_tokens", 2048)
    lines = []
    res = demo.run_train_demo(
        out=str(tmp_path / "demo"),
        overrides=[
            f"data={corpus}",
            "progress=false",
            "compile=off",
            "seq_len=64",
            "batch_size=2",
            *MODEL,
            "compress_ratios=[0,4,16]",
        ],
        print_fn=lines.append,
    )
    assert res["step"] == 3
    rows = _metrics(tmp_path / "demo")
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 2  # train records count from 0
    bpb_line = [x for x in lines if x.startswith("validation bits per byte:")]
    assert len(bpb_line) == 1 and "xz -9 on the same" in bpb_line[0]
    assert TrainConfig.from_json(tmp_path / "demo" / "train_config.json").steps == 3


def test_resume_keeps_or_changes_the_device_and_rejects_a_missing_one(tmp_path):
    """--resume without --device keeps the run's own device; a device this machine lacks is a one-line
    ConfigError before any data or model is touched (here a run saved with device=cuda:99)."""
    from dsv4.config import ConfigError
    from dsv4.train.config import TrainConfig

    run = tmp_path / "r"
    run.mkdir()
    TrainConfig(out=str(run), steps=2, device="cuda:99").to_json(run / "train_config.json")
    ModelConfig.preset("tiny").to_json(run / "model_config.json")
    with pytest.raises(ConfigError, match="device=cuda:99"):
        trainer_mod.Trainer.create(TrainConfig(out=str(run), progress=False, device=""), resume=True)
    with pytest.raises(ConfigError, match="device=cuda:98"):
        trainer_mod.Trainer.create(TrainConfig(out=str(run), progress=False, device="cuda:98"), resume=True)


@pytest.mark.parametrize("ns_dtype, bf16", [("fp32", False), ("bf16", True)])
def test_ns_dtype_sets_muons_newton_schulz_precision_and_resume_keeps_it(corpus, tokenizer, tmp_path, ns_dtype, bf16):
    """ns_dtype reaches every Muon group of the optimiser; --resume takes the precision saved with the
    optimiser state even when the run's config now says otherwise (as ns_dtype=auto may measure otherwise on
    another machine), so a resumed run continues exactly; a bad value is a ConfigError."""
    from dsv4.config import ConfigError

    over = [o for o in SMALL if not o.startswith("ns_dtype")] + [f"ns_dtype={ns_dtype}"]
    run = tmp_path / "run"
    train(_tc(run, corpus, tokenizer, 2), over)
    saved = TrainConfig.from_json(run / "train_config.json")
    saved.ns_dtype = "bf16" if ns_dtype == "fp32" else "fp32"
    saved.to_json(run / "train_config.json")
    tr = Trainer.create(TrainConfig(out=str(run), progress=False), resume=True)
    muon = [g for g in tr.optimizer.param_groups if g["algorithm"] == "muon"]
    assert muon and all(g["ns_bf16"] is bf16 for g in muon)
    with pytest.raises(ConfigError, match="ns_dtype='fp16'"):
        TrainConfig(steps=2, ns_dtype="fp16").validate()


# ------------------------------------------------- short budgets, planning, progress (issue 13, items 1, 9, 11)
@pytest.mark.parametrize(
    "total, has_indexer, warm, lr_warm",
    [(17, True, 1, 1), (60, True, 6, 5), (240, True, 24, 20), (1000, True, 30, 20), (17, False, 0, 1), (5, True, 0, 1)],
)
def test_warmups_scale_with_the_planned_steps(total, has_indexer, warm, lr_warm):
    """Left at None, the indexer warm-up is min(30, 10% of the run) and the LR warm-up min(20, 10% of the LM
    stage); an explicit length is kept (the indexer's capped at the run)."""
    assert trainer_mod.stage_plan(total, TrainConfig(steps=total), has_indexer) == (warm, lr_warm)
    assert trainer_mod.stage_plan(total, TrainConfig(steps=total, indexer_warmup_steps=40, warmup_steps=3), True) == (
        min(40, total),
        3,
    )


def test_a_short_run_trains_the_language_model_and_says_its_budget_is_small(corpus, tokenizer, tmp_path, capsys):
    """17 steps used to be all indexer warm-up at a rising LR (ending at the random model's loss): now 15 of
    them train the LM at the full LR, the LM loss falls, and a one-line notice says the budget is small."""
    over = [o for o in SMALL if not o.startswith(("indexer_warmup_steps", "warmup_steps"))]
    run = tmp_path / "run"
    train(_tc(run, corpus, tokenizer, 17), over)
    rows = [r for r in _metrics(run) if r["kind"] == "train"]
    stages = [r["stage"] for r in rows]
    assert stages.count("indexer_warmup") == 1 and stages.count("sparse") == 16
    lm = [r["lm_loss"] for r in rows if r["stage"] == "sparse"]
    assert max(r["lr"] for r in rows) == pytest.approx(TrainConfig().lr)
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.15, lm
    err = capsys.readouterr().err
    notices = [x for x in err.splitlines() if "too few to train" in x]
    assert len(notices) == 1 and notices[0].startswith("dsv4: warning: a budget of 17 steps gives only 16")


def test_progress_bar_shows_the_lm_loss_and_the_indexer_kl_apart():
    warm = {"stage": "indexer_warmup", "loss": 0.19, "indexer_loss": 0.19, "lr": 1e-3}
    sparse = {"stage": "sparse", "loss": 6.9, "lm_loss": 6.5, "indexer_loss": 0.2, "lr": 2e-3, "tok_per_s": 900.0}
    assert trainer_mod.progress_fields(warm) == {"stage": "indexer warm-up", "indexer_kl": "0.190", "lr": "1.0e-03"}
    assert trainer_mod.progress_fields(sparse) == {
        "lm_loss": "6.500",
        "indexer_kl": "0.200",
        "lr": "2.0e-03",
        "tok/s": "900",
    }


def test_a_minutes_run_is_planned_before_its_first_step_without_changing_the_run(
    corpus, tokenizer, tmp_path, monkeypatch, capsys
):
    """A --minutes run knows its length (so the bar has a total and an ETA) before step 0: probe steps time
    both stages at lr 0 and put every piece of state back, so its steps equal those of a --steps run of the
    planned length, loss for loss. Reaching the budget is no warning."""
    totals = []
    real_step = Trainer.train_step

    def recording_step(self, step):
        totals.append(self.state["total_steps"])
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    over = [o for o in SMALL if not o.startswith(("indexer_warmup_steps", "warmup_steps"))]
    a = tmp_path / "minutes"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(TrainConfig(data=str(corpus), out=str(a), tokenizer=str(tokenizer), minutes=0.25, progress=False), over)
    planned = totals[0]
    assert planned is not None and planned >= 2 and all(t <= planned for t in totals)
    assert f"planned {planned} steps for 0.25 minutes" in capsys.readouterr().out
    la = _train_losses(a)
    b = tmp_path / "steps"
    saved = TrainConfig.from_json(a / "train_config.json")
    assert saved.steps is None and saved.minutes == 0.25
    train(_tc(b, corpus, tokenizer, planned), over)
    lb = _train_losses(b)
    common = sorted(set(la) & set(lb))
    assert len(common) >= 2 and all(la[s] == lb[s] for s in common), (la, lb)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=abc", "override lr='abc': expected a number"),
        ("doc_mask=maybe", "override doc_mask='maybe': expected a boolean"),
        ("steps=ten", "override steps='ten': expected an integer"),
        ("seed=1.5", "override seed='1.5': expected an integer"),
    ],
)
def test_a_bad_training_override_names_its_key(override, message):
    from dsv4.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(TrainConfig(), ModelConfig.preset("tiny"), [override])


@pytest.mark.parametrize(
    "names, message",
    [
        (["a.dat"], "no text documents in {data}: none of its 1 files is UTF-8 text"),
        (
            ["a.dat", "b.dat", "c.py"],
            "need at least 2 text files in {data} to split into train and validation, found 1",
        ),
    ],
)
def test_a_corpus_without_enough_text_fails_clearly_and_leaves_no_run_folder(tmp_path, names, message):
    """Text is checked before the tokenizer: binary files are counted in one warning, the error says what
    is missing, and the --out folder the failed start created is removed again."""
    from dsv4.data import DataError

    data = tmp_path / "data"
    data.mkdir()
    for n in names:
        (data / n).write_bytes(b"def f():\n    return 1\n" if n.endswith(".py") else bytes(range(256)))
    out = tmp_path / "new" / "run"
    with (
        pytest.warns(DataWarning, match=r"skipping \d of \d files that are not UTF-8 text: .*a\.dat \(binary\)"),
        pytest.raises(DataError, match=re.escape(message.format(data=data))),
    ):
        train(_tc(out, data, None, 2), SMALL)
    assert not (tmp_path / "new").exists()
