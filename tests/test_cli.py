"""The `dsv4` command: info output, error handling, argument parsing, the demo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.cli import build_parser, main
from dsv4.config import ModelConfig
from dsv4.flops import count_params

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args, exe=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dsv4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_info_tiny_prints_exact_counts():
    r = run_cli("info", "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    values = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and line[0] != " ")
    c = count_params(ModelConfig.preset("tiny"))
    assert int(values["total_params"]) == c["total"]
    assert int(values["active_params"]) == c["active"]
    assert int(values["total_params_with_mtp"]) == c["total_with_mtp"]
    assert "layer schedule:" in r.stdout and "kv_bytes_per_token:" in r.stdout


def test_unknown_preset_is_a_one_line_error():
    r = run_cli("info", "--preset", "no-such-model")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: ")
    assert "no-such-model" in lines[0] and "tiny" in lines[0]  # names the available presets


def test_invalid_config_names_the_field(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d["o_groups"] = 3  # tiny has 4 heads
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    r = run_cli("info", "--config", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: ") and "o_groups" in lines[0]
    assert "Traceback" not in r.stderr


def test_config_file_and_directory(tmp_path, capsys):
    ModelConfig.preset("tiny").to_json(tmp_path / "config.json")
    for target in (tmp_path / "config.json", tmp_path):
        assert main(["info", "--config", str(target)]) == 0
        assert "total_params: " in capsys.readouterr().out


def test_missing_config_file(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4: error: ") and err.count("\n") == 1


def test_argument_errors_exit_2(capsys):
    for argv in (
        ["info"],
        ["info", "--preset", "tiny", "--config", "x.json"],
        ["convert", "--from-transformers", "a", "--to-transformers", "b", "out"],
        [],
    ):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_convert_arguments():
    a = build_parser().parse_args(["convert", "--from-transformers", "hf_dir", "out_dir"])
    assert (a.from_transformers, a.to_transformers, a.out) == ("hf_dir", None, "out_dir")
    a = build_parser().parse_args(["convert", "--to-transformers", "dsv4_dir", "out_dir"])
    assert (a.from_transformers, a.to_transformers, a.out) == (None, "dsv4_dir", "out_dir")


def test_convert_calls_the_library(monkeypatch, tmp_path, capsys):
    import types

    calls = []
    fake = types.ModuleType("dsv4.convert.transformers")
    fake.convert_from_transformers_dir = lambda src, out: calls.append(("from", src, out))
    fake.convert_to_transformers_dir = lambda src, out: calls.append(("to", src, out))
    pkg = types.ModuleType("dsv4.convert")
    pkg.transformers = fake
    monkeypatch.setitem(sys.modules, "dsv4.convert", pkg)
    monkeypatch.setitem(sys.modules, "dsv4.convert.transformers", fake)
    assert main(["convert", "--from-transformers", "a", "b"]) == 0
    assert main(["convert", "--to-transformers", "c", "d"]) == 0
    assert calls == [("from", "a", "b"), ("to", "c", "d")]
    capsys.readouterr()


def test_demo_runs(capsys):
    from dsv4.app.demo import run_demo

    lines = []
    res = run_demo(seq_len=16, new_tokens=2, batch=1, print_fn=lines.append)
    cfg = ModelConfig.preset("tiny")
    assert res["logits_shape"] == (1, 16, cfg.vocab_size)
    assert len(res["generated"]) == 2 and all(0 <= t < cfg.vocab_size for t in res["generated"])
    assert 0 < res["loss"] < 3 * __import__("math").log(cfg.vocab_size)
    assert any("tokens/s" in line for line in lines)


def test_console_script_if_installed():
    exe = shutil.which("dsv4", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("dsv4 console script not installed next to this python")
    r = run_cli("info", "--preset", "tiny", exe=exe)
    assert r.returncode == 0 and "total_params: " in r.stdout


def test_convert_round_trip_through_the_cli(tmp_path, capsys):
    import torch
    from conftest import small_config

    from dsv4.model.transformer import Transformer
    from dsv4.weights import load_state_dict, save_model

    torch.manual_seed(0)
    model = Transformer(small_config())
    save_model(model, tmp_path / "dsv4")
    assert main(["convert", "--to-transformers", str(tmp_path / "dsv4"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-transformers", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, b = load_state_dict(tmp_path / "dsv4"), load_state_dict(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", "--to-transformers", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("dsv4: error: ")


def _status(argv) -> int:
    """main()'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_line_error(capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: ") and "Traceback" not in cap.err, cap.err
    return lines[0]


