"""Weights kept in their shipped format against full-precision weights, measured in one run.

A random model of --preset is written in DeepSeek's layout (FP8 projections with 128 x 128 e8m0 blocks,
MXFP4 routed experts), then loaded four ways:
  fp32         dequantised on load (dsv4.convert.official.load_official)
  bf16         the same in bf16
  kept/fp32    FP8 / MXFP4 kept in memory, dequantised per matmul in fp32 (dsv4.quant.execution)
  kept/bf16    the same, dequantised to bf16
For each: the resident bytes of parameters and buffers, a prefill forward of --prefill tokens, and
batch-1 cached decode (tok/s over --decode steps after a short prompt). The median of --reps is reported.

Ends with
  RESULT kept_resident_over_bf16 X (goal none)   resident bytes, kept / bf16
  RESULT kept_decode_over_bf16 X (goal none)     decode tok/s, kept/bf16 over bf16

Usage: python benchmarks/quantized.py [--preset tiny] [--prefill 512] [--decode 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import hardware_info, randomize_

from dsv4.config import ModelConfig
from dsv4.convert.official import load_official, save_official
from dsv4.infer.cache import ModelCache
from dsv4.model.transformer import Transformer
from dsv4.quant.execution import resident_bytes

VARIANTS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "kept/fp32": (torch.float32, True),
    "kept/bf16": (torch.bfloat16, True),
}


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model, args) -> dict:
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    with torch.no_grad():
        prefill_s = timed(lambda: model(prompt), args.reps)

        def decode():
            cache = ModelCache(model, batch=1, capacity=args.decode + 16)
            tok = model(prompt[:, :8], cache=cache).logits[:, -1:].argmax(-1)
            for _ in range(args.decode):
                tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)

        decode_s = timed(decode, args.reps)
    return {
        "resident_bytes": resident_bytes(model),
        "prefill_s": prefill_s,
        "prefill_tok_per_s": args.prefill / prefill_s,
        "decode_tok_per_s": args.decode / decode_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset))
    randomize_(model)
    res = {"command": "python " + " ".join(sys.argv), "hardware": hardware_info(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="dsv4-quant-") as d:
        save_official(model, Path(d))
        del model
        for name, (dtype, keep) in VARIANTS.items():
            m = load_official(d, dtype, keep_quantized=keep).eval()
            res["variants"][name] = measure(m, args)
            del m
    v = res["variants"]
    print(f"{'variant':<10} {'resident MB':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in v.items():
        mb, pre, dec = r["resident_bytes"] / 2**20, r["prefill_tok_per_s"], r["decode_tok_per_s"]
        print(f"{name:<10} {mb:>12.1f} {pre:>14.0f} {dec:>13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    kept, bf16 = v["kept/bf16"], v["bf16"]
    print(f"RESULT kept_resident_over_bf16 {kept['resident_bytes'] / bf16['resident_bytes']:.3f} (goal none)")
    print(f"RESULT kept_decode_over_bf16 {kept['decode_tok_per_s'] / bf16['decode_tok_per_s']:.3f} (goal none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
