"""Smoke test for benchmarks/train_throughput.py: every variant runs one tiny training step."""

import json
import math

from conftest import load_benchmark


def test_train_throughput_smoke(tmp_path):
    bench = load_benchmark("train_throughput")
    out = tmp_path / "bench.json"
    args = bench.parse_args(
        [
            "--batch",
            "1",
            "--seq",
            "64",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--no-compile",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    res = bench.run(args)

    expected = {"dense/adamw", "dsv4/adamw/mtp", "dsv4/adamw/no-mtp", "dsv4/muon/mtp", "dsv4/muon/no-mtp"}
    assert set(res["tokens_per_s"]) == expected
    for name, tps in res["tokens_per_s"].items():
        assert tps > 0 and math.isfinite(tps), name
        r = res["results"][name]
        assert r["params"] > 0
        assert r["ratio_to_dense"] > 0
        assert all(math.isfinite(x) for x in r["losses"]), name
    # the baseline is the ~6.8M-parameter dense transformer of the reference description
    assert abs(res["results"]["dense/adamw"]["params"] - 6.8e6) < 0.1e6
    assert json.loads(out.read_text())["config"]["seq"] == 64
    assert "not measured" in bench.format_reference().lower()
    default = res["results"]["dsv4/muon/mtp"]
    assert set(default["split_s"]) == set(bench.SPLIT_PARTS) and all(v >= 0 for v in default["split_s"].values())
    assert 0 < default["mfu"] < 1.5
    names = [line.split()[1] for line in res["result_lines"]]
    assert names == ["train_default_vs_dense", "train_adamw_nomtp_vs_dense", "train_mfu"]
