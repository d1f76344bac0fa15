"""Decode a model whose checkpoint is larger than this machine's RAM, its routed experts streamed from disk.

1. A child process writes a random checkpoint in DeepSeek's layout with V4-Flash's expert shape (hidden
   4096, 256 routed experts of 2048, top-6, MXFP4) and --layers layers, so that its shards total about
   --ram-factor x this machine's RAM. To keep the benchmark about the experts, the dense parts are slimmer
   than V4-Flash's (vocab --vocab, 16 heads); they are written FP8 / bf16 and held dequantised (fp32).
2. The disk's read bandwidth at the granularity the store reads (one expert: 6 tensors, ~13 MB, at
   random places in the shards) is measured with the shards dropped from the page cache.
3. The model loads with --max-resident-gb of expert cache and decodes --decode tokens (batch 1, eager).
   Before every step the shards are dropped from the page cache (posix_fadvise DONTNEED), so every
   expert the cache misses comes from the disk.
4. Reported: tokens/s, peak RSS of this process (it never held the checkpoint), bytes read from the disk
   per token (/proc/self/io) against the routed experts' bytes a token uses (k x layers x expert), and
   the disk bandwidth the decode used against the measured one. The checkpoint is deleted at the end.

Ends with
  RESULT larger_than_ram_shards_over_ram X (goal >= 1.5)
  RESULT larger_than_ram_peak_rss_over_ram X (goal < 1)
  RESULT larger_than_ram_disk_bw_use X (goal >= 0.5)   decode's disk read rate / measured bandwidth
  RESULT larger_than_ram_tok_s X (goal none)

Usage: python benchmarks/larger_than_ram.py [--layers N] [--ram-factor 1.5] [--max-resident-gb 2] [--dir D]
(--dir: where to write, default ./larger_than_ram.tmp; --keep keeps it for another run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import drop_page_cache, hardware_info

from dsv4.config import ModelConfig

EXPERT_MATS = ("w1", "w2", "w3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="default: enough for --ram-factor x RAM")
    p.add_argument("--ram-factor", type=float, default=1.5)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--max-resident-gb", type=float, default=2.0, help="expert cache")
    p.add_argument("--decode", type=int, default=12)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--probe-reads", type=int, default=48, help="experts read to measure the disk")
    p.add_argument("--dir", default="larger_than_ram.tmp")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (a later run reuses it)")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json")
    return p.parse_args(argv)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def expert_bytes(cfg: ModelConfig) -> int:
    """One routed expert as shipped: three [2048, 4096]-sized MXFP4 matrices (codes + e8m0 scales)."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    return 3 * (d * i // 2 + d * i // 32)


def config(args) -> ModelConfig:
    flash = ModelConfig.preset("v4-flash")
    layers = args.layers or max(
        1, int(args.ram_factor * ram_bytes() / (flash.n_routed_experts * expert_bytes(flash))) + 1
    )
    ratios = [[0, 4, 128, 4][i % 4] for i in range(layers)]
    return flash.replace(
        num_hidden_layers=layers,
        compress_ratios=ratios,
        num_hash_layers=min(flash.num_hash_layers, layers),
        num_nextn_predict_layers=0,
        vocab_size=args.vocab,
        num_attention_heads=16,
        max_position_embeddings=4096,
    )


