"""Routed experts streamed from the shards against experts kept in memory, measured in one run.

A random many-expert model (--experts routed experts per layer, top---topk, the tiny preset otherwise
widened to --hidden) is written in DeepSeek's layout (MXFP4 experts, FP8 projections), then batch-1
cached decode runs (eager step, --decode tokens after a --prompt-token prompt) with:
  resident      every expert kept in memory as shipped (load_official(keep_quantized=True))
  streamed/all  experts read from the shards on use into a cache as large as all of them (warm: the
                cache fills during the prompt, then every read is a hit)
  streamed/F    a cache of F x the experts' bytes (--fraction), the shards in the OS page cache
  cold/F        the same, with the shards dropped from the page cache before every step (each miss
                reads the disk: the regime of a model larger than RAM), read-ahead on
  cold/F/no-ra  the same without read-ahead
For each: tokens/s, resident bytes (parameters and buffers + the expert cache), expert bytes read per
token, cache hit rate, and how many of the experts a layer used had been guessed by read-ahead.

Ends with
  RESULT expert_cache_over_budget X (goal <= 1)           expert cache bytes of streamed/F over its budget
  RESULT streamed_resident_over_resident X (goal none)    resident bytes, streamed/F over resident
  RESULT streamed_warm_decode_vs_resident X (goal >= 0.8) tokens/s, streamed/all over resident
  RESULT read_ahead_guess_rate X (goal none)             used experts that read-ahead had guessed
  RESULT read_ahead_cold_speedup X (goal > 1)            tokens/s, cold/F over cold/F/no-ra

Usage: python benchmarks/streamed_experts.py [--experts 64] [--topk 4] [--hidden 512] [--fraction 0.25]
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
from _common import drop_page_cache, hardware_info, randomize_

from dsv4.config import ModelConfig
from dsv4.convert.official import load_official, save_official, to_official_dir
from dsv4.infer.cache import ModelCache
from dsv4.model.transformer import Transformer
from dsv4.quant.execution import resident_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.25, help="expert cache size, as a share of all experts")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--ckpt",
        help="a trained run (e.g. runs/demo): its model is written in DeepSeek's layout and decodes real text "
        "(teacher-forced), so the read-ahead guesses meet a trained router; default: the random model above",
    )
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def config(args) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(
        hidden_size=args.hidden,
        moe_intermediate_size=args.hidden,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.topk,
    )


def token_ids(args, vocab: int) -> torch.Tensor:
    """[1, prompt + decode] ids: a stdlib source file through the run's tokenizer (--ckpt), else random."""
    if args.ckpt:
        import inspect
        import json as json_module

        from dsv4.data import load_tokenizer
        from dsv4.run import RunDir

        tok = load_tokenizer(RunDir(args.ckpt).tokenizer)
        ids = tok.encode(inspect.getsource(json_module.decoder)).ids[: args.prompt + args.decode]
        return torch.tensor([ids])
    return torch.randint(2, vocab, (1, args.prompt + args.decode), generator=torch.Generator().manual_seed(0))


