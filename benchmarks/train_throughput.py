"""CPU training throughput (tokens/s) of the dsv4 tiny preset against a plain dense transformer.

Everything is measured in ONE run on the same machine, so the ratios in the table are meaningful even
when absolute numbers are not comparable across machines.

Variants
  dense/adamw         a plain pre-norm decoder-only transformer written here: same width (256) and
                      depth (4 layers) as the tiny preset, 4 heads x 64, RMSNorm, RoPE, causal
                      F.scaled_dot_product_attention(is_causal=True), SwiGLU MLP of width 512,
                      untied embedding/head over the 8192-token vocab -> 6,818,048 parameters
                      (the "6.8M-parameter dense SDPA transformer" of the reference description).
  dsv4/adamw/mtp      ModelConfig.preset('tiny') Transformer, torch.optim.AdamW
  dsv4/adamw/no-mtp   the same preset without its MTP block (num_nextn_predict_layers=0)
  dsv4/muon/mtp       the default V4 step: the project's optimizer (Muon + AdamW groups,
                      dsv4.optim.groups.build_optimizer(model, lr=1e-3)) and MTP; Newton-Schulz in
                      the trainer's default precision (ns_dtype=auto: bf16 where the bf16 matmul is
                      faster on this machine, as torch.optim.Muon always does; --ns-dtype to pin it)
  dsv4/muon/no-mtp

One train step = zero_grad, forward, loss, backward, gradient clipping (norm 1.0), optimizer step. The
dsv4 loss is the trainer's own, dsv4.train.trainer.step_loss in the sparse stage: LM + 0.3 MTP + MoE
balance loss + the indexers' KL, with the heads fused with their cross entropy; the mHC maps are
compiled as in the trainer's runs of 2 minutes or more (--no-compile: eager). The dense baseline uses
plain next-token cross-entropy. Inputs are random token ids (fixed seed); each variant gets --warmup
untimed steps (default 1; it includes the compilation), then --steps timed steps (default 5); the median
step time is reported and tokens/s = batch * seq / median. Each variant is built, warmed up, timed and
freed before the next, so one model is in memory at a time, as in a training run; --round-robin builds
all five first and interleaves their steps instead, which on these machines slowed the dense baseline
by up to 1.6x (its big logits buffers then come from a crowded heap) and so flattered the ratios. The
min step time is shown too.

Also reported: MFU of each dsv4 variant (model FLOPs of dsv4.flops.flops_per_token over the fp32
matmul peak measured in the same run), the time split of the dsv4 steps (mHC, attention, MoE, heads,
each alone on the step's shapes; the optimiser in the steps) and the RESULT lines of the issue.

Shared machines: with 2 torch threads on 2 cores, any other busy process stalls torch's parallel
regions and a step can take 10-20x longer. The script measures how many cores other processes used
during the run (/proc/stat minus its own CPU time) and prints a WARNING when that exceeds 0.25;
numbers from such a run are not meaningful -- rerun on an idle machine.

Usage
  .venv/bin/python benchmarks/train_throughput.py                   # defaults: 4 x 1024, fp32, 2 threads
  .venv/bin/python benchmarks/train_throughput.py --only dsv4 --attn reference --steps 5
  .venv/bin/python benchmarks/train_throughput.py --batch 1 --seq 256 --threads 4 --json out.json

Options: --batch, --seq, --steps, --warmup, --threads, --only {dsv4,dense}, --attn {chunked,reference}
(Transformer.set_attention_impl), --no-compile, --no-split, --round-robin, --json OUT, --quiet.

From Python (used by tests/test_benchmarks_smoke.py):
  from train_throughput import run, parse_args
  res = run(parse_args(["--batch", "1", "--seq", "64", "--steps", "1"]))
  res["tokens_per_s"]  # {variant name: tokens/s}

The defaults take about 2-3 minutes on 2 idle cores (much longer on a busy machine).
"""

from __future__ import annotations

