"""Training throughput of a torchrun job against one process on the same machine, measured in one run.

Both train the same preset on the same global batch through `dsv4 train` (the trainer's own tokens/s:
the mean over the logged windows of the LM stage): one process with --threads torch threads, and
--nproc processes with --threads / --nproc threads each (gloo on the CPU), so both use the same cores.
The job pays for FSDP2's all-gathers and reduce-scatters, Muon's gathers and the loss all-reduces; it
gains from running nproc single-threaded processes, which keep small kernels busier than one process's
intra-op threads.

Ends with
  RESULT dp_over_one_process X (goal none)   job tokens/s / one-process tokens/s (measured, no target)

Usage: python benchmarks/distributed_throughput.py [--preset tiny] [--steps 20] [--nproc 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import hardware_info


def run(out: Path, args: argparse.Namespace, nproc: int) -> dict:
    threads = max(1, args.threads // nproc)
    cmd = [sys.executable, "-m", "dsv4", "train", "--out", str(out), "--preset", args.preset]
    cmd += ["--steps", str(args.steps), "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if args.data:
        cmd += ["--data", args.data]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    cmd += [
        f"seq_len={args.seq_len}", f"batch_size={args.batch}", f"threads={threads}", "dtype=fp32", "compile=off",
        "indexer_warmup_steps=0", "log_every=4", "eval_every=100000", "ckpt_every=100000", "final_eval_tokens=4096",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tok_per_s"] for r in rows if r.get("kind") == "train" and "tok_per_s" in r][1:]  # 1st: warm-up
    return {"nproc": nproc, "threads_each": threads, "tok_per_s": sum(windows) / len(windows), "windows": windows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", default=None, help="training text (default: the standard library)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: trained on the data)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split across the ranks)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (the machine's cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dsv4-dp-"))
    try:
        one = run(work / "one", args, 1)
        tok = args.tokenizer or str(work / "one" / "tokenizer.json")
        job = run(work / "job", argparse.Namespace(**{**vars(args), "tokenizer": tok}), args.nproc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = job["tok_per_s"] / one["tok_per_s"]
    res = {"command": "python " + " ".join(sys.argv), "hardware": hardware_info(), "one": one, "job": job}
    res["ratio"] = ratio
    print(f"one process, {one['threads_each']} threads: {one['tok_per_s']:,.0f} tok/s")
    print(f"{args.nproc} processes, {job['threads_each']} thread(s) each: {job['tok_per_s']:,.0f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"RESULT dp_over_one_process {ratio:.3f} (goal none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
