import json
import math
import os
import time
from argparse import Namespace

import pytest
import torch

from dsv4.eval.bpb import bits_per_byte, xz_bits_per_byte
from dsv4.flops import flops_breakdown, flops_per_token, measure_copy_bandwidth, measure_matmul_peak, mfu

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run_dir, n_steps=60, n_moe=3, n_idx=2):
    lines = []
    for s in range(1, n_steps + 1):
        row = {
            "kind": "train",
            "step": s,
            "tokens": s * 4096,
            "loss": 6.0 * math.exp(-s / 30) + 2.0,
            "lm_loss": 5.5 * math.exp(-s / 30) + 1.9,
            "lr": 3e-4 * min(1.0, s / 10),
            "grad_norm": 1.0 + 5.0 / s,
            "tok_per_s": 1000.0 + (s % 7),
            "mfu": 0.31,
            "maxvio": [0.5 / (1 + 0.1 * s * (j + 1)) for j in range(n_moe)],
            "mhc_gain_fwd": 1.2,
            "mhc_gain_bwd": 1.4,
            "skipped": s == 17,
            "some_unknown_key": "x",
        }
        if s % 3:
            row.pop("lm_loss")  # keys may be missing
        if s == 5:
            row.pop("grad_norm")
            row["loss"] = float("nan")  # not a plottable number
        if s > 2:
            row["mtp_loss"] = 0.3 * row["loss"] if math.isfinite(row["loss"]) else None
            row["aux_loss"] = 1e-3
        lines.append(json.dumps(row))
        if s % 20 == 0:
            val = {
                "kind": "val",
                "step": s,
                "val_loss": 2.5 + 10 / s,
                "val_bpb": 1.3 + 5 / s,
                "indexer_recall": [0.6 + 0.005 * s, 0.55 + 0.004 * s],
                "random_recall": [0.25] * n_idx,
            }
            if s == 40:
                val.pop("indexer_recall")
            lines.append(json.dumps(val))
    lines.append("not json {")
    lines.append(json.dumps({"kind": "final", "step": n_steps, "xz_bpb": 2.1234, "val_bpb": 1.3833, "wall_s": 3725.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_write_report(tmp_path):
    from dsv4.eval.report import main_report, write_report

    _synthetic_run(tmp_path)
    summary = write_report(tmp_path)
    assert summary == tmp_path / "report" / "summary.md"
    expected = [
        "loss.png",
        "loss_terms.png",
        "bpb.png",
        "lr.png",
        "grad_norm.png",
        "maxvio.png",
        "mhc_gain.png",
        "indexer_recall.png",
        "throughput.png",
    ]
    text = summary.read_text()
    for name in expected:
        png = tmp_path / "report" / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in text, name  # embedded by relative path
    assert "2.1234" in text  # xz bpb
    assert "1.3833" in text  # final val bpb (also the best one)
    assert "xz" in text and "bpb" in text
    assert "| skipped steps | 1 |" in text
    assert "1h 02m 05s" in text  # wall time from the final line
    assert "31.00%" in text  # mean MFU
    assert "unreadable metrics lines | 1" in text
    # the CLI hook writes the same thing
    assert main_report(Namespace(run_dir=str(tmp_path))) == 0


def test_report_sparse_metrics(tmp_path):
    """Only a loss column: the loss plot and a summary with n/a for the rest, nothing crashes."""
    from dsv4.eval.report import write_report

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 5))
    )
    summary = write_report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == ["loss.png"]
    assert "| best val bpb | n/a |" in summary.read_text()


def test_report_missing_metrics(tmp_path):
    from dsv4.eval.report import write_report

    with pytest.raises(FileNotFoundError):
        write_report(tmp_path)


def test_bits_per_byte_known_case():
    # 1000 bytes at exactly 1 bit each: 1000 * ln 2 nats
    assert bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0, rel=1e-12)
    # uniform over 256 byte values, one token per byte: ln 256 nats per byte = 8 bits
    assert bits_per_byte(500 * math.log(256), 500) == pytest.approx(8.0, rel=1e-12)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_xz_bits_per_byte():
    assert xz_bits_per_byte(b"the same sentence again and again. " * 3000) < 1.0
    assert xz_bits_per_byte(os.urandom(200_000)) > 7.9
    with pytest.raises(ValueError):
        xz_bits_per_byte(b"")


def test_measure_matmul_peak_fast():
    t0 = time.perf_counter()
    peak = measure_matmul_peak(torch.float32, n=256, seconds=0.2, device="cpu")
    assert math.isfinite(peak) and peak > 0
    assert time.perf_counter() - t0 < 3.0


def test_measure_copy_bandwidth_fast():
    bw = measure_copy_bandwidth(nbytes=4 * 2**20, seconds=0.1, device="cpu")
    assert math.isfinite(bw) and bw > 0


def test_flops_per_token_and_mfu():
    from conftest import small_config

    cfg = small_config()
    b = flops_breakdown(cfg, 256)
    assert b["matmul"] == 6 * b["n_active"]
    assert b["total"] == pytest.approx(b["matmul"] + b["attention"] + b["indexer"])
    assert flops_per_token(cfg, 256, training=False) == pytest.approx(b["total"] / 3)
    # an all-SWA model with window >= seq_len attends to (T+1)/2 keys on average
    swa = cfg.replace(compress_ratios=[0] * 5, sliding_window=64)
    s = flops_breakdown(swa, 64, include_mtp=False)
    layers = swa.num_hidden_layers
    assert s["attention"] == pytest.approx(3 * 4 * swa.num_attention_heads * swa.head_dim * 32.5 * layers)
    assert s["indexer"] == 0
    # longer contexts cost more through the attention term only
    assert flops_per_token(cfg, 4096) > flops_per_token(cfg, 256)
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


def test_warmup_flops_count_what_an_indexer_warmup_step_computes():
    """A warm-up step: forward without LM head or MTP, dense attention over every visible entry, the
    indexers' scoring forward + backward and their own weights' backward; far less than a training step
    (warm-up MFU was reported at 150-210% when counted as one)."""
    from conftest import small_config

    from dsv4.flops import count_params

    cfg = small_config()
    comp = count_params(cfg)["components"]
    w = flops_breakdown(cfg, 256, stage="warmup")
    assert w["n_active"] == count_params(cfg)["active"] - comp["head"]
    assert w["matmul"] == 2 * w["n_active"] + 4 * comp["attention.indexer"]
    assert w["indexer"] == pytest.approx(flops_breakdown(cfg, 256, include_mtp=False)["indexer"])  # fwd + bwd
    assert w["attention"] > flops_breakdown(cfg, 256, training=False, include_mtp=False)["attention"]  # dense
    assert w["total"] < 0.5 * flops_per_token(cfg, 256)
    assert flops_per_token(cfg, 256, stage="warmup") == w["total"]
    with pytest.raises(ValueError, match="stage"):
        flops_breakdown(cfg, 256, stage="dense")
