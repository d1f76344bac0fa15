"""Fault drill for torchrun jobs: kill one rank mid-training, then resume.

1. A reference job trains --steps steps on --nproc ranks without interruption.
2. The same job again; once it has logged step --kill-after, rank 1 is killed with SIGKILL (what an
   out-of-memory kill or a lost machine looks like). The script times how long the job takes to stop and
   shows the one-line error it ends with: torchrun's agent sees the dead worker and stops the others, and
   a rank blocked in a collective would give up after DSV4_DIST_TIMEOUT seconds at the latest.
3. `dsv4 train --nproc N --resume` continues from the last checkpoint. Its losses and final parameters
   must equal the reference's exactly (bit for bit: the same ranks repeat the same sums).

Ends with
  RESULT fault_stop_seconds X (goal 30)    seconds from the kill until the job has exited
  RESULT fault_resume_exact X (goal 1)     1 when the resumed run equals the uninterrupted one bit for bit

Usage: python benchmarks/fault_drill.py [--work DIR] [--steps 24] [--kill-after 9] [--ckpt-every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OVERRIDES = [
    "seq_len=64", "batch_size=4", "dtype=fp32", "ns_dtype=fp32", "compile=off", "threads=1", "log_every=1",
    "indexer_warmup_steps=2", "eval_every=1000", "eval_batches=1", "final_eval_tokens=2048",
]  # fmt: skip


def command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "dsv4", "train", "--nproc", str(nproc), *args]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DSV4_DIST_TIMEOUT": os.environ.get("DSV4_DIST_TIMEOUT", "60")}


def train_steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in rows if r.get("kind") == "train"]


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def rank_pid(job: int, rank: int) -> int | None:
    """The worker process of `rank` in the torchrun job started as process `job`."""
    for pid in descendants(job):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def final_params(run: Path) -> dict[str, torch.Tensor]:
    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer
    from dsv4.train.checkpoint import latest_checkpoint, load_checkpoint

    model = Transformer(ModelConfig.from_json(run / "model_config.json"))
    load_checkpoint(latest_checkpoint(run), model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def drill(
    work: Path, data: str | None, tokenizer: str | None, steps: int, kill_after: int, ckpt_every: int, nproc: int
) -> dict:
    common = ["--preset", "micro", "--no-progress", "--steps", str(steps)]
    if data:
        common += ["--data", data]
    if tokenizer:
        common += ["--tokenizer", tokenizer]
    common += [*OVERRIDES, f"ckpt_every={ckpt_every}"]
    ref, run = work / "reference", work / "killed"
    subprocess.run(command(nproc, "--out", str(ref), *common), env=environment(), check=True, capture_output=True)
    job = subprocess.Popen(
        command(nproc, "--out", str(run), *common),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        done = train_steps(run)
        if done and done[-1]["step"] >= kill_after:
            break
        time.sleep(0.05)
    victim = rank_pid(job.pid, 1)
    if victim is None:
        job.kill()
        raise RuntimeError("did not find rank 1 of the job (it ended before step --kill-after?)")
    killed_at = max(r["step"] for r in train_steps(run))
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=600)
    stop_s = time.monotonic() - t0
    message = [line for line in err.splitlines() if line.startswith("dsv4: error:")]
    resumed_from = max(int(p.name.split("-")[1]) for p in run.glob("ckpt-*"))
    resumed = subprocess.run(
        command(nproc, "--out", str(run), "--resume", "--no-progress"),
        env=environment(),
        capture_output=True,
        text=True,
    )
    if resumed.returncode:
        raise RuntimeError(f"the resumed job failed: {resumed.stderr[-2000:]}")
    la = {r["step"]: r["loss"] for r in train_steps(ref)}
    lb = {r["step"]: r["loss"] for r in train_steps(run)}
    pa, pb = final_params(ref), final_params(run)
    exact = la == lb and all(torch.equal(pa[n], pb[n]) for n in pa)
    return {
        "killed_after_step": killed_at,
        "exit_status": job.returncode,
        "stop_seconds": stop_s,
        "message": message[-1] if message else err.strip().splitlines()[-1:],
        "resumed_from_step": resumed_from,
        "losses_equal": la == lb,
        "exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="a folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--data", default=None, help="training text (default: the standard library)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of training one")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill-after", type=int, default=9, help="kill rank 1 once this step is logged")
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="dsv4-fault-"))
    try:
        res = drill(work, a.data, a.tokenizer, a.steps, a.kill_after, a.ckpt_every, a.nproc)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    print(f"RESULT fault_stop_seconds {res['stop_seconds']:.3f} (goal 30)")
    print(f"RESULT fault_resume_exact {int(res['exact'])} (goal 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
