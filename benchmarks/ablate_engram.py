"""Controlled experiment: does Engram help the tiny model? Train tiny with and without Engram, same
active parameters and training tokens, on the standard-library corpus, over several seeds; report the
final validation bits per byte (mean, std) and a plot.

Arms (same data split, tokenizer, schedule, steps, batch, sequence length; seeds change the init and
the batch order):
  baseline  the tiny preset;
  engram    tiny-engram (Engram at layer 1: 2 orders x 4 heads, 32 values per row; the table is
            1.6M values, 20% of the sparse parameters) with moe_intermediate_size reduced from 256
            to 220, which removes 331,776 active expert parameters to pay for the 334,848 active
            Engram projection / norm / conv parameters (active within 0.1%; printed). Each token also
            reads 8 table rows (256 values), the memory Engram is about.

Usage
  .venv/bin/python benchmarks/ablate_engram.py                       # 3 seeds x 2 arms (~15 min, 2 cores)
  .venv/bin/python benchmarks/ablate_engram.py --seeds 0 --steps 20 --out /tmp/abl   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import hardware_info

from dsv4.config import ModelConfig
from dsv4.flops import count_params
from dsv4.run import RunDir
from dsv4.train.config import TrainConfig
from dsv4.train.trainer import train

ARMS = {"baseline": ("tiny", []), "engram": ("tiny-engram", ["moe_intermediate_size=220"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data", default=None, help="corpus folder (default: this Python's standard library)")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.json (default: train one on the data)")
    p.add_argument("--out", default="runs/ablate_engram")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=131072)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default="engram_ablation.png", help="PNG path (default: ./engram_ablation.png)")
    return p.parse_args(argv)


def active_params(preset: str, overrides: list[str]) -> int:
    cfg = ModelConfig.preset(preset).replace(**{k: int(v) for k, v in (o.split("=") for o in overrides)})
    return count_params(cfg)["active"]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    res = {"command": "python " + " ".join(sys.argv), "hardware": hardware_info(), "args": vars(args), "runs": {}}
    act = {arm: active_params(p, o) for arm, (p, o) in ARMS.items()}
    res["active_params"] = act
    print(
        f"active parameters: baseline {act['baseline']:,}, engram {act['engram']:,} "
        f"({100 * (act['engram'] / act['baseline'] - 1):+.2f}%); tokens per run {args.steps * args.batch * args.seq:,}"
    )
    shared = None
    for seed in args.seeds:
        for arm, (preset, over) in ARMS.items():
            run = out / f"{arm}-seed{seed}"
            if run.exists():
                shutil.rmtree(run)
            run.mkdir(parents=True)
            if shared is not None:  # same tokenizer and token caches for every run
                shutil.copy(RunDir(shared).tokenizer, RunDir(run).tokenizer)
                shutil.copytree(RunDir(shared).cache, RunDir(run).cache)
            tc = TrainConfig(
                preset=preset,
                data=args.data,
                out=str(run),
                tokenizer=args.tokenizer,
                steps=args.steps,
                batch_size=args.batch,
                seq_len=args.seq,
                lr=args.lr,
                seed=seed,
                eval_every=10**6,
                ckpt_every=10**6,
                keep_last=1,
                final_eval_tokens=args.eval_tokens,
                progress=False,
                threads=args.threads,
                compile="off",
                dtype="fp32",
            )
            t0 = time.perf_counter()
            final = train(tc, over)
            shared = shared or run
            res["runs"].setdefault(arm, []).append(
                dict(
                    seed=seed,
                    val_bpb=final["val_bpb"],
                    xz_bpb=final["xz_bpb"],
                    wall_s=time.perf_counter() - t0,
                    tok_per_s=final["tok_per_s"],
                )
            )
            print(
                f"  {arm:8s} seed {seed}: val bpb {final['val_bpb']:.4f}  ({time.perf_counter() - t0:.0f} s, "
                f"{final['tok_per_s'] or 0:.0f} tok/s)"
            )
    summary = {}
    for arm, rs in res["runs"].items():
        v = [r["val_bpb"] for r in rs]
        summary[arm] = dict(mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0, n=len(v))
    res["summary"] = summary
    b, e = summary["baseline"], summary["engram"]
    diff = e["mean"] - b["mean"]
    noise = (b["std"] ** 2 / b["n"] + e["std"] ** 2 / e["n"]) ** 0.5
    verdict = (
        "Engram HELPED"
        if diff < -2 * noise and noise > 0
        else "Engram HURT"
        if diff > 2 * noise and noise > 0
        else "no difference beyond the seed noise"
    )
    res["verdict"] = verdict
    print(
        f"\nval bpb over {b['n']} seeds: baseline {b['mean']:.4f} +- {b['std']:.4f}, engram {e['mean']:.4f} +- "
        f"{e['std']:.4f}; difference {diff:+.4f} (2 x standard error {2 * noise:.4f}) -> {verdict}"
    )
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 4))
            for i, arm in enumerate(ARMS):
                v = [r["val_bpb"] for r in res["runs"][arm]]
                ax.scatter([i] * len(v), v, alpha=0.6)
                ax.errorbar([i + 0.15], [summary[arm]["mean"]], yerr=[summary[arm]["std"]], fmt="o", capsize=4)
            ax.set_xticks(range(len(ARMS)), list(ARMS))
            ax.set_ylabel("validation bits per byte")
            ax.set_title(f"tiny vs tiny-engram, {len(args.seeds)} seeds, {args.steps} steps")
            fig.tight_layout()
            os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
            fig.savefig(args.plot, dpi=110)
            print(f"plot: {args.plot}")
        except ImportError:
            pass
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
