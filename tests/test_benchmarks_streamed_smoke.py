"""Smoke test for benchmarks/streamed_experts.py: every variant decodes a few tokens of a small model."""

import math

from conftest import load_benchmark


def test_streamed_experts_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the benchmark writes its checkpoint under the working directory
    bench = load_benchmark("streamed_experts")
    out = tmp_path / "res.json"
    args = ["--experts", "8", "--topk", "2", "--hidden", "64", "--prompt", "8", "--decode", "3", "--json", str(out)]
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    results = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert [r.split()[1] for r in results] == [
        "expert_cache_over_budget",
        "streamed_resident_over_resident",
        "streamed_warm_decode_vs_resident",
        "read_ahead_guess_rate",
        "read_ahead_cold_speedup",
    ]
    assert all(math.isfinite(float(r.split()[2])) for r in results)
    assert float(results[0].split()[2]) <= 1.0
    assert not list(tmp_path.glob("tmp*"))  # the checkpoint is deleted
