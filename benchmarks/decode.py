"""Cached decode speed of dsv4 against transformers' DeepseekV4 in the same run: tokens/s at batch 1 and 8
for contexts 1K, 32K, 128K, flatness in context, memory-bandwidth utilisation (MBU) on the `wide` preset,
ops per decode step, MTP speculative acceptance and speed-up.

Everything is measured in one run on this machine:
- model: the tiny preset with random weights (or --ckpt RUN, a trained run);
- decode step: the compiled step (dsv4.infer.compiled.CompiledDecoder: one compiled graph per shape bucket)
  or, with --eager or when that module is missing, the eager `model(tok, cache=cache, last_only=True)`.
  Compilation happens in the warm-up steps, before timing; the compile time of each bucket is printed;
- context: random token ids prefilled with the cached path (chunks of --prefill-chunk); for batch B the
  prefilled row is copied to the other rows (same context; each row then decodes its own token);
  prefill tokens/s is the first row's prefill;
- decode: --steps greedy steps of the whole batch after --warmup steps; tokens/s = B / median step time;
- transformers: DeepseekV4ForCausalLM (eager attention, its own KV cache: one full forward of the context
  with use_cache=True, then one token per forward with the returned cache) on the same config and the
  same weights (dsv4.convert.transformers), batch 1, at the reference context (1K) and --hf-contexts;
- bytes per step: the weights a step reads, each once (every main-model parameter except the routed
  experts and the embedding; of the routed experts the expected share a batch touches,
  1 - (1 - k/E)^B; of the embedding the B rows used) plus the cache it reads per row (the window, the
  HCA entries, the CSA/DSA indexer keys scanned and the top-k entries gathered, at the cache's storage
  format);
- MBU = bytes per step / step time / copy bandwidth, where the copy bandwidth is torch `copy_` of a
  256 MiB fp32 tensor (read + write bytes, best of 5) measured in the same run. The headline MBU is
  batch-1 decode of the `wide` preset (>= 300 MB of active weights per token) at --wide-context;
- ops per step: aten ops the profiler records in one batch-1 decode step (eager, and compiled);
- MTP: the engine with and without speculative decoding, greedy, from one prompt; acceptance rate =
  accepted drafts / drafts; speed-up = speculative tokens/s / plain tokens/s. Random weights make the MTP
  head useless (acceptance ~0): pass --ckpt RUN (a run trained with its MTP block) for a real number.

The script ends with (nan where a part was skipped):
  RESULT decode_vs_transformers_b1 X (goal 5)   dsv4 / transformers batch-1 tok/s at 1K
  RESULT decode_flatness_1k_128k X (goal 1.3)   batch-1 step time at the largest context run / at 1K
  RESULT decode_b8_over_b1 X (goal 4)           batch-8 / batch-1 tok/s at 1K
  RESULT decode_mbu X (goal 0.6)                wide preset, batch 1

--preset tiny-v3.2 runs the V3.2 family instead (MLA in the absorbed form, the official decode path: the
cache holds one [latent, rope key] row per token and layer and the query absorbs W_UK, the output W_UV;
transformers' DeepseekV32ForCausalLM is the baseline) and prints the cache bytes per token, held here
and in the served layout, beside the V4 presets'.

Usage
  .venv/bin/python benchmarks/decode.py                          # 1K/32K/128K, batch 1 and 8, all parts (./decode.png)
  .venv/bin/python benchmarks/decode.py --contexts 1024 --batches 1 --ckpt runs/mtp    # real MTP numbers
  .venv/bin/python benchmarks/decode.py --eager --contexts 1024 32768 --json out.json --plot out.png
  .venv/bin/python benchmarks/decode.py --replot docs/decode.json --plot docs/img/decode.png   # redraw only
  .venv/bin/python benchmarks/decode.py --contexts 256 --batches 1 2 --steps 3 --warmup 1 \\
      --wide-context 64 --wide-steps 2 --no-mtp --no-transformers                   # smoke run, seconds
  .venv/bin/python benchmarks/decode.py --preset tiny-v3.2 --wide-context 0 --json docs/decode_v32.json \
      --plot docs/img/decode_v32.png                                                # the V3.2 family
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import LoadMeter, fmt_tokens, hardware_info

from dsv4.config import ModelConfig
from dsv4.flops import count_params, kv_cache_bytes
from dsv4.infer.cache import ModelCache
from dsv4.infer.speculative import compare_speculative
from dsv4.model import build_model
from dsv4.quant.kv import KVCodec

REF_CONTEXT = 1024
GOALS = dict(decode_vs_transformers_b1=5, decode_flatness_1k_128k=1.3, decode_b8_over_b1=4, decode_mbu=0.6)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation happens here)")
    p.add_argument("--prefill-chunk", type=int, default=16384)
    p.add_argument("--eager", action="store_true", help="time the eager step instead of the compiled one")
    p.add_argument(
        "--twin-kernels",
        action="store_true",
        help="the decode step's PyTorch twins instead of its C++ kernels (indexer top-k, long attention parts): an A/B",
    )
    p.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp8"], default="fp32")
    p.add_argument("--ckpt", help="a training run (model + tokenizer); default: the preset, random weights")
    p.add_argument("--preset", default="tiny", help="model preset with random weights: tiny (V4) or tiny-v3.2")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' DeepseekV4")
    p.add_argument(
        "--hf-contexts",
        type=int,
        nargs="*",
        default=[],
        help="more contexts for transformers besides the reference (1K) one (it is slow at long ones)",
    )
    p.add_argument("--wide-context", type=int, default=256, help="context of the wide-preset MBU run (0: skip)")
    p.add_argument("--wide-steps", type=int, default=8)
    p.add_argument("--no-mtp", action="store_true", help="skip the MTP speculative comparison")
    p.add_argument("--mtp-tokens", type=int, default=64, help="tokens generated per MTP comparison run")
    p.add_argument("--no-profile", action="store_true", help="skip counting the ops of one step")
    p.add_argument("--json")
    p.add_argument("--plot", default="decode.png", help="PNG path (default: ./decode.png; '' = no plot)")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier run's --json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ measurements
def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write), best of 5."""
    a = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def entry_bytes(width: int, rope: int, fmt) -> int:
    """Stored bytes of one cached vector of `width` values in the cache format (fp32 / bf16 / "fp8")."""
    c = KVCodec(width, rope, fmt if fmt is not None else torch.float32)
    return c.stored_width * c.dtype.itemsize


