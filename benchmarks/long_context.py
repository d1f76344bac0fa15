"""Long-context cost of ONE dsv4 attention layer: prefill time / peak memory and decode time per token.

Everything is measured in ONE run, on the same head configuration, so the ratios are meaningful even
when absolute numbers are not comparable across machines.

Head configuration: the tiny preset's attention (ModelConfig.preset('tiny')): hidden 256, 4 heads x
head_dim 64 (rope 16), q/o LoRA rank 128, 2 output groups, indexer 4 heads x 32. --hidden, --heads,
--head-dim, --rope-dim, --index-heads, --index-dim override it. --window sets sliding_window (128).

Kinds (one `dsv4.model.attention.Attention` layer each, built from
ModelConfig.preset('tiny').replace(num_hidden_layers=1, compress_ratios=[m], sliding_window=128, ...),
run with its default impl "sparse", the long-context path):
  dense  causal SDPA baseline: the SAME projections as the V4 layer (W_qa, q_norm, W_qb, per-head rms,
         RoPE, W_kv, kv_norm, RoPE, output de-rotation, grouped W_oa/W_ob) but the core is
         F.scaled_dot_product_attention(q, k, v, is_causal=True) over ALL previous tokens, with the
         single kv head expanded to the 4 query heads (MQA, K = V); no sink, no compression.
  dsa    compress ratio 1, index_topk 2048, window 128 (indexer ranks every raw token outside the window)
  csa    ratio 4 (overlapped compressor), index_topk 512, window 128
  hca    ratio 128, window 128 (all complete entries attended densely)
The V3.2 family (ModelConfig.preset('tiny-v3.2') with index_topk 2048: hidden 256, 4 heads, MLA latent 64 +
rope key 16, nope 32, v 32, q LoRA 128, indexer 4 x 32), compared with its own dense baseline:
  mla    dense MLA prefill as the official code and transformers do it: the latent expanded into per-head
         keys [k_nope, k_pe] and values, causal SDPA over ALL previous tokens (the V3.2 dense baseline);
  v32    the V3.2 DSA layer (dsv4.model.mla): the V3.2 indexer ranks every raw token s <= t, top-2048,
         attention in the absorbed form over the selected latent rows only (no window, no sink).
  "vs dense" of v32 is mla's time / v32's time.

(a) Prefill: forward of the whole layer (no grad, B=1, fp32) at T = --sizes (default 4K 16K 64K 128K).
    Time = median of the runs (one run for cases over --min-time s, else up to --repeats); "vs dense"
    = dense time / kind time at the same T. Peak memory = growth of the process's RSS high-water mark
    (VmHWM, reset through /proc/self/clear_refs before each case) above the RSS just before the case,
    measured over the case's first run, with glibc's malloc_trim before each case so that pages freed by
    earlier cases are not silently reused (the default malloc settings are kept: forcing every block to
    mmap would make the chunked kernels ~1.8x slower through page faults). It includes allocator
    fragmentation, as a real process would see it. Inputs (x [1,T,hidden], RoPE tables) are allocated
    before the reset and are not counted; everything the layer allocates (projections, kv, compressed
    entries, indexer keys, top-k ids [T, k] int64, chunk buffers, the output) is. "kv+entries" prints the
    bytes of raw kv + compressed entries + indexer keys for reference, "B/token" = peak / T (flat or
    falling in T = memory linear in T, no T^2 term).
(b) Decode: one decode step's CORE work at context S = --decode-sizes (default 4K 16K 64K 256K 1M),
    for the query at position S-1 with q_pos=[S-1], kv_pos=arange(S):
      csa   chunked_indexer_topk over the S/4 compressed indexer keys + top-512 + sparse_attention
            (gather of the selected entries + the raw window);
      dsa   the same over all S raw tokens, top-2048, ratio 1, window excluded from the ranking;
      hca   dense_entries_attention over the S/128 entries + the raw window;
      dense SDPA of the 4 query heads over all S keys (reference);
      v32   the V3.2 indexer over all S raw tokens, top-2048, + sparse_attention over the selected latent rows
            (the absorbed query against [c_kv, k_pe], the official decode form);
      mla   dense absorbed MLA decode: SDPA of the absorbed queries over all S latent rows (its baseline).
    The context (raw kv [S,c], compressed entries, indexer keys) is precomputed as RANDOM tensors of
    the right shapes: no KV cache is involved (the cache is another issue), and the per-token projections
    and compressor update (O(1) per token) are not included. Time = median over repeated calls.

Skipping: --skip-dense-above N skips dense prefill for T > N (dense SDPA at 128K takes about a minute on
2 cores); --skip-above KIND=N does the same for any kind; --max-case-s S (default 240) skips a prefill
case whose time, extrapolated quadratically from the same kind's previous size, would exceed S seconds
(on the 2-core dev machine this drops DSA at 128K, predicted ~13 min: its indexer top-k is O(T^2) with a
sort-merge per key block). Every skip is printed and recorded in the JSON.

Output: hardware, the command, per-case lines, the final tables, a target check, --json OUT, and a log-log
PNG (--plot, default ./long_context.png): prefill time, prefill peak memory, decode time per token.

Usage
  .venv/bin/python benchmarks/long_context.py                       # defaults (~5 min on 2 idle cores)
  .venv/bin/python benchmarks/long_context.py --sizes 4096 16384 --decode-sizes 4096 65536 --kinds csa hca
  .venv/bin/python benchmarks/long_context.py --skip-dense-above 65536 --json out.json
  .venv/bin/python benchmarks/long_context.py --kinds mla v32 --sizes 4096 16384 65536 131072 \
      --decode-sizes 4096 16384 65536 262144 1048576 --json docs/long_context_v32.json \
      --plot docs/img/long_context_v32.png                          # the V3.2 family (~2 min)

From Python (used by tests/test_benchmarks_long_context_smoke.py):
  from long_context import run, parse_args
  res = run(parse_args(["--sizes", "512", "1024", "--decode-sizes", "1024", "2048", "--plot", "x.png"]))
  res["prefill"]["csa"]["1024"]["time_s"], res["decode"]["hca"]["2048"]["time_s"]

Shared machines: with 2 torch threads on 2 cores any other busy process inflates the timings; the script
measures the CPU time other processes used during the run (/proc/stat) and warns above 0.25 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py
from _common import (
    _LIBC,
    LoadMeter,
    hardware_info,
)
from _common import (
    fmt_load as _fmt_load,
)
from _common import (
    fmt_tokens as _fmt_t,
)
from _common import (
    reset_hwm as _reset_hwm,
)
from _common import (
    status_kb as _status_kb,
)
from _common import (
    trim as _trim,
)

from dsv4.config import ModelConfig
from dsv4.kernels.indexer_topk import chunked_indexer_topk
from dsv4.kernels.sparse_attention import dense_entries_attention, sparse_attention
from dsv4.model.attention import Attention
from dsv4.model.mla import MLAttention
from dsv4.model.norm import rms_norm
from dsv4.model.rope import Rotary, apply_rope

ALL_KINDS = ("dense", "dsa", "csa", "hca", "mla", "v32")
RATIO = {"dense": 0, "dsa": 1, "csa": 4, "hca": 128, "mla": 1, "v32": 1}
TOPK = {"dsa": 2048, "csa": 512, "v32": 2048, "mla": 2048}
BASELINE = {"v32": "mla"}  # the dense baseline of each kind ("dense" unless named here)
V32_KINDS = ("mla", "v32")
MB = 1024 * 1024


# ---------------------------------------------------------------------------------- memory helpers
# ---------------------------------------------------------------------------------- model pieces
def make_config(args, kind: str) -> ModelConfig:
    if kind in V32_KINDS:
        topk = TOPK[kind] if args.topk is None else args.topk
        return ModelConfig.preset("tiny-v3.2").replace(num_hidden_layers=1, num_nextn_predict_layers=0, index_topk=topk)
    over = dict(
        num_hidden_layers=1, num_nextn_predict_layers=0, compress_ratios=[RATIO[kind]], sliding_window=args.window
    )
    if kind in TOPK:
        over["index_topk"] = TOPK[kind] if args.topk is None else args.topk
    for name, attr in (
        ("hidden_size", "hidden"),
        ("num_attention_heads", "heads"),
        ("head_dim", "head_dim"),
        ("qk_rope_head_dim", "rope_dim"),
        ("index_n_heads", "index_heads"),
        ("index_head_dim", "index_dim"),
    ):
        v = getattr(args, attr)
        if v is not None:
            over[name] = v
    return ModelConfig.preset("tiny").replace(**over)


def make_layer(args, kind: str):
    """-> (Attention module, Rotary): dense uses an SWA layer's projections and the main rope."""
    cfg = make_config(args, kind)
    torch.manual_seed(0)
    if kind in V32_KINDS:
        return MLAttention(cfg, 0).eval(), Rotary(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    attn = Attention(cfg, 0).eval()
    assert attn.kind == ("swa" if kind == "dense" else kind), (attn.kind, kind)
    r = cfg.qk_rope_head_dim
    rope = Rotary(r, cfg.rope_theta) if kind == "dense" else Rotary(r, cfg.compress_rope_theta, cfg.rope_scaling)
    return attn, rope


def dense_sdpa_forward(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The V4 layer's projections around a causal SDPA core over all previous tokens (kv head expanded)."""
    b, t, _ = x.shape
    h, c = attn.n_heads, attn.head_dim
    c_q = attn.q_norm(attn.wq_a(x))
    q = apply_rope(rms_norm(attn.wq_b(c_q).unflatten(-1, (h, c)), attn.eps), cos, sin)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
    k = kv.unsqueeze(1).expand(b, h, t, c)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, k, is_causal=True, scale=attn.scale)
    o = apply_rope(o.transpose(1, 2), cos, sin, inverse=True)
    return attn.project_out(o)


def mla_sdpa_forward(attn: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dense MLA prefill (the V3.2 baseline): the latent expanded into per-head keys and values, causal SDPA."""
    _, q, kv = attn.latent_projections(x, cos, sin)
    k, v = attn.expand(kv)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=attn.scale
    )
    return attn.wo(o.transpose(1, 2).flatten(2))


def layer_forward(kind: str, attn: Attention, x, cos, sin, positions):
    if kind == "dense":
        return dense_sdpa_forward(attn, x, cos, sin)
    if kind == "mla":
        assert isinstance(attn, MLAttention)
        return mla_sdpa_forward(attn, x, cos, sin)
    return attn(x, cos, sin, positions)


def kv_bytes(args, kind: str, t: int) -> int:
    """Bytes of raw kv + compressed entries + indexer keys for a T-token context (fp32)."""
    cfg = make_config(args, kind)
    c, ci = cfg.kv_dim, cfg.index_head_dim
    n = t * c
    if kind == "csa":
        n += (t // 4) * (c + ci)
    elif kind == "hca":
        n += (t // 128) * c
    elif kind in ("dsa", "v32"):
        n += t * ci  # entries = the raw kv itself (v32: the latent rows)
    return 4 * n


# ---------------------------------------------------------------------------------- (a) prefill
def _time_runs(fn, min_time: float, repeats: int) -> tuple[float, list[float]]:
    """Run fn once; if that took < min_time, run it again up to `repeats` times in all. -> (median, times)."""
    times = []
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[0] >= min_time or len(times) >= repeats:
            break
    return statistics.median(times), times


@torch.no_grad()
def prefill_case(args, kind: str, attn: Attention, rope: Rotary, t: int) -> dict:
    hidden = attn.wq_a.in_features
    _trim()
    g = torch.Generator().manual_seed(t)
    x = torch.randn(1, t, hidden, generator=g)
    positions = torch.arange(t)
    cos, sin = rope.cos_sin(positions)
    _trim()
    load = LoadMeter()
    rss0 = _status_kb("VmRSS")
    hwm_ok = _reset_hwm()
    holder = {"inputs": (x, cos, sin, positions)}  # dropped below, so their memory is freed before the next case
    del x, cos, sin, positions

    def fn():
        holder["out"] = None
        holder["out"] = layer_forward(kind, attn, *holder["inputs"])

    # first run alone for the memory peak (later runs reach the same peak)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    peak = None if (rss0 is None or hwm is None or not hwm_ok) else max(0, hwm - rss0) * 1024
    out = holder.pop("out")
    assert out.shape == holder["inputs"][0].shape and torch.isfinite(out).all(), kind
    del out
    times = [first]
    if first < args.min_time and args.repeats > 1:
        _, more = _time_runs(fn, args.min_time, args.repeats - 1)
        times += more
    holder.clear()
    other = load.other_cores()
    _trim()
    return dict(
        time_s=statistics.median(times),
        times_s=times,
        peak_bytes=peak,
        other_load=other,
        peak_bytes_per_token=None if peak is None else peak / t,
        kv_entries_bytes=kv_bytes(args, kind, t),
    )


# ---------------------------------------------------------------------------------- (b) decode
@torch.no_grad()
def decode_case(args, kind: str, attn: Attention, s: int) -> dict:
    """Time of one decode step's core work at context s (query at position s-1), random context tensors."""
    g = torch.Generator().manual_seed(s + RATIO[kind])
    h, c, win = attn.n_heads, attn.head_dim, attn.window
    q = torch.randn(1, 1, h, c, generator=g)
    kv = torch.randn(1, s, c, generator=g)
    q_pos = torch.tensor([s - 1])
    kv_pos = torch.arange(s)
    sink = attn.attn_sink
    if kind in ("dense", "mla"):
        qd = q.view(1, 1, h, c)  # MQA decode: 4 query rows against the one kv head (mla: absorbed, latent rows)
        k = kv.view(1, 1, s, c)

        def step():
            return F.scaled_dot_product_attention(qd, k, k, scale=attn.scale)
    elif kind == "hca":
        ent = torch.randn(1, s // attn.ratio, c, generator=g)

        def step():
            return dense_entries_attention(q, kv, sink, attn.scale, win, q_pos, kv_pos, ent, ratio=attn.ratio)
    else:
        ix = attn.indexer
        n = s // ix.ratio
        ent = kv if kind in ("dsa", "v32") else torch.randn(1, n, c, generator=g)
        keys = torch.randn(1, n, ix.head_dim, generator=g)
        qi = torch.randn(1, 1, ix.n_heads, ix.head_dim, generator=g)
        wi = torch.randn(1, 1, ix.n_heads, generator=g) * (ix.n_heads**-0.5 * ix.head_dim**-0.5)

        def step():
            idx = chunked_indexer_topk(qi, wi, keys, ix.topk, q_pos, ix.ratio, ix.exclude_window)
            return sparse_attention(q, kv, sink, attn.scale, win, q_pos, kv_pos, ent, idx)

    out = step()  # warm-up
    assert torch.isfinite(out).all(), kind
    load = LoadMeter()
    times = []
    t_end = time.perf_counter() + args.decode_time
    while len(times) < args.decode_max_reps and (len(times) < args.decode_min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(
        time_s=statistics.median(times),
        min_s=min(times),
        reps=len(times),
        context_bytes=kv_bytes(args, kind, s),
        other_load=load.other_cores(),
    )


# ---------------------------------------------------------------------------------- reporting
def _table(rows: list[tuple]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def format_prefill(res: dict) -> str:
    rows = [("T", "kind", "time s", "vs dense", "peak MB", "B/token", "kv+entries MB", "other load")]
    for t in res["config"]["sizes"]:
        for kind in res["config"]["kinds"]:
            r = res["prefill"].get(kind, {}).get(str(t))
            if r is None:
                continue
            if "skipped" in r:
                rows.append((_fmt_t(t), kind, "skipped", "-", "-", "-", "-", "-"))
                continue
            ratio = r.get("dense_over_kind")
            peak = r["peak_bytes"]
            rows.append(
                (
                    _fmt_t(t),
                    kind,
                    f"{r['time_s']:.3f}",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    "-" if peak is None else f"{peak / MB:.1f}",
                    "-" if peak is None else f"{r['peak_bytes_per_token']:,.0f}",
                    f"{r['kv_entries_bytes'] / MB:.1f}",
                    _fmt_load(r.get("other_load")),
                )
            )
    return _table(rows)


def format_decode(res: dict) -> str:
    rows = [("S", "kind", "ms/token", "vs first", "min ms", "reps", "context MB", "other load")]
    for s in res["config"]["decode_sizes"]:
        for kind in res["config"]["decode_kinds"]:
            r = res["decode"].get(kind, {}).get(str(s))
            if r is None:
                continue
            rows.append(
                (
                    _fmt_t(s),
                    kind,
                    f"{r['time_s'] * 1e3:.3f}",
                    f"{r['ratio_to_first']:.2f}x",
                    f"{r['min_s'] * 1e3:.3f}",
                    str(r["reps"]),
                    f"{r['context_bytes'] / MB:.1f}",
                    _fmt_load(r.get("other_load")),
                )
            )
    return _table(rows)


# issue 11: CSA >= 3x dense at 64K (moonshot 5x) and >= 5x at 128K, DSA >= 1x at 64K
PREFILL_GOALS = [("csa", 65536, 3.0), ("csa", 131072, 5.0), ("dsa", 65536, 1.0)]


def check_targets(res: dict) -> list[dict]:
    """The issue's targets, evaluated on what this run measured (None = not measured)."""
    out = []
    pre = res["prefill"]
    for kind, t, goal in PREFILL_GOALS:
        r = pre.get(kind, {}).get(str(t))
        ratio = None if r is None else r.get("dense_over_kind")
        out.append(
            dict(
                target=f"{kind} prefill at {_fmt_t(t)} >= {goal:g}x faster than dense SDPA",
                value=ratio,
                met=None if ratio is None else ratio >= goal,
                result=f"{kind}_prefill_{t // 1024}k_vs_dense",
                goal=goal,
                text="not measured" if ratio is None else f"{ratio:.2f}x",
            )
        )
    for kind in res["config"]["kinds"]:
        pts = [
            (int(t), r["peak_bytes_per_token"])
            for t, r in pre.get(kind, {}).items()
            if "skipped" not in r and r.get("peak_bytes_per_token")
        ]
        pts = [p for p in sorted(pts) if p[0] >= 4096] or sorted(pts)
        if len(pts) < 2:
            continue
        growth = pts[-1][1] / pts[0][1]
        # linear memory <=> bytes per token do not grow with T (allow 25% noise)
        out.append(
            dict(
                target=f"{kind} prefill peak memory linear in T (B/token at {_fmt_t(pts[-1][0])} <= "
                f"1.25x that at {_fmt_t(pts[0][0])})",
                value=growth,
                met=growth <= 1.25,
                text=f"{pts[0][1]:,.0f} -> {pts[-1][1]:,.0f} B/token ({growth:.2f}x)",
            )
        )
    dec = res["decode"]

    # the V3.2 family (issue 18 asks for the numbers, with no goal): v32 against dense MLA, same run
    def reported(what: str, n: int, ratio: float, text: str) -> dict:
        target = f"v32 {what} at {_fmt_t(n)} vs dense {'absorbed ' if what == 'decode' else ''}MLA (reported, no goal)"
        result = f"v32_{what}_{_fmt_t(n).lower()}_vs_dense_mla"
        return dict(target=target, value=ratio, met="report", result=result, goal="report", text=text)

    done = sorted((int(t) for t, r in pre.get("v32", {}).items() if "dense_over_kind" in r), reverse=True)
    if done:
        ratio = pre["v32"][str(done[0])]["dense_over_kind"]
        out.append(reported("prefill", done[0], ratio, f"{ratio:.2f}x"))
    both = sorted(set(dec.get("v32", {})) & set(dec.get("mla", {})), key=int)
    if both:
        ratio = dec["mla"][both[-1]]["time_s"] / dec["v32"][both[-1]]["time_s"]
        out.append(reported("decode", int(both[-1]), ratio, f"{ratio:.2f}x faster"))
    for kind in ("csa", "hca"):
        r = dec.get(kind, {}).get(str(1 << 20))
        ratio = None if r is None else r["ratio_to_first"]
        first = res["config"]["decode_sizes"][0] if res["config"]["decode_sizes"] else None
        out.append(
            dict(
                target=f"{kind} decode per token at 1M within 3x of {_fmt_t(first) if first else '?'}",
                value=ratio,
                met=None if ratio is None else ratio <= 3.0,
                text="not measured" if ratio is None else f"{ratio:.2f}x",
            )
        )
    return out


def make_plot(res: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    colors = {
        "dense": "black",
        "dsa": "tab:blue",
        "csa": "tab:orange",
        "hca": "tab:green",
        "mla": "tab:gray",
        "v32": "tab:purple",
    }
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    hw = res["hardware"]
    fig.suptitle(
        f"dsv4 one attention layer (hidden {res['config']['hidden']}, {res['config']['heads']} heads x "
        f"{res['config']['head_dim']}, window {res['config']['window']}), fp32, B=1, "
        f"{hw['torch_threads']} threads, {hw['cpu']}",
        fontsize=10,
    )
    panels = [
        (axes[0], "prefill", "time_s", "prefill forward time (s)", "T (tokens)", 1.0),
        (axes[1], "prefill", "peak_bytes", "prefill peak RSS growth (MB)", "T (tokens)", 1.0 / MB),
        (axes[2], "decode", "time_s", "decode core time per token (ms)", "context S (tokens)", 1e3),
    ]
    for ax, part, key, title, xlabel, mul in panels:
        for kind, per in res[part].items():
            pts = sorted((int(t), r[key] * mul) for t, r in per.items() if "skipped" not in r and r.get(key))
            if not pts:
                continue
            label = {
                "dense": "dense causal SDPA",
                "dsa": "DSA (m=1, top-2048)",
                "csa": "CSA (m=4, top-512)",
                "hca": "HCA (m=128)",
                "mla": "V3.2 dense MLA (SDPA)",
                "v32": "V3.2 DSA (top-2048 of all)",
            }[kind]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[kind], label=label)
        if part == "prefill" and key == "peak_bytes":
            sizes = res["config"]["sizes"]
            c = res["config"]["head_dim"]
            ax.plot(sizes, [t * c * 4 / MB for t in sizes], ":", color="gray", label=f"raw kv alone (T x {c} x 4 B)")
        if part == "prefill" and key == "time_s":
            skipped = [
                f"{k} {_fmt_t(int(t))}" for k, per in res["prefill"].items() for t, r in per.items() if "skipped" in r
            ]
            if skipped:
                ax.text(
                    0.98,
                    0.02,
                    "skipped: " + ", ".join(skipped),
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=8,
                    color="gray",
                )
        ax.set_xscale("log", base=2)
        xs = res["config"]["decode_sizes" if part == "decode" else "sizes"]
        if xs:
            ax.set_xticks(xs, [_fmt_t(v) for v in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 131072], help="prefill lengths T")
    p.add_argument(
        "--decode-sizes",
        type=int,
        nargs="*",
        default=[4096, 16384, 65536, 262144, 1048576],
        help="decode context lengths S (none: skip decode)",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["dense", "dsa", "csa", "hca"],
        choices=ALL_KINDS,
        help="prefill kinds (default: the V4 ones; mla v32: the V3.2 family)",
    )
    p.add_argument(
        "--decode-kinds", nargs="*", default=None, choices=ALL_KINDS, help="decode kinds (default: the --kinds)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--skip-dense-above",
        type=int,
        default=None,
        metavar="N",
        help="skip dense SDPA prefill for T > N (default: run every size)",
    )
    p.add_argument(
        "--skip-above", nargs="*", default=[], metavar="KIND=N", help="skip prefill of KIND for T > N (e.g. dsa=65536)"
    )
    p.add_argument(
        "--max-case-s",
        type=float,
        default=240.0,
        metavar="S",
        help="skip a prefill case whose time, extrapolated quadratically from the same kind's "
        "previous size, exceeds S seconds (default %(default)s; 0 = never skip)",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=2.0,
        help="prefill: cases whose first run is shorter are repeated (median reported)",
    )
    p.add_argument("--repeats", type=int, default=3, help="prefill: at most this many runs per case")
    p.add_argument("--decode-time", type=float, default=0.5, help="decode: time budget per case (s)")
    p.add_argument("--decode-min-reps", type=int, default=5)
    p.add_argument("--decode-max-reps", type=int, default=200)
    p.add_argument("--window", type=int, default=128, help="sliding_window")
    p.add_argument("--topk", type=int, default=None, help="index_topk for dsa AND csa (default 2048 / 512)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--rope-dim", type=int, default=None)
    p.add_argument("--index-heads", type=int, default=None)
    p.add_argument("--index-dim", type=int, default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--plot", default="long_context.png", help="PNG path (default: ./long_context.png; '' = no plot)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run(args=None) -> dict:
    """Run the benchmark; returns a dict (also written to --json). See the module docstring."""
    if args is None:
        args = parse_args([])
    say = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        decode_kinds = list(args.kinds if args.decode_kinds is None else args.decode_kinds)
        kinds = [k for k in ALL_KINDS if k in args.kinds]
        decode_kinds = [k for k in ALL_KINDS if k in decode_kinds]
        sizes, dsizes = sorted(set(args.sizes)), sorted(set(args.decode_sizes or []))
        hw = hardware_info()
        cfg0 = make_config(args, "csa")
        say(f"command: {shlex.join([sys.executable] + sys.argv)}")
        say(
            f"hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, "
            f"{hw['mem_total_gb']:.1f} GB RAM, torch {hw['torch']} ({hw['torch_threads']} threads), "
            f"python {hw['python']}, {hw['platform']}"
        )
        if hw["loadavg"]:
            say("load average (1/5/15 min): " + " ".join(f"{x:.2f}" for x in hw["loadavg"]))
        say(
            f"layer: hidden {cfg0.hidden_size}, {cfg0.num_attention_heads} heads x {cfg0.head_dim} (rope "
            f"{cfg0.qk_rope_head_dim}), q/o lora {cfg0.q_lora_rank}/{cfg0.o_lora_rank}, indexer "
            f"{cfg0.index_n_heads} x {cfg0.index_head_dim}, window {args.window}; fp32, B=1, no grad"
            + ("" if _LIBC is not None else "; WARNING: no glibc malloc_trim, RSS peaks may undercount")
        )
        if set(kinds + decode_kinds) & set(V32_KINDS):
            v = make_config(args, "v32")
            say(
                f"V3.2 layer (mla, v32): hidden {v.hidden_size}, {v.num_attention_heads} heads, latent "
                f"{v.kv_lora_rank} + rope key {v.qk_rope_head_dim}, nope {v.qk_nope_head_dim}, v {v.v_head_dim}, "
                f"q lora {v.q_lora_rank}, indexer {v.index_n_heads} x {v.index_head_dim}, top-{v.index_topk} of "
                "every earlier token, no window"
            )
        layers = {k: make_layer(args, k) for k in sorted(set(kinds) | set(decode_kinds))}
        res = dict(
            config=dict(
                sizes=sizes,
                decode_sizes=dsizes,
                kinds=kinds,
                decode_kinds=decode_kinds,
                threads=args.threads,
                window=args.window,
                hidden=cfg0.hidden_size,
                heads=cfg0.num_attention_heads,
                head_dim=cfg0.head_dim,
                rope_dim=cfg0.qk_rope_head_dim,
                index_heads=cfg0.index_n_heads,
                index_dim=cfg0.index_head_dim,
                topk={k: layers[k][0].indexer.topk for k in layers if k in TOPK},
                skip_dense_above=args.skip_dense_above,
                max_case_s=args.max_case_s,
                dense_baseline="V4 layer projections + causal SDPA core (kv head expanded), no sink",
                decode_note="core work only, random precomputed context tensors, no KV cache",
            ),
            hardware=hw,
            command=[sys.executable] + sys.argv,
            prefill={k: {} for k in kinds},
            decode={k: {} for k in decode_kinds},
        )
        t_all = time.perf_counter()
        load_all = LoadMeter()

        # (a) prefill, increasing T, every kind at each T
        if sizes and kinds:
            say("\n(a) prefill forward, whole layer")
        last = {}
        caps = {}
        for item in args.skip_above or []:
            k, _, n = item.partition("=")
            if k not in ALL_KINDS or not n.isdigit():
                raise SystemExit(f"--skip-above: expected KIND=N with KIND in {ALL_KINDS}, got {item!r}")
            caps[k] = int(n)
        if args.skip_dense_above is not None:
            caps["dense"] = args.skip_dense_above
        res["config"]["skip_above"] = caps
        for t in sizes:
            for kind in kinds:
                why = None
                if kind in caps and t > caps[kind]:
                    why = (
                        f"--skip-dense-above {caps[kind]}"
                        if kind == "dense" and args.skip_dense_above is not None
                        else f"--skip-above {kind}={caps[kind]}"
                    )
                elif args.max_case_s and kind in last:
                    t_prev, s_prev = last[kind]
                    pred = s_prev * (t / t_prev) ** 2
                    if pred > args.max_case_s:
                        why = (
                            f"predicted {pred:.0f} s > --max-case-s {args.max_case_s:g} "
                            f"(quadratic from {_fmt_t(t_prev)})"
                        )
                if why:
                    res["prefill"][kind][str(t)] = dict(skipped=why)
                    say(f"  T={_fmt_t(t):>5} {kind:5s} skipped: {why}")
                    continue
                attn, rope = layers[kind]
                r = prefill_case(args, kind, attn, rope, t)
                last[kind] = (t, r["time_s"])
                res["prefill"][kind][str(t)] = r
                pk = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MB:8.1f} MB"
                say(
                    f"  T={_fmt_t(t):>5} {kind:5s} {r['time_s']:9.3f} s  (runs: "
                    + ", ".join(f"{x:.3f}" for x in r["times_s"])
                    + f")  peak {pk}  "
                    f"kv+entries {r['kv_entries_bytes'] / MB:.1f} MB  other load {_fmt_load(r['other_load'])}"
                )
        for kind in kinds:
            for t, r in res["prefill"][kind].items():
                d = res["prefill"].get(BASELINE.get(kind, "dense"), {}).get(t)
                if "skipped" not in r and d is not None and "skipped" not in d:
                    r["dense_over_kind"] = d["time_s"] / r["time_s"]

        # (b) decode
        if dsizes and decode_kinds:
            say("\n(b) decode, core work of one step (random context, no cache)")
        for kind in decode_kinds:
            first = None
            for s in dsizes:
                r = decode_case(args, kind, layers[kind][0], s)
                first = first or r["time_s"]
                r["ratio_to_first"] = r["time_s"] / first
                res["decode"][kind][str(s)] = r
                say(
                    f"  S={_fmt_t(s):>5} {kind:5s} {r['time_s'] * 1e3:9.3f} ms/token  ({r['reps']} reps, "
                    f"x{r['ratio_to_first']:.2f} of {_fmt_t(dsizes[0])})"
                )
                _trim()

        res["total_wall_s"] = time.perf_counter() - t_all
        res["other_cpu_load"] = load_all.other_cores()
        res["targets"] = check_targets(res)

        say(
            "\nprefill (whole layer; vs dense = dense time / kind time; peak = RSS high-water growth; "
            "B/token = peak / T)"
        )
        say(format_prefill(res))
        if dsizes and decode_kinds:
            say(f"\ndecode (core work of one step at position S-1; vs first = time / time at {_fmt_t(dsizes[0])})")
            say(format_decode(res))
        say("\ntargets:")
        for tg in res["targets"]:
            mark = {None: "not measured", "report": "reported", True: "MET", False: "NOT MET"}[tg["met"]]
            say(f"  [{mark}] {tg['target']}: {tg['text']}")
        other = res["other_cpu_load"]
        if other is not None:
            say(f"\nother processes used on average {other:.2f} CPU cores during the run")
            if other > 0.25:
                say(
                    "WARNING: the cores were shared with other processes, timings are inflated; rerun on an idle "
                    "machine."
                )
        say(f"total benchmark wall time: {res['total_wall_s']:.1f} s")
        if args.plot:
            path = make_plot(res, args.plot)
            res["plot"] = path
            say(f"wrote {path}" if path else "matplotlib not available: no plot")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
            say(f"wrote {args.json}")
        for tgt in res.get("targets", []):  # one line per issue target that this run measured
            if tgt.get("result") and tgt["value"] is not None:
                goal = tgt["goal"] if isinstance(tgt["goal"], str) else f"{tgt['goal']:g}"
                say(f"RESULT {tgt['result']} {tgt['value']:.3f} (goal {goal})")
        return res
    finally:
        torch.set_num_threads(prev_threads)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