def test_version(capsys):
    from importlib.metadata import version

    import dsv4

    assert _status(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dsv4 {version('dsv4')}"
    assert version("dsv4") == dsv4.__version__


def test_closed_stdout_is_not_a_traceback():
    """`dsv4 info --preset v4-flash | head -3` when head has gone: no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    p = subprocess.run(
        [sys.executable, "-m", "dsv4", "info", "--preset", "v4-flash"],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
    )
    os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


@pytest.mark.parametrize(
    "argv, fact",
    [
        (["eval", "indexer-recall", "--ckpt", "runs/none", "--seq-len", "0"], "seq_len=0: must be >= 2"),
        (["eval", "indexer-recall", "--ckpt", "runs/none", "--batches", "0"], "batches=0: must be >= 1"),
        (["serve", "--ckpt", "r", "--port", "-1"], "argument --port: must be an integer >= 0 and <= 65535, got '-1'"),
        (["serve", "--ckpt", "r", "--max-batch", "0"], "argument --max-batch: must be an integer >= 1, got '0'"),
        (["serve", "--ckpt", "r", "--max-waiting", "-1"], "argument --max-waiting: must be an integer >= 0"),
        (["serve", "--ckpt", "r", "--prefill-chunk", "0"], "argument --prefill-chunk: must be an integer >= 1"),
        (
            ["serve", "--ckpt", "r", "--default-max-tokens", "0"],
            "argument --default-max-tokens: must be an integer >= 1",
        ),
        (["serve", "--ckpt", "r", "--max-context", "-5"], "argument --max-context: must be an integer >= 1"),
        (["generate", "--ckpt", "r", "--prompt", "x", "--max-context", "0"], "argument --max-context"),
        (["chat", "--ckpt", "r", "--max-context", "x"], "argument --max-context: must be an integer >= 1, got 'x'"),
        (["demo", "--steps", "0"], "argument --steps: must be an integer >= 1"),
        (["demo", "--minutes", "0"], "argument --minutes: must be a number > 0"),
        (["demo", "--random", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer >= 0"),
        (["demo", "--random", "--temperature", "-0.5"], "argument --temperature: must be a number >= 0"),
        (["demo", "--random", "--temperature", "nan"], "argument --temperature: must be a number >= 0"),
        (["train", "--out", "runs/none", "--steps", "-3"], "argument --steps: must be an integer >= 1"),
        (["train", "--out", "runs/none", "--minutes", "-1"], "argument --minutes: must be a number > 0"),
        (["eval", "bpb", "--ckpt", "runs/none", "--data", "x", "--batch-size", "0"], "batch_size=0 must be >= 1"),
        (["info"], "info: one of the arguments --preset --config is required"),
    ],
)
def test_meaningless_numbers_are_one_line_errors(argv, fact, capsys):
    assert _status(argv) == 2
    assert fact in _one_line_error(capsys)


def test_demo_takes_max_new_tokens_and_the_old_tokens_flag():
    parse = build_parser().parse_args
    assert parse(["demo", "--random"]).max_new_tokens == 16
    assert parse(["demo", "--random", "--max-new-tokens", "3"]).max_new_tokens == 3
    assert parse(["demo", "--random", "--tokens", "5"]).max_new_tokens == 5
    assert "--tokens" not in build_parser()._subparsers._group_actions[0].choices["demo"].format_help()


def test_report_takes_the_run_as_positional_or_ckpt(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("dsv4.eval.report.main_report", lambda args: seen.append(args.run_dir) or 0)
    assert main(["report", "runs/a"]) == 0 and main(["report", "--ckpt", "runs/b"]) == 0
    assert main(["report", "runs/c", "--ckpt", "runs/c"]) == 0
    assert seen == ["runs/a", "runs/b", "runs/c"]
    assert main(["report", "runs/a", "--ckpt", "runs/b"]) == 2
    assert "two run directories" in _one_line_error(capsys)
    assert main(["report"]) == 2
    assert "needs a run directory" in _one_line_error(capsys)


@pytest.fixture
def saved_run(tmp_path):
    """A run folder as the trainer leaves it (its saved configs; no training needed to check flags)."""
    from dsv4.train.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "corpus").mkdir()
    TrainConfig(out=str(run), steps=8, data=str(tmp_path / "corpus"), seq_len=64).to_json(run / "train_config.json")
    ModelConfig.preset("tiny").to_json(run / "model_config.json")
    return run


def test_resume_rejects_flags_that_disagree_with_the_saved_run(saved_run, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        "dsv4.train.trainer.train",
        lambda tc, overrides, resume: calls.append((tc, resume)) or {"val_bpb": 1.0, "xz_bpb": 2.0},
    )
    argv = ["train", "--out", str(saved_run), "--resume", "--no-progress"]
    assert (
        main(
            [
                *argv,
                "--data",
                "/nonexistent",
                "--preset",
                "v4-pro",
                "--steps",
                "20",
                "lr=0.5",
                "seq_len=64",
                "hidden_size=128",
            ]
        )
        == 2
    )
    err = _one_line_error(capsys)
    for fact in (
        "--data /nonexistent (saved: ",
        "--preset v4-pro (saved: tiny)",
        "--steps 20 (saved: 8)",
        "lr=0.5 (saved: lr=0.002)",
        "hidden_size=128 (saved: hidden_size=256)",
    ):
        assert fact in err, (fact, err)
    assert "seq_len" not in err and calls == []
    # flags equal to the saved values (a relative --data included) are fine, and so are --device/--no-progress
    monkeypatch.chdir(saved_run.parent)
    assert main([*argv, "--data", "corpus", "--preset", "tiny", "--steps", "8", "seq_len=64", "--device", "cpu"]) == 0
    assert len(calls) == 1 and calls[0][1] is True and calls[0][0].device == "cpu"
    capsys.readouterr()


def test_resume_with_an_unknown_key_is_a_one_line_error(saved_run, capsys):
    assert main(["train", "--out", str(saved_run), "--resume", "no_such_field=1"]) == 2
    assert "no_such_field" in _one_line_error(capsys)


def test_warnings_are_one_line_without_a_source_line(tmp_path, capsys):
    """A data warning on the command line is one `dsv4: warning:` line (no `warnings.warn(...)` source
    line), and a corpus with one text file is a clear error (issue: "need at least 2 documents")."""
    import warnings

    data = tmp_path / "data"
    data.mkdir()
    (data / "blob.dat").write_bytes(bytes(range(256)))
    (data / "a.py").write_text("x = 1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert (
            main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 2
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("dsv4: warning: skipping 1 of 2 files that are not UTF-8 text: ") and "blob.dat" in err[0]
    assert err[1].startswith("dsv4: error: need at least 2 text files in ") and len(err) == 2
    assert not (tmp_path / "run").exists()