import argparse
import gc
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

    def __init__(
        self,
        vocab: int = 8192,
        d: int = 256,
        layers: int = 4,
        n_heads: int = 4,
        head_dim: int = 64,
        mlp: int = DENSE_MLP_WIDTH,
        eps: float = 1e-6,
    ):
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
    """The tiny preset (without its MTP block for no-mtp), stepped exactly as the trainer steps it:
    dsv4.train.trainer.step_loss in the sparse stage (LM + 0.3 MTP + balance loss + indexer KL, heads
    fused with their cross entropy), gradient clipping at 1.0, then the optimiser."""
    from dsv4 import ModelConfig
    from dsv4.model.transformer import Transformer
    from dsv4.optim.groups import build_optimizer
    from dsv4.train.trainer import step_loss

    cfg = ModelConfig.preset("tiny")
    if not mtp:
        cfg.num_nextn_predict_layers = 0
    model = Transformer(cfg)
    if args.attn:
        model.set_attention_impl(args.attn)
    opt = (
        _adamw(model)
        if optimizer == "adamw"
        else build_optimizer(model, lr=1e-3, ns_bf16=getattr(args, "ns_bf16", False))
    )

    def loss_fn(ids, targets):
        return step_loss(model, ids, targets, mtp_weight=MTP_WEIGHT)[0]

    return model, opt, loss_fn