def weight_bytes(model, batch: int) -> float:
    """Weight bytes one decode step of `batch` rows reads (MTP not run): every main-model parameter once,
    the routed experts' expected touched share, B rows of the embedding."""
    cfg = model.cfg
    pc = count_params(cfg, model)
    comp = pc["components"]
    esize = next(model.parameters()).element_size()
    routed, emb = comp.get("routed_experts", 0), comp.get("embedding", 0)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / e) ** batch if e else 0.0
    return esize * (pc["total"] - routed - emb + routed * touched + min(batch, cfg.vocab_size) * cfg.hidden_size)


def cache_bytes(cfg: ModelConfig, context: int, fmt) -> float:
    """Cache bytes one decode step reads per row at `context` tokens (main layers)."""
    kv = entry_bytes(cfg.kv_dim, cfg.qk_rope_head_dim, fmt)  # V3.2: the [latent, rope key] row
    ik = entry_bytes(cfg.index_head_dim, cfg.qk_rope_head_dim, fmt)
    total = 0
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.layer_kind(i), cfg.compress_ratio(i)
        total += min(context, cfg.window_of(i)) * kv  # the window (raw tokens; none in V3.2)
        n = context // m if m else 0
        if kind == "hca":
            total += n * kv  # every compressed entry
        elif kind in ("csa", "dsa"):
            total += n * ik + min(n, cfg.index_topk) * kv  # indexer keys scanned + top-k gathered
    return total


def step_bytes(model, batch: int, context: int, fmt) -> dict:
    w, c = weight_bytes(model, batch), cache_bytes(model.cfg, context, fmt) * batch
    return dict(weights=w, cache=c, total=w + c)


