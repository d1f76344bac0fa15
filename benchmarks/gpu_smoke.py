"""GPU smoke test: the exactness checks and a decode benchmark of the tiny preset on a CUDA device.

Without a CUDA device it prints "no CUDA device" and exits 0 (--device cpu runs the same script on the CPU,
to try it out). On a CUDA device (fp32, TF32 off):
  (a) cached == uncached: a 320-token prompt prefilled through a ModelCache in uneven chunks, then
      decoded token by token (batch 2), plus a mixed-length decode batch; logits vs `model(ids).logits`,
      max rel err < --tol-cache (1e-4);
  (b) device == CPU: the uncached logits on the device vs the same weights on the CPU, max rel < --tol-cpu;
  (c) the Engine on the device: greedy output equals the CPU Engine's, and MTP speculative greedy
      equals plain greedy;
  (d) decode speed at a 1K context, batch 1 and 8 (after --warmup steps; tokens/s = B / median step time,
      each step synchronised), eager or, with --compiled, dsv4.infer.compiled.CompiledDecoder (whose
      logits are then checked against the eager step, max rel < --tol-cache; compile time printed, not timed);
  (e) training on the device: `--train-steps` steps of the trainer (dsv4.train.trainer, dtype auto: bf16
      autocast where the GPU has it) on this repository's own source files, batch 2 x 256; every loss
      finite and a checkpoint written.
Exits 1 when a check fails. Ends with `RESULT gpu_decode_b1_tok_s X`, `RESULT gpu_decode_b8_tok_s X` and
`RESULT gpu_train_tok_s X`.

Usage
  .venv/bin/python benchmarks/gpu_smoke.py                  # cuda, eager decode
  .venv/bin/python benchmarks/gpu_smoke.py --device cuda:1 --compiled
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import randomize_


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=320, help="tokens of the exactness prompt")
    p.add_argument("--context", type=int, default=1024, help="decode benchmark context")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="time dsv4.infer.compiled.CompiledDecoder")
    p.add_argument("--tol-cache", type=float, default=1e-4)
    p.add_argument("--tol-cpu", type=float, default=1e-4)
    p.add_argument("--train-steps", type=int, default=8, help="trainer steps on the device (0: skip)")
    return p.parse_args(argv)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


class Checks:
    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)


@torch.no_grad()
def check_cache(model, ids, check, tol) -> None:
    from dsv4.infer.cache import ModelCache

    full = model(ids).logits
    t = ids.shape[1]
    cache = ModelCache(model, batch=ids.shape[0], capacity=64, page=64)  # grows in pages on the way
    outs, p = [], 0
    chunks = [128, 1, 37, 50]  # prefill 216 tokens ...
    chunks += [1] * (t - sum(chunks))  # ... then decode one at a time
    for n in chunks:
        outs.append(model(ids[:, p : p + n], cache=cache).logits)
        p += n
    e = rel(torch.cat(outs, 1), full)
    check("cache == full forward (chunked prefill + token-by-token decode)", e < tol, f"max rel {e:.2e}")
    cache = ModelCache(model, batch=3, capacity=64, page=64)
    a, b = t // 2, t // 2 + 41
    model(ids[0:1, :a], cache=cache, rows=[0])
    model(ids[1:2, :b], cache=cache, rows=[2])  # row 1 stays empty
    worst = 0.0
    for s in range(t - b):
        tok = torch.stack([ids[0, a + s], ids[1, b + s]])[:, None]
        o = model(tok, cache=cache, rows=[0, 2]).logits[:, 0]
        worst = max(worst, rel(o[0], full[0, a + s]), rel(o[1], full[1, b + s]))
    check("mixed-length decode batch == full forward", worst < tol, f"max rel {worst:.2e}, {t - b} steps")


@torch.no_grad()
def check_engine(model, cpu_model, check) -> None:
    from dsv4.infer.engine import Engine
    from dsv4.infer.sampling import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (40, 75)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    dev = [r.output for r in Engine(model, max_batch=2).generate(prompts, sp)]
    cpu = [r.output for r in Engine(cpu_model, max_batch=2).generate(prompts, sp)]
    check("Engine greedy on the device == on the CPU", dev == cpu, f"{sum(map(len, dev))} tokens")
    spec = [r.output for r in Engine(model, max_batch=2, speculative=True).generate(prompts, sp)]
    check("speculative greedy == greedy (device)", spec == dev, f"{sum(map(len, spec))} tokens")
    sp = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    out = Engine(model, max_batch=2).generate(prompts, sp)
    check("Engine sampling on the device runs", all(len(r.output) == 8 for r in out), "temperature 0.8, top-p 0.9")


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def bench_decode(model, dev, context: int, batch: int, args, step_fn) -> dict:
    from dsv4.infer.cache import ModelCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.cfg.vocab_size, (1, context + 1), generator=g).to(dev)
    cache = ModelCache(model, batch=batch, capacity=context + args.warmup + args.steps + 8)
    model(ids[:, :context], cache=cache, rows=[0], last_only=True)
    if batch > 1:
        cache.copy_row(0, list(range(1, batch)))
    tok = ids[:, context : context + 1].repeat(batch, 1)
    times = []
    for i in range(args.warmup + args.steps):
        sync(dev)
        t0 = time.perf_counter()
        tok = step_fn(tok, cache).argmax(-1, keepdim=True)
        sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return dict(batch=batch, step_ms=step * 1e3, tok_s=batch / step)


def check_training(dev: torch.device, steps: int, check) -> float | None:
    """A few trainer steps on the device (every loss finite, a checkpoint written); returns training tokens/s."""
    import json
    import tempfile
    from pathlib import Path

    from dsv4.run import RunDir
    from dsv4.train.checkpoint import latest_checkpoint
    from dsv4.train.config import TrainConfig
    from dsv4.train.trainer import train

    src = Path(__file__).resolve().parent.parent / "src"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        common = dict(
            data=str(src),
            out=str(run),
            batch_size=2,
            seq_len=256,
            indexer_warmup_steps=2,
            warmup_steps=2,
            eval_every=10**6,
            ckpt_every=steps,
            final_eval_tokens=4096,
            val_fraction=0.1,
            log_every=1,
            progress=False,
            device=str(dev),
        )
        final = train(TrainConfig(steps=steps, **common), ["hidden_size=128", "vocab_size=2048"])
        recs = [json.loads(x) for x in RunDir(run).metrics.read_text().splitlines()]
        losses = [r["loss"] for r in recs if r.get("kind") == "train"]
        ok = len(losses) == steps and all(map(math.isfinite, losses))
        check(
            f"training on {dev} ({final.get('dtype')})",
            ok,
            f"{len(losses)} steps, losses {losses[0]:.3f} -> {losses[-1]:.3f}, val bpb {final['val_bpb']:.3f}",
        )
        ck = latest_checkpoint(run)
        check("checkpoint of the device run", ck is not None, str(ck.name if ck else None))
        return final.get("tok_per_s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    from dsv4.config import ModelConfig
    from dsv4.device import resolve_device
    from dsv4.model.transformer import Transformer

    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        print(f"gpu_smoke: {e}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is checked in true fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"dsv4 GPU smoke: {name} ({dev}), torch {torch.__version__}, tiny preset, random weights, fp32", flush=True)
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    cpu_model = Transformer(cfg).eval()
    randomize_(cpu_model)
    model = copy.deepcopy(cpu_model).to(dev).eval()
    check = Checks()
    t0 = time.perf_counter()
    ids = torch.randint(2, cfg.vocab_size, (2, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = rel(model(ids.to(dev)).logits, cpu_model(ids).logits)
    check(f"{dev} logits == CPU logits ({args.prompt} tokens, batch 2)", e < args.tol_cpu, f"max rel {e:.2e}")
    check_cache(model, ids.to(dev), check, args.tol_cache)
    check_engine(model, cpu_model, check)
    print(f"checks took {time.perf_counter() - t0:.1f} s", flush=True)

    def eager(tok, cache):
        return model(tok, cache=cache, last_only=True).logits[:, -1]

    step_fn, label = eager, "eager"
    if args.compiled:
        try:
            from dsv4.infer.compiled import CompiledDecoder
        except ImportError as e:
            print(f"--compiled: dsv4.infer.compiled is not available ({e}); timing the eager step")
        else:
            dec = CompiledDecoder(model)
            step_fn, label = (lambda tok, cache: dec(tok, cache)), "compiled"
            check_compiled(model, dec, dev, check, args.tol_cache)
    res = {}
    for b in args.batches:
        r = bench_decode(model, dev, args.context, b, args, step_fn)
        res[b] = r
        print(
            f"  decode ({label}) context {args.context} batch {b}: {r['tok_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step)",
            flush=True,
        )
    if args.compiled and step_fn is not eager:
        for key, s in dec.compile_seconds.items():
            print(f"  compile {key}: {s:.1f} s (not timed)")
    train_tok_s = check_training(dev, args.train_steps, check) if args.train_steps > 0 else None
    if check.failed:
        print(f"FAILED: {', '.join(check.failed)}")
    for b in (1, 8):
        if b in res:
            print(f"RESULT gpu_decode_b{b}_tok_s {res[b]['tok_s']:.1f}")
    if train_tok_s:
        print(f"RESULT gpu_train_tok_s {train_tok_s:.1f}")
    return 1 if check.failed else 0


@torch.no_grad()
def check_compiled(model, dec, dev, check, tol) -> None:
    """The compiled step's logits equal the eager step's on the same cache state (batch 2, 300 tokens)."""
    from dsv4.infer.cache import ModelCache

    ids = torch.randint(2, model.cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(4)).to(dev)
    ce, cc = ModelCache(model, batch=2, capacity=512), ModelCache(model, batch=2, capacity=512)
    model(ids[:, :280], cache=ce)
    model(ids[:, :280], cache=cc)
    worst = 0.0
    for s in range(280, 300):
        a = model(ids[:, s : s + 1], cache=ce, last_only=True).logits[:, -1]
        b = dec(ids[:, s : s + 1], cc)
        worst = max(worst, rel(b, a))
    check("compiled decode step == eager step", worst < tol, f"max rel {worst:.2e}, 20 steps")


if __name__ == "__main__":
    sys.exit(main())
