"""chunked_indexer_topk: old (git revision, loaded with `git show`) vs current, timed in the same run.

    .venv/bin/python benchmarks/indexer_topk.py [--old-rev cda190c] [--quick] [--reps 2] [--threads N]

Cases: prefill at ratio 4 (N = T/4, k = 512) for T = 16384 and 65536, ratio 1 with exclude_window 128
(k = 2048, T = 16384), decode rows (T = 1 at position S-1 against N = 262144 keys, k = 64 and 512), and
an estimate of a 1M-token prefill at ratio 4, k = 64: a few query chunks at the end of the context
(q_pos near 2^20, all N = 262144 keys visible) are timed and the cost, linear in the number of visible
keys, is extrapolated to the whole causal triangle (~ T/2 visible keys x ratio^-1 on average).
Old and new run interleaved (old, new, old, new, ...); the best time of each is reported, with
old/new ratios and a check that both give the same ids. n_heads 4, c 32, B 1, random fp32 inputs.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import types
from pathlib import Path

import torch

from dsv4.kernels.indexer_topk import chunked_indexer_topk as new_fn

ROOT = Path(__file__).resolve().parents[1]


def load_old(rev: str):
    src = subprocess.run(
        ["git", "show", f"{rev}:src/dsv4/kernels/indexer_topk.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    mod = types.ModuleType("old_indexer_topk")
    exec(compile(src, f"{rev}:indexer_topk.py", "exec"), mod.__dict__)
    return mod.chunked_indexer_topk


def inputs(t, n, seed=0, nh=4, c=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, t, nh, c, generator=g), torch.randn(1, t, nh, generator=g), torch.randn(1, n, c, generator=g)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def compare(name, fns, reps, args, kw):
    best = {k: float("inf") for k in fns}
    outs = {}
    for _ in range(reps):
        for key, fn in fns.items():
            dt, outs[key] = timed(fn, *args, **kw)
            best[key] = min(best[key], dt)
    same = torch.equal(outs["old"], outs["new"]) if "old" in outs else None
    ratio = best["old"] / best["new"] if "old" in best else float("nan")
    print(
        f"{name:48s} old {best.get('old', float('nan')):9.3f} s  new {best['new']:8.3f} s  "
        f"old/new {ratio:6.1f}x  same ids: {same}",
        flush=True,
    )
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="cda190c")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the T=65536 prefill")
    ap.add_argument("--no-old", action="store_true")
    ap.add_argument("--est-chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fns = {"new": new_fn} if a.no_old else {"old": load_old(a.old_rev), "new": new_fn}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    cases = [(16384, 4, 512, 0), (65536, 4, 512, 0), (16384, 1, 2048, 128)]
    for t, ratio, k, excl in cases:
        if a.quick and t > 16384:
            continue
        n = t // ratio
        q, w, keys = inputs(t, n)
        reps = 1 if t > 16384 else a.reps
        compare(
            f"prefill T={t} ratio={ratio} N={n} k={k} excl={excl}",
            fns,
            reps,
            (q, w, keys, k, torch.arange(t), ratio),
            dict(exclude_window=excl),
        )
    n = 262144
    for k in (64, 512):
        q, w, keys = inputs(1, n, seed=1)
        compare(f"decode T=1 N={n} k={k}", fns, 3 * a.reps, (q, w, keys, k, torch.tensor([4 * n - 1]), 4), {})
    # 1M-token prefill estimate: the last query chunks of a 2^20 context (every one of N keys visible)
    t_full, ratio, k, chunk = 1 << 20, 4, 64, 128
    n = t_full // ratio
    tq = a.est_chunks * chunk
    q, w, keys = inputs(tq, n, seed=2)
    pos = torch.arange(t_full - tq, t_full)
    best = compare(f"1M est: last {tq} queries, N={n}, k={k}", fns, 1, (q, w, keys, k, pos, ratio), {})
    for key, dt in best.items():
        per_q = dt / tq  # s per query with N visible keys
        total = per_q * t_full / 2  # visible keys grow linearly: average N/2
        print(f"  {key}: {per_q * 1e3:.2f} ms/query at N={n} -> 1M prefill ~ {total:.0f} s ({total / 3600:.2f} h)")


if __name__ == "__main__":
    main()
