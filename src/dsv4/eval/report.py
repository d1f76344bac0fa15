"""Plots and a markdown summary of a training run from its ``metrics.jsonl`` (docs/spec.md section 10).

``write_report(run_dir)`` reads ``run_dir/metrics.jsonl``, one JSON object per line:
  - ``"kind": "train"`` (also assumed when ``kind`` is absent): step, tokens, loss, lm_loss, mtp_loss,
    aux_loss, indexer_loss, lr, grad_norm, tok_per_s, mfu, maxvio (one value per MoE layer),
    mhc_gain_fwd, mhc_gain_bwd, skipped;
  - ``"kind": "val"``: step, val_loss, val_bpb, indexer_recall and random_recall (one per indexer layer);
  - ``"kind": "final"``: xz_bpb, val_bpb and any other numbers (listed as they are in the summary).
Any key may be missing and unknown keys are ignored; lines that are not JSON objects are skipped
and counted. It writes ``run_dir/report/*.png`` (only the plots it has data for) and
``run_dir/report/summary.md``, which embeds them by relative path, and returns the summary path.

The CLI entry point is ``main_report(args)`` (``args.run_dir``); ``python -m dsv4.eval.report RUN_DIR``
does the same.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dsv4.run import RunDir

MAX_LEGEND_LAYERS = 10  # more layers than this get a colour bar instead of a legend
WALL_KEYS = ("wall_s", "wall_time_s", "wall_time", "elapsed_s", "elapsed", "time_s")


# ------------------------------------------------------------------------------ reading
def read_metrics(path: str | Path) -> tuple[dict[str, list[dict]], int]:
    """Parse a metrics.jsonl -> ({kind: [rows in file order]}, number of unreadable lines)."""
    rows: dict[str, list[dict]] = {}
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            rows.setdefault(str(row.get("kind", "train")), []).append(row)
    return rows, bad


def _num(v) -> float | None:
    """A finite float, or None (bools, strings, NaN, inf and lists are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _scalar(v) -> float | None:
    """A number, or the largest finite entry of a list (the worst layer), else None."""
    if isinstance(v, (list, tuple)):
        vals = [x for x in map(_num, v) if x is not None]
        return max(vals) if vals else None
    return _num(v)


def _step(row: dict, i: int) -> float:
    s = _num(row.get("step"))
    return s if s is not None else float(i)


def series(rows: list[dict], key: str, reduce=_num) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``key`` holds a usable number."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = reduce(r.get(key))
        if v is not None:
            xs.append(_step(r, i))
            ys.append(v)
    return xs, ys


def per_layer(rows: list[dict], key: str) -> dict[int, tuple[list[float], list[float]]]:
    """{layer index: (steps, values)} for a key holding one number per layer."""
    out: dict[int, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        v = r.get(key)
        if not isinstance(v, (list, tuple)):
            continue
        for j, x in enumerate(v):
            x = _num(x)
            if x is not None:
                xs, ys = out.setdefault(j, ([], []))
                xs.append(_step(r, i))
                ys.append(x)
    return out


def smooth(ys: list[float], beta: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average; by default its window is ~1/50 of the run (<= 100)."""
    if not ys:
        return []
    if beta is None:
        beta = 1.0 - 1.0 / max(1.0, min(100.0, len(ys) / 50))
    out, m = [], 0.0
    for k, y in enumerate(ys, start=1):
        m = beta * m + (1 - beta) * y
        out.append(m / (1 - beta**k) if beta > 0 else y)
    return out


# ------------------------------------------------------------------------------ plotting
def _figure(nrows: int = 1, height: float = 3.6):
    fig = Figure(figsize=(7.5, height * nrows), dpi=110, layout="constrained")
    axes = [fig.add_subplot(nrows, 1, k + 1) for k in range(nrows)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _label(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _log_if_positive(ax, *value_lists) -> None:
    vals = [v for vs in value_lists for v in vs]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def _layer_colours(ax, fig, n_layers: int, what: str):
    """Colour per layer; a legend for few layers, a colour bar for many."""
    if n_layers <= MAX_LEGEND_LAYERS:
        return [colormaps["tab10"](j) for j in range(n_layers)]
    cmap = colormaps["viridis"].resampled(256)
    colour = [cmap(0.9 * j / (n_layers - 1)) for j in range(n_layers)]  # stop before the pale yellow end
    sm = ScalarMappable(norm=Normalize(0, n_layers - 1), cmap=_colormap_slice(cmap, 0.9))
    fig.colorbar(sm, ax=ax, label=what)
    return colour


def _colormap_slice(cmap, top: float):
    """The [0, top] part of a colormap, so the colour bar matches the line colours."""
    from matplotlib.colors import ListedColormap

    return ListedColormap([cmap(top * k / 255) for k in range(256)])


def _save(fig, out: Path, name: str, made: list[tuple[str, str]], caption: str) -> None:
    fig.savefig(out / name)
    made.append((name, caption))


def _lm_series(tr):
    """Next-token CE of the training steps (comparable with val_loss): lm_loss when logged (it is not
    during the indexer warm-up, whose loss is the indexer KL), else the total loss."""
    if any("lm_loss" in r for r in tr):
        return series([r for r in tr if "lm_loss" in r], "lm_loss")
    return series(tr, "loss")


def _plot_loss(tr, va, out, made):
    xs, ys = _lm_series(tr)
    vx, vy = series(va, "val_loss")
    if not ys and not vy:
        return
    fig, (ax,) = _figure()
    if ys:
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8, label="train (raw)")
        ax.plot(xs, smooth(ys), color="tab:blue", lw=1.8, label="train (smoothed)")
    if vy:
        ax.plot(vx, vy, "o-", color="tab:orange", ms=4, lw=1.5, label="validation")
    _label(ax, "Loss", "loss (nats/token)")
    _log_if_positive(ax, ys, vy)
    ax.legend()
    _save(fig, out, "loss.png", made, "Next-token loss: training (raw and smoothed) and validation")


def _plot_loss_terms(tr, out, made):
    terms = [(k, series(tr, k)) for k in ("lm_loss", "mtp_loss", "aux_loss", "indexer_loss")]
    terms = [(k, s) for k, s in terms if s[1]]
    if not terms:
        return
    fig, (ax,) = _figure()
    for k, (xs, ys) in terms:
        ax.plot(xs, smooth(ys), lw=1.5, label=k)
    _label(ax, "Loss terms (smoothed)", "loss")
    _log_if_positive(ax, *[s[1] for _, s in terms])
    ax.legend()
    _save(fig, out, "loss_terms.png", made, "Loss terms: LM, MTP, balance (aux) and indexer")


def _plot_bpb(va, final, out, made):
    """Periodic validation (a few batches) as a line; the closing evaluation (final_eval_tokens, the bytes xz
    is measured on) as its own marker, since it scores more tokens than the periodic points."""
    pts = [(r["step"], _num(r.get("val_bpb")), r.get("val_tokens")) for r in va if _num(r.get("val_bpb")) is not None]
    xz = _num(final.get("xz_bpb"))
    if not pts:
        return
    sizes = [p[2] or 0 for p in pts]
    closing = pts[-1] if final and len(set(sizes)) > 1 and sizes[-1] == max(sizes) else None
    periodic = pts[:-1] if closing else pts
    fig, (ax,) = _figure()
    if periodic:
        n = periodic[-1][2]
        ax.plot(
            [p[0] for p in periodic],
            [p[1] for p in periodic],
            "o-",
            color="tab:green",
            ms=4,
            label="validation bpb" + (f" ({n:,} tokens)" if n else ""),
        )
    if closing:
        ax.plot(
            [closing[0]],
            [closing[1]],
            "*",
            color="tab:blue",
            ms=12,
            label=f"closing evaluation ({closing[2]:,} tokens): {closing[1]:.3f}",
        )
    if xz is not None:
        ax.axhline(xz, color="tab:red", ls="--", label=f"xz -9 on the closing bytes ({xz:.3f} bpb)")
    _label(ax, "Validation bits per byte", "bits per byte")
    ax.legend()
    _save(fig, out, "bpb.png", made, "Validation bits per byte against the xz -9 baseline")


def _plot_simple(tr, key, name, title, ylabel, caption, out, made, log=False, mark_skipped=False):
    xs, ys = series(tr, key)
    if not ys:
        return
    fig, (ax,) = _figure()
    ax.plot(xs, ys, lw=1.0, color="tab:blue", label=key)
    if log:
        _log_if_positive(ax, ys)
    if mark_skipped:
        sk = [(_step(r, i), _num(r.get(key))) for i, r in enumerate(tr) if r.get("skipped") is True]
        sk = [(x, y) for x, y in sk if y is not None]
        if sk:
            ax.plot(*zip(*sk), "x", color="tab:red", ms=7, label=f"skipped step ({len(sk)})")
            ax.legend()
    _label(ax, title, ylabel)
    _save(fig, out, name, made, caption)


def _plot_layers(tr, key, name, title, ylabel, caption, out, made):
    layers = per_layer(tr, key)
    if not layers:
        return
    n = max(layers) + 1
    fig, (ax,) = _figure()
    colour = _layer_colours(ax, fig, n, "MoE layer")
    for j, (xs, ys) in sorted(layers.items()):
        ax.plot(xs, ys, lw=1.0, color=colour[j], label=f"layer {j}")
    if n <= MAX_LEGEND_LAYERS:
        ax.legend(fontsize="small", ncol=2)
    _label(ax, title, ylabel)
    _save(fig, out, name, made, caption)


def _plot_mhc(tr, out, made):
    curves = [
        (k, lab, series(tr, k, _scalar)) for k, lab in (("mhc_gain_fwd", "forward"), ("mhc_gain_bwd", "backward"))
    ]
    curves = [c for c in curves if c[2][1]]
    if not curves:
        return
    fig, (ax,) = _figure()
    for _, lab, (xs, ys) in curves:
        ax.plot(xs, ys, lw=1.2, label=lab)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    _log_if_positive(ax, *[c[2][1] for c in curves])
    _label(ax, "mHC composite gain", "gain")
    ax.legend()
    _save(fig, out, "mhc_gain.png", made, "mHC composite gain, forward and backward (1 = norm preserving)")


def _plot_recall(va, out, made):
    rec, rnd = per_layer(va, "indexer_recall"), per_layer(va, "random_recall")
    if not rec:
        return
    n = max(list(rec) + list(rnd)) + 1
    fig, (ax,) = _figure()
    colour = _layer_colours(ax, fig, n, "indexer layer")
    for j, (xs, ys) in sorted(rec.items()):
        ax.plot(xs, ys, "o-", ms=3, lw=1.2, color=colour[j], label=f"layer {j}")
    for j, (xs, ys) in sorted(rnd.items()):
        ax.plot(xs, ys, "--", lw=1.0, color=colour[j])
    handles, labels = ax.get_legend_handles_labels()
    if n > MAX_LEGEND_LAYERS:
        handles, labels = [], []
    handles.append(Line2D([], [], color="grey", lw=1.2, marker="o", ms=3))
    labels.append("indexer")
    if rnd:
        handles.append(Line2D([], [], color="grey", ls="--", lw=1.0))
        labels.append("random selection")
    ax.legend(handles, labels, fontsize="small", ncol=2)
    ax.set_ylim(0, 1.02)
    _label(ax, "Indexer attention-mass recall per layer", "recall")
    _save(fig, out, "indexer_recall.png", made, "Indexer recall per layer (solid) against a random selection (dashed)")


def _plot_throughput(tr, out, made):
    tx, ty = series(tr, "tok_per_s")
    mx, my = series(tr, "mfu")
    panels = [
        p
        for p in (
            (tx, ty, "tokens/s", "Throughput", "tab:purple"),
            (mx, [100 * v for v in my], "MFU (%)", "Model FLOPs utilisation", "tab:brown"),
        )
        if p[1]
    ]
    if not panels:
        return
    fig, axes = _figure(len(panels), height=3.0)
    for ax, (xs, ys, ylabel, title, c) in zip(axes, panels):
        ax.plot(xs, ys, lw=0.8, color=c, alpha=0.4)
        ax.plot(xs, smooth(ys), lw=1.6, color=c)
        _label(ax, title, ylabel)
        ax.set_ylim(0, 1.1 * max(ys) if max(ys) > 0 else 1.0)
    _save(fig, out, "throughput.png", made, "Throughput (tokens/s) and MFU, raw and smoothed")


# ------------------------------------------------------------------------------ summary
def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _wall_time(rows: dict[str, list[dict]]) -> float | None:
    final = rows.get("final", [])
    for r in reversed(final):
        for k in WALL_KEYS:
            if _num(r.get(k)) is not None:
                return _num(r.get(k))
    every = [r for kind in rows.values() for r in kind]
    for k in WALL_KEYS:
        vals = [v for v in (_num(r.get(k)) for r in every) if v is not None]
        if vals:
            return max(vals)
    stamps = [v for v in (_num(r.get("time")) for r in every) if v is not None]
    return max(stamps) - min(stamps) if len(stamps) > 1 else None


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    h, rem = divmod(round(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _mean(vs: list[float]) -> float | None:
    return sum(vs) / len(vs) if vs else None


def summarise(rows: dict[str, list[dict]]) -> dict:
    """The numbers of the summary (None where the run did not log them)."""
    tr, va = rows.get("train", []), rows.get("val", [])
    final = {}
    for r in rows.get("final", []):
        final.update(r)
    _, loss = _lm_series(tr)
    vl_x, vl = series(va, "val_loss")
    vb_x, vb = series(va, "val_bpb")
    xz = _num(final.get("xz_bpb"))
    best_bpb = min(vb) if vb else None
    final_bpb = _num(final.get("val_bpb"))
    steps = [_step(r, i) for i, r in enumerate(tr)]
    return {
        "train_lines": len(tr),
        "val_lines": len(va),
        "last_step": max(steps) if steps else None,
        "tokens": max((v for v in (_num(r.get("tokens")) for r in tr) if v is not None), default=None),
        "final_train_loss": loss[-1] if loss else None,
        "final_train_loss_smoothed": smooth(loss)[-1] if loss else None,
        "best_val_loss": min(vl) if vl else None,
        "best_val_loss_step": vl_x[vl.index(min(vl))] if vl else None,
        "best_val_bpb": best_bpb,
        "best_val_bpb_step": vb_x[vb.index(best_bpb)] if vb else None,
        "final_val_bpb": final_bpb,
        "xz_bpb": xz,
        "gap_to_xz": (best_bpb - xz) if best_bpb is not None and xz is not None else None,
        "mean_tok_per_s": _mean(series(tr, "tok_per_s")[1]),
        "mean_mfu": _mean(series(tr, "mfu")[1]),
        "skipped_steps": sum(1 for r in tr if r.get("skipped") is True),
        "wall_s": _wall_time(rows),
        "final": {k: v for k, v in final.items() if _num(v) is not None},
    }


def _summary_md(title: str, s: dict, made: list[tuple[str, str]], bad: int) -> str:
    def at(step):
        return "" if step is None else f" (step {step:g})"

    gap = s["gap_to_xz"]
    gap_txt = (
        "n/a"
        if gap is None
        else (
            f"{gap:+.4f} bpb ({'better' if gap < 0 else 'worse'} than xz; "
            f"{100 * s['best_val_bpb'] / s['xz_bpb']:.1f}% of xz)"
            if s["xz_bpb"]
            else f"{gap:+.4f} bpb"
        )
    )
    mfu = s["mean_mfu"]
    lines = [
        f"# Run report: {title}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| steps | {_fmt(s['last_step'], 'g')} ({s['train_lines']} train lines, {s['val_lines']} evals) |",
        f"| tokens | {_fmt(s['tokens'], ',.0f')} |",
        f"| final train loss | {_fmt(s['final_train_loss'])} (smoothed {_fmt(s['final_train_loss_smoothed'])}) |",
        f"| best val loss | {_fmt(s['best_val_loss'])}{at(s['best_val_loss_step'])} |",
        f"| best val bpb | {_fmt(s['best_val_bpb'])}{at(s['best_val_bpb_step'])} |",
        f"| final val bpb | {_fmt(s['final_val_bpb'])} |",
        f"| xz -9 bpb | {_fmt(s['xz_bpb'])} |",
        f"| gap to xz (best val bpb - xz bpb) | {gap_txt} |",
        f"| mean tokens/s | {_fmt(s['mean_tok_per_s'], ',.1f')} |",
        f"| mean MFU | {'n/a' if mfu is None else f'{100 * mfu:.2f}%'} |",
        f"| skipped steps | {s['skipped_steps']} |",
        f"| wall time | {_duration(s['wall_s'])} |",
    ]
    if bad:
        lines.append(f"| unreadable metrics lines | {bad} |")
    extra = {k: v for k, v in s["final"].items() if k not in ("step",)}
    if extra:
        lines += ["", "## Final evaluation", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in extra.items()]
    if made:
        lines += ["", "## Plots", ""]
        for name, caption in made:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------ entry points
def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report/*.png and run_dir/report/summary.md from run_dir/metrics.jsonl; return summary.md."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise FileNotFoundError(2, "no metrics file", str(path))
    rows, bad = read_metrics(path)
    if not rows:
        raise ValueError(f"{path}: no metrics lines to report")
    out = RunDir(run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    tr, va = rows.get("train", []), rows.get("val", [])
    final: dict = {}
    for r in rows.get("final", []):
        final.update(r)
    made: list[tuple[str, str]] = []
    _plot_loss(tr, va, out, made)
    _plot_loss_terms(tr, out, made)
    _plot_bpb(va, final, out, made)
    _plot_simple(tr, "lr", "lr.png", "Learning rate", "learning rate", "Learning-rate schedule", out, made)
    _plot_simple(
        tr,
        "grad_norm",
        "grad_norm.png",
        "Gradient norm",
        "global grad norm (before clipping)",
        "Gradient norm (skipped steps marked)",
        out,
        made,
        log=True,
        mark_skipped=True,
    )
    _plot_layers(
        tr,
        "maxvio",
        "maxvio.png",
        "MoE load imbalance (MaxVio) per layer",
        "MaxVio",
        "MaxVio per MoE layer (max expert load / mean load - 1)",
        out,
        made,
    )
    _plot_mhc(tr, out, made)
    _plot_recall(va, out, made)
    _plot_throughput(tr, out, made)
    summary = out / "summary.md"
    title = run_dir.resolve().name or str(run_dir)
    summary.write_text(_summary_md(title, summarise(rows), made, bad), encoding="utf-8")
    return summary


def main_report(args) -> int:
    """CLI hook for ``dsv4 report RUN_DIR``: ``args.run_dir`` is the run directory."""
    summary = write_report(args.run_dir)
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m dsv4.eval.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    sys.exit(main_report(p.parse_args()))
