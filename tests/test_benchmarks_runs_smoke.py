"""Smoke tests for benchmarks/million_tokens.py and benchmarks/engram_offload.py at toy sizes."""

import json

from conftest import load_benchmark


def test_million_tokens_smoke(tmp_path):
    bench = load_benchmark("million_tokens")
    out, png = tmp_path / "mt.json", tmp_path / "mt.png"
    assert (
        bench.main(
            [
                "--tokens",
                "1500",
                "--chunk",
                "512",
                "--decode",
                "3",
                "--probe-at",
                "512",
                "1500",
                "--probe-steps",
                "2",
                "--threads",
                "1",
                "--no-progress",
                "--json",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    # chunks tile the context exactly, probes split them
    ends = [c["end"] for c in res["chunks"]]
    assert res["chunks"][0]["start"] == 0 and ends[-1] == 1500 and 512 in ends
    assert all(a["end"] == b["start"] for a, b in zip(res["chunks"], res["chunks"][1:]))
    assert set(res["probes"]) == {"512", "1500"} and all(v > 0 for v in res["probes"].values())
    assert res["decode_ms_per_token"] > 0 and res["decode_ratio_last_to_first"] > 0
    c = res["cache"]
    assert c["context"] == 1500 + 3 and c["held_bytes_per_token"] > 0
    assert 3000 < c["v4_flash_served_bytes_per_token"] < 4000  # ~3.5 KB as served
    assert png.stat().st_size > 1000
    assert (tmp_path / "mt.json.partial").exists()


def test_engram_offload_smoke(tmp_path):
    bench = load_benchmark("engram_offload")
    out = tmp_path / "eo.json"
    assert (
        bench.main(
            [
                "--table-gb",
                "0.004",
                "--text-mb",
                "0.05",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--batch",
                "1",
                "--seq",
                "32",
                "--decode-tokens",
                "3",
                "--work",
                str(tmp_path / "w"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert [c["case"] for c in res["cases"]] == ["ram", "mmap", "mmap+prefetch", "mmap+prefetch+hot", "ram"]
    for c in res["cases"]:
        assert c["train_tok_s"] > 0 and c["decode_tok_s"] > 0, c["case"]
    for c in res["cases"][1:-1]:
        assert "train_cost" in c and "decode_cost" in c
    assert res["ram_baseline"]["train_tok_s"] > 0
    hot = res["cases"][-2]
    rates = [v for k, v in hot.items() if k.endswith("hit_rate")]
    assert rates and all(0 <= r <= 1 for r in rates)
    tables = list((tmp_path / "w" / "tables").rglob("*.npy"))
    assert tables and sum(p.stat().st_size for p in tables) >= 0.9 * 0.004 * 2**30
