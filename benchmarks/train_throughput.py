"""CPU training throughput (tokens/s) of the dsv4 tiny preset against a plain dense transformer.

Everything is measured in ONE run on the same machine, so the ratios in the table are meaningful even
when absolute numbers are not comparable across machines.

Variants
  dense/adamw         a plain pre-norm decoder-only transformer written here: same width (256) and
                      depth (4 layers) as the tiny preset, 4 heads x 64, RMSNorm, RoPE, causal
                      F.scaled_dot_product_attention(is_causal=True), SwiGLU MLP of width 512,
                      untied embedding/head over the 8192-token vocab -> 6,818,048 parameters
                      (the "6.8M-parameter dense SDPA transformer" of the reference description).
  dsv4/adamw/mtp      ModelConfig.preset('tiny') Transformer, torch.optim.AdamW, return_mtp=True
  dsv4/adamw/no-mtp   the same with return_mtp=False
  dsv4/muon/mtp       the project's optimizer, dsv4.optim.groups.build_optimizer(model, lr=1e-3)
  dsv4/muon/no-mtp

One train step = zero_grad, forward, loss, backward, optimizer step. For dsv4 the loss is
dsv4.train.trainer.lm_losses: lm + 0.3 * mtp (when MTP is on) + out.aux_loss (when not None); the dense
baseline uses plain next-token cross-entropy. Inputs are random token ids (fixed seed); each variant gets
--warmup untimed steps (default 1), then --steps timed steps (default 3); the median step time is
reported and tokens/s = batch * seq / median. All models are built first and the timed steps run
round-robin over the variants (--sequential: one variant after the other), so a change in machine load
hits every variant alike. The min step time is shown too.

Shared machines: with 2 torch threads on 2 cores, any other busy process stalls torch's parallel
regions and a step can take 10-20x longer. The script measures how many cores other processes used
during the run (/proc/stat minus its own CPU time) and prints a WARNING when that exceeds 0.25;
numbers from such a run are not meaningful -- rerun on an idle machine.

Usage
  .venv/bin/python benchmarks/train_throughput.py                   # defaults: 4 x 1024, fp32, 2 threads
  .venv/bin/python benchmarks/train_throughput.py --only dsv4 --attn reference --steps 5
  .venv/bin/python benchmarks/train_throughput.py --batch 1 --seq 256 --threads 4 --json out.json

Options: --batch, --seq, --steps, --warmup, --threads, --only {dsv4,dense}, --attn {chunked,reference}
(Transformer.set_attention_impl), --compile (dsv4.kernels.compiled.enable: torch.compile of the mHC maps; the
warm-up steps then include compilation, so use --warmup 2), --sequential, --json OUT, --quiet.

From Python (used by tests/test_benchmarks_smoke.py):
  from train_throughput import run, parse_args
  res = run(parse_args(["--batch", "1", "--seq", "64", "--steps", "1"]))
  res["tokens_per_s"]  # {variant name: tokens/s}

The defaults take about 1 minute on 2 idle cores (much longer on a busy machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import LoadMeter, hardware_info

# Reference numbers from the issue: NOT measured by this script (same class of machine, 2 threads, fp32,
# batch 4 x 1024). Printed for context only.
REFERENCE_TOK_S = {
    "transformers DeepseekV4 (tiny)": 990.0,
    "public nano port (tiny)": 1270.0,
    "dense SDPA transformer (6.8M)": 3000.0,
}

MTP_WEIGHT = 0.3
DENSE_MLP_WIDTH = 512  # SwiGLU width chosen so the baseline has ~6.8M parameters (2 x hidden)


# ---------------------------------------------------------------------------------- dense baseline
class _Rope(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim), persistent=False)

    def forward(self, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.outer(torch.arange(t, device=device, dtype=torch.float32), self.inv_freq)
        return f.cos(), f.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class DenseBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, head_dim: int, mlp: int, eps: float = 1e-6):
        super().__init__()
        self.h, self.hd = n_heads, head_dim
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * n_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=eps)
        self.gate_up = nn.Linear(d, 2 * mlp, bias=False)
        self.down = nn.Linear(mlp, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, self.h * self.hd))
        g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class DenseTransformer(nn.Module):
    """Standard pre-norm decoder-only transformer (the baseline)."""

    def __init__(self, vocab: int = 8192, d: int = 256, layers: int = 4, n_heads: int = 4, head_dim: int = 64,
                 mlp: int = DENSE_MLP_WIDTH, eps: float = 1e-6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(DenseBlock(d, n_heads, head_dim, mlp, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.head = nn.Linear(d, vocab, bias=False)
        self.rope = _Rope(head_dim)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(ids.shape[1], ids.device)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------- variants
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _make_dense(args):
    model = DenseTransformer()
    opt = _adamw(model)

    def loss_fn(ids, targets):
        logits = model(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    return model, opt, loss_fn


def _make_dsv4(args, optimizer: str, mtp: bool):
    from dsv4 import ModelConfig
    from dsv4.model.transformer import Transformer
    from dsv4.optim.groups import build_optimizer
    from dsv4.train.trainer import lm_losses

    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg)
    if args.attn:
        model.set_attention_impl(args.attn)
    opt = _adamw(model) if optimizer == "adamw" else build_optimizer(model, lr=1e-3)

    def loss_fn(ids, targets):
        out = model(ids, return_mtp=mtp, segment_ids=None)
        lm, mtp_loss = lm_losses(out, targets)
        loss = lm
        if mtp_loss is not None:
            loss = loss + MTP_WEIGHT * mtp_loss
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss

    return model, opt, loss_fn


def variants(only: str | None):
    """[(name, kind, factory)] in run order (the dense baseline first)."""
    out = []
    if only in (None, "dense"):
        out.append(("dense/adamw", "dense", _make_dense))
    if only in (None, "dsv4"):
        for optim in ("adamw", "muon"):
            for mtp in (True, False):
                name = f"dsv4/{optim}/{'mtp' if mtp else 'no-mtp'}"
                out.append((name, "dsv4", lambda a, o=optim, m=mtp: _make_dsv4(a, o, m)))
    return out


class _Runner:
    """One variant: model, optimizer, loss; step() runs and times one training step."""

    def __init__(self, factory, args, ids, targets):
        torch.manual_seed(0)
        self.model, self.opt, self.loss_fn = factory(args)
        self.model.train()
        self.ids, self.targets = ids, targets
        self.times, self.losses = [], []

    def step(self, timed: bool) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.ids, self.targets)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        if timed:
            self.times.append(dt)
        return dt

    def result(self, tokens: int) -> dict:
        med = statistics.median(self.times)
        return dict(params=_n_params(self.model), step_times_s=self.times, median_step_s=med,
                    min_step_s=min(self.times), tokens_per_s=tokens / med, losses=self.losses)


# ---------------------------------------------------------------------------------- reporting
def format_table(res: dict) -> str:
    rows = [("name", "params", "step s (median)", "tokens/s", "vs dense", "step s (min)")]
    for name, r in res["results"].items():
        ratio = r.get("ratio_to_dense")
        rows.append((name, f"{r['params']:,}", f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                     "-" if ratio is None else f"{ratio:.2f}x", f"{r['min_step_s']:.3f}"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def format_reference() -> str:
    dense = REFERENCE_TOK_S["dense SDPA transformer (6.8M)"]
    lines = ["Reference numbers from the issue -- NOT measured in this run (same class of machine, "
             "2 threads, fp32, batch 4 x 1024):"]
    for k, v in REFERENCE_TOK_S.items():
        lines.append(f"  {k:<32} ~{v:>7,.0f} tokens/s   ({v / dense:.2f}x dense)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- entry points
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--only", choices=("dsv4", "dense"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the mHC maps (dsv4.kernels.compiled)")
    p.add_argument("--attn", choices=("chunked", "reference", "sparse"), default=None,
                   help="dsv4 attention implementation (default: the model's default, chunked)")
    p.add_argument("--sequential", action="store_true",
                   help="time all steps of one variant before the next (default: round-robin over variants)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no printing (for tests)")
    return p.parse_args(argv)


def run(args=None) -> dict:
    """Run the benchmark; args is an argparse.Namespace from parse_args (or an argv list / None)."""
    if args is None or isinstance(args, (list, tuple)):
        args = parse_args(args)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        raise ValueError("need --steps >= 1, --batch >= 1, --seq >= 2")
    warnings.filterwarnings("ignore", message="config: keeping unknown fields")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    from dsv4.kernels import compiled

    compiled.enable(bool(getattr(args, "compile", False)))
    try:
        say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
        hw = hardware_info()
        command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv) if __name__ == "__main__" else None
        say(f"CPU: {hw['cpu']} ({hw['logical_cpus']} logical CPUs), torch threads: {hw['torch_threads']}, "
            f"torch {hw['torch']}, python {hw['python']}")
        if hw["loadavg"]:
            say("load average (1/5/15 min): " + " ".join(f"{x:.2f}" for x in hw["loadavg"]))
        if command:
            say(f"command: {command}")
        say(f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, fp32, "
            f"warm-up {args.warmup}, timed steps {args.steps}, dsv4 attention: {args.attn or 'default (sparse)'}, "
            f"compiled mHC: {bool(getattr(args, 'compile', False))}")

        torch.manual_seed(1234)
        vocab = 8192
        data = torch.randint(2, vocab, (args.batch, args.seq + 1))
        ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

        tokens = args.batch * args.seq
        t_all = time.perf_counter()
        load = LoadMeter()
        runners = {}
        for name, _kind, factory in variants(args.only):
            t0 = time.perf_counter()
            runners[name] = r = _Runner(factory, args, ids, targets)
            for _ in range(args.warmup):
                r.step(timed=False)
            say(f"  built {name:<18} + {args.warmup} warm-up step(s): {time.perf_counter() - t0:6.1f} s")
        if args.sequential:
            order = [(name, i) for name in runners for i in range(args.steps)]
        else:  # round-robin: slow drifts in machine load hit every variant alike
            order = [(name, i) for i in range(args.steps) for name in runners]
        for name, i in order:
            dt = runners[name].step(timed=True)
            say(f"  step {i + 1}/{args.steps} {name:<18} {dt:7.3f} s  ({tokens / dt:9,.0f} tokens/s)")
        results = {name: r.result(tokens) for name, r in runners.items()}
        for name, r in results.items():
            if not all(math.isfinite(x) for x in r["losses"]):
                say(f"  warning: {name} produced a non-finite loss")
        del runners
        dense = results.get("dense/adamw")
        for r in results.values():
            r["ratio_to_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None

        res = dict(hardware=hw, command=command,
                   config=dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                               order="sequential" if args.sequential else "round-robin",
                               threads=args.threads, dtype="float32", attn=args.attn or "chunked",
                               only=args.only, dense_mlp_width=DENSE_MLP_WIDTH),
                   results=results, tokens_per_s={k: v["tokens_per_s"] for k, v in results.items()},
                   reference_not_measured=dict(REFERENCE_TOK_S), total_wall_s=time.perf_counter() - t_all)
        res["other_cpu_load"] = load.other_cores()
        say("")
        say(format_table(res))
        say("tokens/s = batch * seq / median step time; vs dense = tokens/s relative to the dense baseline "
            "measured in this run.")
        other = res["other_cpu_load"]
        if other is not None:
            say(f"other processes used on average {other:.2f} CPU cores during the run (from /proc/stat minus this "
                f"process)")
            if other > 0.25:
                say("WARNING: the cores were shared with other processes during the run, so these timings are "
                    "inflated and noisy (compare the min column; rerun on an idle machine).")
        say("")
        say(format_reference())
        say(f"\ntotal benchmark wall time: {res['total_wall_s']:.1f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
            say(f"wrote {args.json}")
        return res
    finally:
        torch.set_num_threads(prev_threads)
        compiled.enable(False)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