class EagerStep:
    """The uncompiled decode step, with CompiledDecoder's call signature."""

    def __init__(self, model):
        self.model, self.compile_seconds = model, {}

    def __call__(self, ids, cache, rows=None):
        return self.model(ids, cache=cache, rows=rows, last_only=True).logits[:, -1]


def make_step(model, eager: bool):
    """(step, label, note): the compiled step unless --eager or dsv4.infer.compiled is missing."""
    if not eager:
        try:
            from dsv4.infer.compiled import CompiledDecoder
        except ImportError as e:
            return EagerStep(model), "eager", f"compiled step unavailable ({e}): timing the eager step"
        return CompiledDecoder(model), "compiled", None
    return EagerStep(model), "eager", None


def count_ops(fn) -> dict:
    """aten ops the profiler records while fn() runs: all (nested ones included) and top-level (called
    from Python or a compiled graph, not from inside another aten op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def nested(ev):
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    aten = [ev for ev in prof.events() if ev.name.startswith("aten::")]
    return dict(all=len(aten), top=sum(1 for ev in aten if not nested(ev)))


@torch.no_grad()
def decode_case(model, step, context: int, batch: int, steps: int, args, ids, fmt, profile_ops=False) -> dict:
    cache = ModelCache(model, batch=batch, capacity=context + steps + args.warmup + 16, dtype=fmt)
    t0 = time.perf_counter()
    for s in range(0, context, args.prefill_chunk):
        model(ids[:, s : min(s + args.prefill_chunk, context)], cache=cache, rows=[0], last_only=True)
    prefill_s = time.perf_counter() - t0
    if batch > 1:
        cache.copy_row(0, list(range(1, batch)))
    tok = ids[0, context : context + 1].repeat(batch, 1)
    times = []
    for i in range(args.warmup + steps):
        t0 = time.perf_counter()
        tok = step(tok, cache).argmax(-1, keepdim=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    r = dict(
        context=context,
        batch=batch,
        prefill_s=prefill_s,
        prefill_tok_s=context / prefill_s,
        step_ms=step_s * 1e3,
        tok_s=batch / step_s,
        bytes=step_bytes(model, batch, context, fmt),
    )
    if profile_ops:  # one more step each way, on the same cache (capacity has room)
        eager = EagerStep(model)
        r["ops_eager"] = count_ops(lambda: eager(tok, cache))
        if not isinstance(step, EagerStep):
            r["ops_compiled"] = count_ops(lambda: step(tok, cache))
    return r


def build_transformers(model):
    """transformers' DeepseekV4ForCausalLM (DeepseekV32ForCausalLM for the V3.2 family) with the dsv4 model's
    config and weights (eager attention), or (None, reason)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    arch = "DeepseekV32ForCausalLM" if model.cfg.is_v32 else "DeepseekV4ForCausalLM"
    if not hasattr(transformers, arch):
        return None, f"transformers {transformers.__version__} has no {arch}"
    from dsv4.convert import v32
    from dsv4.convert.transformers import to_transformers_config, to_transformers_state_dict

    try:
        if model.cfg.is_v32:
            hf_cfg = v32.to_transformers_config(model.cfg)
            sd = v32.to_hub_state_dict(model.state_dict(), model.cfg, fuse_experts=True)
        else:
            hf_cfg = to_transformers_config(model.cfg)
            sd = to_transformers_state_dict(model.state_dict(), model.cfg)
        hf_cfg._attn_implementation = "eager"  # (V4 has no SDPA path; the same path for both)
        hf = getattr(transformers, arch)(hf_cfg).eval()
        missing, _ = hf.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "rotary" not in k]
    except Exception as e:  # e.g. an Engram config, which transformers does not have
        return None, f"transformers cannot build this config: {' '.join(str(e).split())[:200]}"
    if missing:
        return None, f"transformers model misses {len(missing)} weights (e.g. {missing[0]})"
    return hf, None