def write_checkpoint(cfg: ModelConfig, out: Path) -> None:
    """Dense parts from a real init (the experts replaced by empty modules, so never allocated), written
    FP8 / bf16; then each layer's 256 experts as random MXFP4 codes with e8m0 scales near 2^-8, one
    shard per layer, written and freed one layer at a time."""
    from safetensors.torch import save_file
    from torch import nn

    from dsv4.convert.official import official_state_dict
    from dsv4.model.moe import Experts
    from dsv4.model.transformer import Transformer

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    for n in names:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Module())
    model.to_empty(device="cpu")
    model.init_buffers()
    model.init_weights(seed=0)
    weight_map: dict[str, str] = {}
    dense = official_state_dict(model)
    save_file(dense, str(out / "dense.safetensors"))
    weight_map.update(dict.fromkeys(dense, "dense.safetensors"))
    total = sum(t.nbytes for t in dense.values())
    del model, dense
    g = torch.Generator().manual_seed(0)
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for li, n in enumerate(names):
        shard, tensors = f"experts-{li:03d}.safetensors", {}
        for e in range(cfg.n_routed_experts):
            for w, (rows, cols) in zip(EXPERT_MATS, ((inter, d), (d, inter), (inter, d))):
                key = f"{n}.{e}.{w}"
                tensors[key + ".weight"] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=g)
                scale = torch.randint(118, 122, (rows, cols // 32), dtype=torch.uint8, generator=g)
                tensors[key + ".scale"] = scale.view(torch.float8_e8m0fnu)
        save_file(tensors, str(out / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        print(f"  wrote {shard} ({(out / shard).stat().st_size / 2**30:.2f} GiB)", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg.to_json(out / "config.json")


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def disk_bandwidth(directory: Path, cfg: ModelConfig, n: int) -> float:
    """Bytes/s reading whole experts (their 6 tensors, as the store reads them) at random, cold."""
    from dsv4.quant.streamed import ExpertStore

    where = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    store = ExpertStore(directory, where, 1)
    rng = random.Random(0)
    mods = sorted({k.rsplit(".", 3)[0] for k in where if ".ffn.experts." in k})
    drop_page_cache(directory)
    t0, nbytes = time.perf_counter(), 0
    for _ in range(n):
        m, e = rng.choice(mods), rng.randrange(cfg.n_routed_experts)
        for w in EXPERT_MATS:
            for part in ("weight", "scale"):
                nbytes += store.read_tensor(f"{m}.{e}.{w}.{part}").nbytes
    seconds = time.perf_counter() - t0
    store.close()
    return nbytes / seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config(args)
    directory = Path(args.dir)
    if args.write_only:
        write_checkpoint(cfg, directory)
        return 0
    if not (directory / "config.json").exists() or ModelConfig.from_json(directory / "config.json") != cfg:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"writing a {cfg.num_hidden_layers}-layer checkpoint to {directory} (child process) ...", flush=True)
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            __file__,
            "--write-only",
            "--dir",
            str(directory),
            "--layers",
            str(cfg.num_hidden_layers),
        ]
        subprocess.run(cmd + ["--vocab", str(args.vocab)], check=True)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    shards = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    ram = ram_bytes()
    print(
        f"dsv4 larger than RAM: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts of "
        f"{cfg.moe_intermediate_size} x {cfg.hidden_size}, top-{cfg.num_experts_per_tok}; shards "
        f"{shards / 2**30:.1f} GiB = {shards / ram:.2f}x RAM ({ram / 2**30:.1f} GiB); {hardware_info()['cpu']}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    bw = disk_bandwidth(directory, cfg, args.probe_reads)
    print(f"disk: {bw / 2**20:.0f} MiB/s reading whole experts at random, cold", flush=True)

    from dsv4.convert.official import load_official
    from dsv4.infer.cache import ModelCache

    t0 = time.perf_counter()
    model = load_official(directory, max_resident_bytes=int(args.max_resident_gb * 2**30)).eval()
    store = model.expert_store
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    ids = torch.randint(2, cfg.vocab_size, (1, args.prompt + args.decode), generator=torch.Generator().manual_seed(0))
    cache = ModelCache(model, batch=1, capacity=args.prompt + args.decode + 8)
    times, read = [], 0
    with torch.no_grad():
        model(ids[:, : args.prompt], cache=cache, last_only=True)
        store.drain()
        store.stats.clear()
        for t in range(args.prompt, args.prompt + args.decode):
            store.drain()
            drop_page_cache(directory)
            r0, t1 = disk_read_bytes(), time.perf_counter()
            model(ids[:, t : t + 1], cache=cache, last_only=True)
            store.drain()
            times.append(time.perf_counter() - t1)
            read += disk_read_bytes() - r0
            print(f"  token {t - args.prompt + 1}/{args.decode}: {times[-1]:.2f} s", flush=True)
    seconds = sum(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    used = cfg.num_experts_per_tok * cfg.num_hidden_layers * expert_bytes(cfg)
    s = store.stats
    res = dict(
        command="python " + " ".join(sys.argv),
        hardware=hardware_info(),
        layers=cfg.num_hidden_layers,
        shards_bytes=shards,
        ram_bytes=ram,
        disk_bytes_per_s=bw,
        tok_s=args.decode / seconds,
        peak_rss_bytes=peak,
        disk_bytes_per_token=read / args.decode,
        expert_bytes_per_token=used,
        store_read_bytes_per_token=s["read_bytes"] / args.decode,
        hit_rate=s["hits"] / max(1, s["hits"] + s["misses"] + s["ahead_waits"]),
        guess_rate=s["guessed_used"] / max(1, s["used_after_guess"]),
        decode_disk_rate=read / seconds,
    )
    print(
        f"decode: {res['tok_s']:.2f} tok/s; peak RSS {peak / 2**30:.2f} GiB; read from disk "
        f"{res['disk_bytes_per_token'] / 2**20:.0f} MiB/token (the experts a token routes to: {used / 2**20:.0f} MiB; "
        f"the store read {res['store_read_bytes_per_token'] / 2**20:.0f} MiB/token, cache hits {res['hit_rate']:.2f}, "
        f"read-ahead guessed {res['guess_rate']:.2f}); disk rate {res['decode_disk_rate'] / 2**20:.0f} MiB/s = "
        f"{res['decode_disk_rate'] / bw:.2f} of the measured {bw / 2**20:.0f} MiB/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    store.close()
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"RESULT larger_than_ram_shards_over_ram {shards / ram:.3f} (goal >= 1.5)")
    print(f"RESULT larger_than_ram_peak_rss_over_ram {peak / ram:.3f} (goal < 1)")
    print(f"RESULT larger_than_ram_disk_bw_use {res['decode_disk_rate'] / bw:.3f} (goal >= 0.5)")
    print(f"RESULT larger_than_ram_tok_s {res['tok_s']:.3f} (goal none)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
