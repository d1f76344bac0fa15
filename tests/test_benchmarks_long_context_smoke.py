"""Smoke test for benchmarks/long_context.py: every kind, prefill at T=512/1024, decode at 1K/2K."""

import json
import math

from conftest import load_benchmark


def test_long_context_smoke(tmp_path):
    bench = load_benchmark("long_context")
    out, png = tmp_path / "lc.json", tmp_path / "lc.png"
    args = bench.parse_args(
        [
            "--sizes",
            "512",
            "1024",
            "--decode-sizes",
            "1024",
            "2048",
            "--threads",
            "1",
            "--min-time",
            "0",
            "--repeats",
            "1",
            "--decode-time",
            "0.02",
            "--decode-min-reps",
            "2",
            "--skip-dense-above",
            "512",
            "--quiet",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    res = bench.run(args)

    kinds = {"dense", "dsa", "csa", "hca"}
    assert set(res["prefill"]) == kinds and set(res["decode"]) == kinds
    assert res["config"]["topk"] == {"dsa": 2048, "csa": 512}
    assert "skipped" in res["prefill"]["dense"]["1024"]  # --skip-dense-above
    for kind in kinds:
        for t in ("512", "1024"):
            r = res["prefill"][kind][t]
            if "skipped" in r:
                continue
            assert r["time_s"] > 0 and math.isfinite(r["time_s"]), (kind, t)
            assert r["kv_entries_bytes"] >= int(t) * 64 * 4
            if r["peak_bytes"] is not None:
                assert r["peak_bytes"] >= 0
        assert res["prefill"][kind]["512"]["dense_over_kind"] > 0
        for s in ("1024", "2048"):
            d = res["decode"][kind][s]
            assert d["time_s"] > 0 and d["reps"] >= 2, (kind, s)
        assert res["decode"][kind]["1024"]["ratio_to_first"] == 1.0
    assert any("dsa prefill at 64K" in t["target"] and t["met"] is None for t in res["targets"])
    assert json.loads(out.read_text())["config"]["sizes"] == [512, 1024]
    assert png.stat().st_size > 1000


def test_long_context_v32_smoke(tmp_path):
    """The V3.2 kinds: dense MLA (the baseline) and the V3.2 DSA layer, with their reported RESULT ratios."""
    bench = load_benchmark("long_context")
    args = bench.parse_args(
        ["--kinds", "mla", "v32", "--sizes", "512", "--decode-sizes", "1024", "--threads", "1", "--min-time", "0"]
        + ["--repeats", "1", "--decode-time", "0.02", "--decode-min-reps", "2", "--quiet", "--plot", ""]
    )
    res = bench.run(args)
    assert set(res["prefill"]) == {"mla", "v32"} and res["config"]["topk"]["v32"] == 2048
    assert res["prefill"]["v32"]["512"]["dense_over_kind"] > 0  # against mla, not V4's dense
    reported = {t["result"]: t for t in res["targets"] if t["met"] == "report"}
    assert set(reported) == {"v32_prefill_512_vs_dense_mla", "v32_decode_1k_vs_dense_mla"}
    assert all(t["value"] > 0 for t in reported.values())
