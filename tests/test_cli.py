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
from dsv4.info import count_params

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
    for argv in (["info"], ["info", "--preset", "tiny", "--config", "x.json"],
                 ["convert", "--from-transformers", "a", "--to-transformers", "b", "out"], []):
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
    from dsv4.demo import run_demo

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