def _fwd_bwd_seconds(f, inputs, repeats: int = 3) -> float:
    """Best forward + backward wall time of f(*inputs) (two untimed calls first: compilation, caches)."""
    grads = []

    def once():
        for x in inputs:
            x.grad = None
        t0 = time.perf_counter()
        out = f(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not grads:
            grads.extend(torch.ones_like(o) / o.numel() for o in outs)
        torch.autograd.backward(outs, grads)
        return time.perf_counter() - t0

    once()
    once()
    return min(once() for _ in range(repeats))


def newton_schulz_flops(opt) -> float:
    """FLOPs of one optimizer step's Newton-Schulz iterations (0 for AdamW): per matrix n x m (n <= m after
    the transpose) and iteration, X X^T (2 n^2 m), the Gram polynomial (2 n^3) and its product with X (2 n^2 m)."""
    from dsv4.optim.muon import V4_NS_STEPS

    total = 0.0
    for group in opt.param_groups:
        if group.get("algorithm") != "muon":
            continue
        for p in group["params"]:
            rows, cols = p.shape[-2] // group["blocks"], p.shape[-1]
            n, m = min(rows, cols), max(rows, cols)
            count = p.numel() // (rows * cols)
            total += count * len(V4_NS_STEPS) * (4 * n * n * m + 2 * n**3)
    return total


def time_split(model, ids: torch.Tensor, targets: torch.Tensor) -> dict:
    """Seconds per step of each part of a dsv4 step, forward + backward, each run alone on the step's
    shapes with the step's settings: mHC (every unit's pre and post maps and the hc heads), attention
    (every layer and MTP block, the indexer in its sparse-stage mode), MoE, heads (LM head and MTP heads
    fused with the cross entropy). The optimiser is timed inside the real steps; the rest of a step
    (embedding, norms, MTP projections, loss glue) is its remainder."""
    from dsv4.kernels.loss import linear_cross_entropy
    from dsv4.model.mhc import hc_head, hc_post, hc_pre

    cfg, (b, t) = model.cfg, ids.shape
    d, hc = cfg.hidden_size, cfg.hc_mult
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, u, post, res = leaf(b, t, hc, d), leaf(b, t, d), leaf(b, t, hc), leaf(b, t, hc, hc)
    blocks = list(model.layers) + list(model.mtp)
    ropes = model.ropes(torch.arange(t))
    pos = torch.arange(t)
    blk = blocks[0]
    unit = _fwd_bwd_seconds(
        lambda x: hc_pre(
            x, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        ),
        [x],
    )
    unit += _fwd_bwd_seconds(hc_post, [u, x, post, res])
    head = _fwd_bwd_seconds(
        lambda x: hc_head(x, model.hc_head_fn, model.hc_head_scale, model.hc_head_base, cfg.hc_eps, cfg.rms_norm_eps),
        [x],
    )
    out = {"mHC": 2 * len(blocks) * unit + (1 + len(model.mtp)) * head, "attention": 0.0, "MoE": 0.0}
    for i, blk in enumerate(blocks):
        rope = ropes["compress"] if blk.attn.uses_compress_rope else ropes["main"]
        if i < len(model.layers):  # the step's blocks run the indexer's sparse-stage forward (MTP: plain)
            out["attention"] += _fwd_bwd_seconds(
                lambda u, a=blk.attn, r=rope: a.forward_indexer(u, r, pos, None, "sparse", False)[0], [u]
            )
        else:
            out["attention"] += _fwd_bwd_seconds(lambda u, a=blk.attn, r=rope: a(u, *r, pos, None, None), [u])
        out["MoE"] += _fwd_bwd_seconds(lambda u, m=blk.ffn: m(u, ids)[0], [u])
    h = leaf(b * t, d)
    out["heads"] = (1 + len(model.mtp)) * _fwd_bwd_seconds(
        lambda h: linear_cross_entropy(h, model.head.weight, targets.reshape(-1)), [h]
    )
    return out


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
        self.times, self.opt_times, self.losses = [], [], []

    def step(self, timed: bool) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.ids, self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.losses.append(loss.item())
        if timed:
            self.times.append(t2 - t0)
            self.opt_times.append(t2 - t1)
        return t2 - t0

    def result(self, tokens: int) -> dict:
        med = statistics.median(self.times)
        return dict(
            params=_n_params(self.model),
            step_times_s=self.times,
            median_step_s=med,
            min_step_s=min(self.times),
            tokens_per_s=tokens / med,
            losses=self.losses,
            optimizer_s=statistics.median(self.opt_times),
        )


# ---------------------------------------------------------------------------------- reporting
def format_table(res: dict) -> str:
    rows = [("name", "params", "step s (median)", "tokens/s", "vs dense", "step s (min)", "MFU")]
    for name, r in res["results"].items():
        ratio = r.get("ratio_to_dense")
        rows.append(
            (
                name,
                f"{r['params']:,}",
                f"{r['median_step_s']:.3f}",
                f"{r['tokens_per_s']:,.0f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{r['min_step_s']:.3f}",
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
            )
        )
    return _layout(rows)


def _layout(rows: list[tuple]) -> str:
    """Rows of strings as a text table: first column left-aligned, the others right-aligned, a rule under
    the header."""
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


SPLIT_PARTS = ("mHC", "attention", "MoE", "heads", "optimizer", "other")


def format_split(res: dict) -> str:
    """Seconds per step of each part (parts alone, fwd + bwd; optimiser in-step; other = the rest)."""
    rows = [("name",) + SPLIT_PARTS]
    for name, r in res["results"].items():
        if "split_s" in r:
            rows.append((name,) + tuple(f"{r['split_s'][k]:.3f}" for k in SPLIT_PARTS))
    return _layout(rows) if len(rows) > 1 else ""


def result_lines(res: dict) -> list[str]:
    """The issue's targets, for the shape this run used."""
    r = res["results"]
    out = []
    if "dsv4/muon/mtp" in r and r["dsv4/muon/mtp"].get("ratio_to_dense") is not None:
        out.append(
            f"RESULT train_default_vs_dense {r['dsv4/muon/mtp']['ratio_to_dense']:.3f} (goal 0.8 at 4x1024, "
            "1.0 at 1x4096)"
        )
    if "dsv4/adamw/no-mtp" in r and r["dsv4/adamw/no-mtp"].get("ratio_to_dense") is not None:
        out.append(f"RESULT train_adamw_nomtp_vs_dense {r['dsv4/adamw/no-mtp']['ratio_to_dense']:.3f} (goal 1.2)")
    if "dsv4/muon/mtp" in r and "mfu" in r["dsv4/muon/mtp"]:
        out.append(f"RESULT train_mfu {r['dsv4/muon/mtp']['mfu']:.3f} (goal 0.4)")
    return out


def format_reference() -> str:
    dense = REFERENCE_TOK_S["dense SDPA transformer (6.8M)"]
    lines = [
        "Reference numbers from the issue -- NOT measured in this run (same class of machine, "
        "2 threads, fp32, batch 4 x 1024):"
    ]
    for k, v in REFERENCE_TOK_S.items():
        lines.append(f"  {k:<32} ~{v:>7,.0f} tokens/s   ({v / dense:.2f}x dense)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- entry points
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--only", choices=("dsv4", "dense"), default=None)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the mHC maps (dsv4.kernels.compiled), as the trainer does in runs of 2 "
        "minutes or more (default on; the warm-up step includes the compilation)",
    )
    p.add_argument(
        "--no-split",
        dest="split",
        action="store_false",
        help="skip the per-part time split (mHC, attention, MoE, heads, optimiser)",
    )
    p.add_argument(
        "--attn",
        choices=("chunked", "reference", "sparse"),
        default=None,
        help="dsv4 attention implementation (default: the model's default, sparse)",
    )
    p.add_argument(
        "--round-robin",
        dest="sequential",
        action="store_false",
        help="interleave the variants step by step (default: all steps of one variant, then the next)",
    )
    ns_help = "Muon's Newton-Schulz precision (default: auto, as the trainer: bf16 where faster here)"
    p.add_argument("--ns-dtype", choices=("auto", "fp32", "bf16"), default="auto", help=ns_help)
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
    from dsv4.flops import flops_per_token, measure_matmul_peak, mfu
    from dsv4.train.trainer import pick_dtype

    args.ns_bf16 = pick_dtype(getattr(args, "ns_dtype", "fp32")) == torch.bfloat16

    try:
        say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
        hw = hardware_info()
        command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv) if __name__ == "__main__" else None
        say(
            f"CPU: {hw['cpu']} ({hw['logical_cpus']} logical CPUs), torch threads: {hw['torch_threads']}, "
            f"torch {hw['torch']}, python {hw['python']}"
        )
        if hw["loadavg"]:
            say("load average (1/5/15 min): " + " ".join(f"{x:.2f}" for x in hw["loadavg"]))
        if command:
            say(f"command: {command}")
        say(
            f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, fp32, "
            f"warm-up {args.warmup}, timed steps {args.steps}, dsv4 attention: {args.attn or 'default (sparse)'}, "
            f"compiled mHC: {bool(getattr(args, 'compile', False))}, Muon's Newton-Schulz in "
            f"{'bf16' if args.ns_bf16 else 'fp32'}"
        )

        torch.manual_seed(1234)
        vocab = 8192
        data = torch.randint(2, vocab, (args.batch, args.seq + 1))
        ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

        tokens = args.batch * args.seq
        t_all = time.perf_counter()
        load = LoadMeter()
        peak = max(measure_matmul_peak(torch.float32, n=1024, seconds=0.5) for _ in range(3))
        results, splits = {}, {}

        def build(name, factory):
            t0 = time.perf_counter()
            r = _Runner(factory, args, ids, targets)
            for _ in range(args.warmup):
                r.step(timed=False)
            say(f"  built {name:<18} + {args.warmup} warm-up step(s): {time.perf_counter() - t0:6.1f} s")
            return r

        def timed_step(name, r, i):
            dt = r.step(timed=True)
            say(f"  step {i + 1}/{args.steps} {name:<18} {dt:7.3f} s  ({tokens / dt:9,.0f} tokens/s)")

        def finish(name, runner):
            results[name] = r = runner.result(tokens)
            if not all(math.isfinite(x) for x in r["losses"]):
                say(f"  warning: {name} produced a non-finite loss")
            if not name.startswith("dsv4/"):
                return
            cfg = runner.model.cfg
            r["flops_per_token"] = flops_per_token(cfg, args.seq, include_mtp=bool(cfg.num_nextn_predict_layers))
            r["mfu"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak)
            r["newton_schulz_flops"] = newton_schulz_flops(runner.opt)
            if args.split:
                key = cfg.num_nextn_predict_layers
                if key not in splits:
                    say(f"  timing the parts of {name} alone ...")
                    splits[key] = time_split(runner.model, ids, targets)
                parts = dict(splits[key], optimizer=r["optimizer_s"])
                parts["other"] = max(0.0, r["median_step_s"] - sum(parts.values()))
                r["split_s"] = parts

        if args.sequential:  # one model in memory at a time, as in a training run
            for name, _kind, factory in variants(args.only):
                runner = build(name, factory)
                for i in range(args.steps):
                    timed_step(name, runner, i)
                finish(name, runner)
                del runner
                gc.collect()
        else:  # round-robin: all models built first, slow drifts in machine load hit every variant alike
            runners = {name: build(name, factory) for name, _kind, factory in variants(args.only)}
            for i in range(args.steps):
                for name, runner in runners.items():
                    timed_step(name, runner, i)
            for name, runner in runners.items():
                finish(name, runner)
            del runners
        dense = results.get("dense/adamw")
        for r in results.values():
            r["ratio_to_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
        res = dict(
            hardware=hw,
            command=command,
            config=dict(
                batch=args.batch,
                seq=args.seq,
                steps=args.steps,
                warmup=args.warmup,
                order="sequential" if args.sequential else "round-robin",
                threads=args.threads,
                dtype="float32",
                attn=args.attn or "sparse",
                ns_dtype="bfloat16" if args.ns_bf16 else "float32",
                only=args.only,
                dense_mlp_width=DENSE_MLP_WIDTH,
            ),
            results=results,
            tokens_per_s={k: v["tokens_per_s"] for k, v in results.items()},
            matmul_peak_flops=peak,
            reference_not_measured=dict(REFERENCE_TOK_S),
            total_wall_s=time.perf_counter() - t_all,
        )
        res["other_cpu_load"] = load.other_cores()
        say("")
        say(format_table(res))
        say(
            "tokens/s = batch * seq / median step time; vs dense = tokens/s relative to the dense baseline "
            f"measured in this run; MFU = tokens/s * model FLOPs per token (dsv4.flops.flops_per_token: "
            f"6 N_active + attention and indexer as computed) / the fp32 matmul peak measured in this run "
            f"({peak / 1e9:.0f} GFLOP/s)."
        )
        split = format_split(res)
        if split:
            say("")
            say(
                "time split, seconds per step: mHC, attention, MoE and heads each run alone on the step's shapes "
                "(forward + backward); optimizer timed in the steps; other = median step - the rest"
            )
            say(split)
        ns = res["results"].get("dsv4/muon/mtp", {}).get("newton_schulz_flops")
        if ns:
            line = (
                f"Muon's Newton-Schulz alone (10 iterations on every matrix, the expert matrices included): "
                f"{ns / 1e9:.0f} GFLOP per step = at least {ns / peak:.2f} s at the measured fp32 peak, "
                "whatever the batch"
                + (" (this run iterates in bf16, whose matmul is faster here)" if args.ns_bf16 else "")
            )
            if "dense/adamw" in res["results"]:
                line += f"; the dense baseline's whole step: {res['results']['dense/adamw']['median_step_s']:.2f} s"
            say(line)
        other = res["other_cpu_load"]
        if other is not None:
            say(
                f"other processes used on average {other:.2f} CPU cores during the run (from /proc/stat minus this "
                f"process)"
            )
            if other > 0.25:
                say(
                    "WARNING: the cores were shared with other processes during the run, so these timings are "
                    "inflated and noisy (compare the min column; rerun on an idle machine)."
                )
        say("")
        say(format_reference())
        say(f"\ntotal benchmark wall time: {res['total_wall_s']:.1f} s")
        res["result_lines"] = result_lines(res)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
            say(f"wrote {args.json}")
        for line in res["result_lines"]:
            say(line)
        return res
    finally:
        torch.set_num_threads(prev_threads)
        compiled.enable(False)


def main(argv=None) -> int:
    """Measure every variant and print the RESULT lines; exit status 0."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