@torch.no_grad()
def hf_decode_case(hf, context: int, steps: int, args, ids) -> dict:
    """Batch-1 decode with transformers' own cache: a full forward of the context, then one token each."""
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    t0 = time.perf_counter()
    out = hf(ids[:, :context], use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    kv, tok = getattr(out, key), ids[:, context : context + 1]
    times = []
    for i in range(args.warmup + steps):
        t0 = time.perf_counter()
        out = hf(tok, use_cache=True, **{key: kv})
        kv, tok = getattr(out, key), out.logits[:, -1:].argmax(-1)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return dict(
        context=context,
        batch=1,
        prefill_s=prefill_s,
        prefill_tok_s=context / prefill_s,
        step_ms=step_s * 1e3,
        tok_s=1 / step_s,
    )


def mtp_case(model, tok, args) -> dict:
    g = torch.Generator().manual_seed(1)
    if tok is not None:
        prompt = tok.encode("def main():\n    import os\n    for name in os.listdir('.'):\n").ids
    else:
        prompt = torch.randint(2, model.cfg.vocab_size, (64,), generator=g).tolist()
    return dict(compare_speculative(model, prompt, args.mtp_tokens), trained=tok is not None)


def cache_report(model, fmt) -> dict:
    """Cache bytes per token of context: held by this model's ModelCache (storage format fmt, growing stores
    only) and in the served layout (dsv4.flops.kv_cache_bytes), with the V4 and V3.2 presets beside it."""
    cfg = model.cfg
    cache = ModelCache(model, batch=1, capacity=64, dtype=fmt)
    model(torch.zeros(1, 32, dtype=torch.long), cache=cache, last_only=True)
    presets = {}
    for p_name in ("v4-flash", "v4-pro", "v3.2"):
        kv = kv_cache_bytes(ModelConfig.preset(p_name))
        per_layer = (
            f"{kv['entry_bytes']} B latent row + {kv['indexer_key_bytes']} B indexer key per layer"
            if p_name == "v3.2"
            else f"{kv['entry_bytes']} B entries over m, {kv['indexer_key_bytes']} B indexer keys"
        )
        presets[p_name] = dict(per_token=kv["per_token"], per_layer=per_layer)
    return dict(held=cache.used_bytes(0)["per_token"], served=kv_cache_bytes(cfg)["per_token"], presets=presets)


# ------------------------------------------------------------------------------ report
def row(name, r, bw) -> str:
    b = r.get("bytes")
    mb = f"{b['total'] / 1e6:9.1f}" if b else f"{'-':>9}"
    mbu = f"{b['total'] / (r['step_ms'] / 1e3) / bw:6.3f}" if b else f"{'-':>6}"
    return (
        f"  {name:<22} {fmt_tokens(r['context']):>7} {r['batch']:>5} {r['tok_s']:9.1f} {r['step_ms']:9.2f} "
        f"{mb} {mbu} {r['prefill_tok_s']:11.0f}"
    )


def fmt_bucket(key) -> str:
    """A CompiledDecoder shape-bucket key (batch, rows, store capacities) in a few words."""
    if isinstance(key, tuple) and len(key) == 3 and isinstance(key[2], tuple):
        caps = sorted(set(key[2]))
        return f"batch {key[0]}, store capacities {'/'.join(map(str, caps))}"
    return str(key)


def ratio(a, b) -> float:
    return a / b if a is not None and b else float("nan")


def make_plot(res: dict, path: str) -> str | None:
    """tokens/s against context, one line per batch size, with transformers' batch-1 point(s)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    cases = [c for c in res["cases"] if "tiny" in str(c.get("model", "tiny"))] or res["cases"]
    for b in sorted({c["batch"] for c in cases}):
        pts = sorted((c["context"], c["tok_s"]) for c in cases if c["batch"] == b)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"dsv4, batch {b}")
    hf = res.get("transformers_cases") or []
    if hf:
        ax.plot(
            [c["context"] for c in hf],
            [c["tok_s"] for c in hf],
            "s",
            color="k",
            label="transformers DeepseekV4, batch 1",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"decode, {res.get('step', 'dsv4')} step, {res['hardware']['cpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:  # redraw the plot of an earlier run's JSON (no measurement)
        with open(args.replot) as f:
            print(f"plot: {make_plot(json.load(f), args.plot or 'decode.png')}")
        return 0
    fmt = {"fp32": None, "bf16": torch.bfloat16, "fp8": "fp8"}[args.cache_dtype]
    if args.twin_kernels:
        import dsv4.kernels.decode_attention as decode_attention
        import dsv4.kernels.indexer_topk as indexer_topk

        indexer_topk.USE_NATIVE = decode_attention.USE_NATIVE = False
    cmd = sys.argv if argv is None else ["decode.py", *argv]
    res = dict(command="python " + " ".join(shlex.quote(a) for a in cmd), hardware=hardware_info(), cases=[], notes=[])
    notes = res["notes"]
    tok = None
    if args.ckpt:
        from dsv4.run import load_run

        model, tok = load_run(args.ckpt)
    else:
        torch.manual_seed(0)
        model = build_model(ModelConfig.preset(args.preset)).eval()
    name = "run" if args.ckpt else args.preset
    step, label, note = make_step(model, args.eager)
    if note:
        notes.append(note)
    res["step"] = label
    print(
        f"dsv4 decode benchmark: {'run ' + args.ckpt if args.ckpt else args.preset + ' preset, random weights'}, "
        f"{label} step, cache {args.cache_dtype}, {res['hardware']['cpu']}, {torch.get_num_threads()} threads",
        flush=True,
    )
    bw = copy_bandwidth()
    res["copy_bandwidth_gb_s"] = bw / 1e9
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    contexts = sorted(set(args.contexts))
    ref_ctx = REF_CONTEXT if REF_CONTEXT in contexts else contexts[0]
    if ref_ctx != REF_CONTEXT:
        notes.append(f"1K context not run: ratios use {fmt_tokens(ref_ctx)} instead")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        2, model.cfg.vocab_size, (1, max(contexts + args.hf_contexts + [args.wide_context]) + 1), generator=g
    )
    load = LoadMeter()
    header = (
        f"  {'model':<22} {'context':>7} {'batch':>5} {'tok/s':>9} {'ms/step':>9} {'MB/step':>9} {'MBU':>6} "
        f"{'prefill t/s':>11}"
    )
    print("decode (MBU = bytes read per step / step time / copy bandwidth):")
    print(header, flush=True)
    for ctx in contexts:
        for b in args.batches:
            prof = not args.no_profile and ctx == ref_ctx and b == min(args.batches)
            r = decode_case(model, step, ctx, b, args.steps, args, ids, fmt, profile_ops=prof)
            r["model"] = "dsv4 " + name
            res["cases"].append(r)
            print(row(f"{r['model']} ({label})", r, bw), flush=True)
    hf_cases = []
    if not args.no_transformers:
        hf, why = build_transformers(model)
        if hf is None:
            notes.append(f"transformers not measured: {why}")
        else:
            for ctx in sorted({ref_ctx, *args.hf_contexts}):
                r = hf_decode_case(hf, ctx, args.steps, args, ids)
                r["model"] = "transformers " + ("DeepseekV32" if model.cfg.is_v32 else "DeepseekV4")
                hf_cases.append(r)
                print(row("transformers (eager)", r, bw), flush=True)
            del hf
    res["transformers_cases"] = hf_cases
    wide = None
    if args.wide_context > 0:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        wmodel = build_model(ModelConfig.preset("wide")).eval()
        build_s = time.perf_counter() - t0
        wstep, wlabel, _ = make_step(wmodel, args.eager)
        wide = decode_case(
            wmodel, wstep, args.wide_context, 1, args.wide_steps, args, ids.remainder(wmodel.cfg.vocab_size), fmt
        )
        wide.update(
            model="dsv4 wide",
            build_s=build_s,
            compile_seconds={fmt_bucket(k): v for k, v in wstep.compile_seconds.items()},
            mbu=wide["bytes"]["total"] / (wide["step_ms"] / 1e3) / bw,
            active_weight_mb=weight_bytes(wmodel, 1) / 1e6,
        )
        print(row(f"dsv4 wide ({wlabel})", wide, bw), flush=True)
        del wmodel, wstep
    res["wide"] = wide
    largest = max(contexts)
    if largest != 131072:
        notes.append(f"flatness: 128K not run, the largest context run is {fmt_tokens(largest)}")
    comp = {
        **{f"{name}: {fmt_bucket(k)}": v for k, v in step.compile_seconds.items()},
        **({f"wide: {k}": v for k, v in wide["compile_seconds"].items()} if wide else {}),
    }
    res["compile_seconds"] = comp
    if comp:
        print("compile time per shape bucket (paid in the warm-up, not timed):")
        for k, v in comp.items():
            print(f"  {k}: {v:.1f} s")
    pr = next((c for c in res["cases"] if "ops_eager" in c), None)
    if pr:

        def ops(d):
            return f"{d['top']} top-level / {d['all']} with nested"

        print(
            f"aten ops per decode step (profiler, batch {pr['batch']}, {fmt_tokens(pr['context'])} context): "
            f"eager {ops(pr['ops_eager'])}; "
            + (
                f"compiled {ops(pr['ops_compiled'])}"
                if "ops_compiled" in pr
                else f"compiled: not run ({note or '--eager'})"
            )
        )
    if wide:
        print(
            f"wide preset: {wide['active_weight_mb']:.0f} MB of weights read per token, built in "
            f"{wide['build_s']:.1f} s; batch-1 decode at {fmt_tokens(wide['context'])}: "
            f"MBU {wide['mbu']:.3f} of {bw / 1e9:.1f} GB/s"
        )
    if not args.no_mtp and model.cfg.num_nextn_predict_layers == 0:
        notes.append("MTP not measured: the model has no MTP block")
        print(notes[-1])
    elif not args.no_mtp:
        res["mtp"] = m = mtp_case(model, tok, args)
        print(
            f"MTP speculative (greedy, {args.mtp_tokens} tokens): acceptance {100 * m['acceptance']:.0f}%, "
            f"{m['mtp_tok_s']:.1f} vs {m['plain_tok_s']:.1f} tok/s = {m['speedup']:.2f}x, identical output: "
            f"{m['identical']}"
            + ("" if m["trained"] else "  [random weights: the MTP head is untrained, pass --ckpt RUN]")
        )
    res["cache_bytes"] = cb = cache_report(model, fmt)
    print(
        f"cache bytes per token of context ({name}, main layers): {cb['held']:.0f} B held here "
        f"({args.cache_dtype}), {cb['served']:.0f} B in the served layout"
    )
    for p_name, v in cb["presets"].items():
        print(f"  {p_name:<9} served layout: {v['per_token']:>9,.0f} B per token ({v['per_layer']})")
    res["other_load"] = load.other_cores()
    print(f"other processes used {res['other_load'] or 0:.2f} cores on average")

    def tok_s(ctx, b, cases=res["cases"]):
        return next((c["tok_s"] for c in cases if c["context"] == ctx and c["batch"] == b), None)

    def step_ms(ctx, b):
        return next((c["step_ms"] for c in res["cases"] if c["context"] == ctx and c["batch"] == b), None)

    b1 = 1 if 1 in args.batches else min(args.batches)
    bn = 8 if 8 in args.batches else max(args.batches)
    if b1 != 1:
        notes.append(f"batch 1 not run: batch-1 figures use batch {b1}")
    if bn != 8:
        notes.append(f"batch 8 not run: b8/b1 uses batch {bn}" if bn != b1 else "only one batch size: no b8/b1")
    results = dict(
        decode_vs_transformers_b1=ratio(tok_s(ref_ctx, b1), tok_s(ref_ctx, 1, hf_cases)),
        decode_flatness_1k_128k=ratio(step_ms(largest, b1), step_ms(ref_ctx, b1)),
        decode_b8_over_b1=ratio(tok_s(ref_ctx, bn), tok_s(ref_ctx, b1)) if bn != b1 else float("nan"),
        decode_mbu=wide["mbu"] if wide else float("nan"),
    )
    res["results"] = results
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.plot:
        print(f"plot: {make_plot(res, args.plot)}")
    for name, v in results.items():
        print(f"RESULT {name} {'nan' if math.isnan(v) else f'{v:.3f}'} (goal {GOALS[name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