def decode(model, args, directory: Path | None = None) -> dict:
    """Prompt, then --decode timed steps, teacher-forced (the page cache dropped before each when directory
    is given)."""
    store = getattr(model, "expert_store", None)
    ids = token_ids(args, model.cfg.vocab_size)
    cache = ModelCache(model, batch=1, capacity=args.prompt + args.decode + 8)
    times = []
    with torch.no_grad():
        model(ids[:, : args.prompt], cache=cache, last_only=True)
        if store is not None:
            store.drain()
            store.stats.clear()
        for t in range(args.prompt, args.prompt + args.decode):
            if directory is not None:
                if store is not None:
                    store.drain()
                drop_page_cache(directory)
            t0 = time.perf_counter()
            model(ids[:, t : t + 1], cache=cache, last_only=True)
            times.append(time.perf_counter() - t0)
    res = dict(tok_s=1.0 / statistics.median(times), resident_bytes=resident_bytes(model))
    if store is not None:
        store.drain()
        s = store.stats
        res.update(
            resident_bytes=res["resident_bytes"] + store.bytes,
            cache_bytes=store.bytes,
            read_bytes_per_token=s["read_bytes"] / args.decode,
            hit_rate=s["hits"] / max(1, s["hits"] + s["misses"] + s["ahead_waits"]),
            guess_rate=s["guessed_used"] / max(1, s["used_after_guess"]),
            ms_per_read=1e3 * s["read_seconds"] / max(1, s["reads"]),
        )
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(dir=".")  # on the disk (a tmpfs /tmp could not be dropped from memory)
    if args.ckpt:
        directory = to_official_dir(args.ckpt, Path(tmp.name) / "model")
        cfg = ModelConfig.from_json(directory / "config.json")
    else:
        cfg = config(args)
        torch.manual_seed(0)
        model = Transformer(cfg)
        randomize_(model)
        directory = save_official(model, Path(tmp.name) / "model", max_shard_bytes=64 << 20)
        del model
    kept = load_official(directory, keep_quantized=True).eval()
    expert_bytes = sum(t.nbytes for name, t in kept.named_buffers() if ".ffn.experts." in name)
    print(
        f"dsv4 streamed experts: {cfg.n_routed_experts} experts x {cfg.num_hidden_layers} layers, "
        f"top-{cfg.num_experts_per_tok}, "
        f"hidden {cfg.hidden_size}; experts {expert_bytes / 2**20:.1f} MiB as shipped (MXFP4); "
        f"{hardware_info()['cpu']}, {torch.get_num_threads()} threads"
    )
    runs: dict[str, dict] = {}
    runs["resident"] = decode(kept, args)
    del kept
    budget = int(args.fraction * expert_bytes)
    variants = [
        ("streamed/all", 2 * expert_bytes, True, False),
        (f"streamed/{args.fraction:g}", budget, True, False),
        (f"cold/{args.fraction:g}", budget, True, True),
        (f"cold/{args.fraction:g}/no-ra", budget, False, True),
    ]
    for name, cap, ahead, cold in variants:
        m = load_official(directory, keep_quantized=True, max_resident_bytes=cap).eval()
        m.expert_store.ahead = ahead
        runs[name] = decode(m, args, directory if cold else None)
        m.expert_store.close()
        del m
    base = runs["resident"]
    print(
        f"{'variant':<22}{'tok/s':>9}{'vs resident':>13}{'resident MiB':>14}{'read KiB/tok':>14}"
        f"{'ms/read':>9}{'hits':>7}{'guessed':>9}"
    )
    for name, r in runs.items():
        print(
            f"{name:<22}{r['tok_s']:>9.1f}{r['tok_s'] / base['tok_s']:>12.2f}x{r['resident_bytes'] / 2**20:>14.1f}"
            f"{r.get('read_bytes_per_token', 0) / 1024:>14.0f}{r.get('ms_per_read', 0):>9.2f}"
            f"{r.get('hit_rate', 1.0):>7.2f}{r.get('guess_rate', float('nan')):>9.2f}"
        )
    frac = f"{args.fraction:g}"
    res = dict(
        command="python " + " ".join(sys.argv),
        hardware=hardware_info(),
        config=dict(
            experts=cfg.n_routed_experts,
            topk=cfg.num_experts_per_tok,
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
        ),
        expert_bytes=expert_bytes,
        runs=runs,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    part = runs[f"streamed/{frac}"]
    print(f"RESULT expert_cache_over_budget {part['cache_bytes'] / budget:.3f} (goal <= 1)")
    print(f"RESULT streamed_resident_over_resident {part['resident_bytes'] / base['resident_bytes']:.3f} (goal none)")
    print(f"RESULT streamed_warm_decode_vs_resident {runs['streamed/all']['tok_s'] / base['tok_s']:.3f} (goal >= 0.8)")
    print(f"RESULT read_ahead_guess_rate {runs[f'cold/{frac}']['guess_rate']:.3f} (goal none)")
    speed = runs[f"cold/{frac}"]["tok_s"] / runs[f"cold/{frac}/no-ra"]["tok_s"]
    print(f"RESULT read_ahead_cold_speedup {speed:.3f} (goal > 1)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
