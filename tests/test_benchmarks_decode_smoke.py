"""Smoke test for benchmarks/decode.py (eager step, toy sizes) and its bytes-per-step accounting; the
`wide` preset reads >= 300 MB of weights per decode token and stays small in total."""

import json
import math
import re

import pytest
import torch
from conftest import load_benchmark

from dsv4.config import ModelConfig
from dsv4.flops import build_meta_model, count_params

RESULT_NAMES = ["decode_vs_transformers_b1", "decode_flatness_1k_128k", "decode_b8_over_b1", "decode_mbu"]


def test_decode_benchmark_smoke(tmp_path, capsys):
    bench = load_benchmark("decode")
    out = tmp_path / "decode.json"
    assert (
        bench.main(
            [
                "--eager",
                "--contexts",
                "48",
                "96",
                "--batches",
                "1",
                "2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--wide-context",
                "16",
                "--wide-steps",
                "1",
                "--mtp-tokens",
                "3",
                "--json",
                str(out),
                "--plot",
                str(tmp_path / "d.png"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    tail = lines[-4:]
    for name, line in zip(RESULT_NAMES, tail, strict=True):
        assert re.fullmatch(rf"RESULT {name} (nan|\d+(\.\d+)?) \(goal [\d.]+\)", line), line
    res = json.loads(out.read_text())
    assert [(c["context"], c["batch"]) for c in res["cases"]] == [(48, 1), (48, 2), (96, 1), (96, 2)]
    assert all(c["tok_s"] > 0 and c["bytes"]["total"] > c["bytes"]["weights"] > 0 for c in res["cases"])
    assert (tmp_path / "d.png").stat().st_size > 0
    r = res["results"]
    assert r["decode_flatness_1k_128k"] > 0 and r["decode_b8_over_b1"] > 0 and 0 < r["decode_mbu"] < 5
    assert res["wide"]["active_weight_mb"] >= 300 and "dsv4 wide" in text
    assert "aten ops per decode step" in text and res["cases"][0]["ops_eager"]["all"] > 0
    assert "1K context not run" in text and "128K not run" in text  # the table says what was substituted
    try:
        import transformers

        has_hf = hasattr(transformers, "DeepseekV4ForCausalLM")
    except ImportError:
        has_hf = False
    assert (not math.isnan(r["decode_vs_transformers_b1"])) == has_hf
    assert ("transformers (eager)" in text) == has_hf


def test_step_bytes_counts_each_weight_once():
    bench = load_benchmark("decode")
    cfg = ModelConfig.preset("tiny")
    model = build_meta_model(cfg)
    pc = count_params(cfg, model)
    # batch 1: the active parameters (k of E routed experts) + one embedding row, fp32
    assert bench.weight_bytes(model, 1) == pytest.approx(4 * (pc["active"] + cfg.hidden_size))
    # a large batch touches every expert: all main-model weights but the embedding, + B rows
    emb = pc["components"]["embedding"]
    assert bench.weight_bytes(model, 64) == pytest.approx(4 * (pc["total"] - emb + 64 * cfg.hidden_size), rel=1e-3)
    fp32, bf16 = bench.cache_bytes(cfg, 1024, None), bench.cache_bytes(cfg, 1024, torch.bfloat16)
    assert fp32 == 2 * bf16 > bench.cache_bytes(cfg, 1024, "fp8") > 0
    assert bench.cache_bytes(cfg, 4096, None) > fp32


def test_wide_preset_reads_far_more_than_the_cpu_cache():
    cfg = ModelConfig.preset("wide")
    pc = count_params(cfg)
    assert 4 * pc["active"] >= 300e6  # weights read per decode token, fp32
    assert 4 * pc["total_with_mtp"] <= 1.5e9  # small enough to build in seconds
    assert set(cfg.layer_kinds) == {"swa", "csa", "hca"} and cfg.n_routed_experts > cfg.num_experts_per_tok
