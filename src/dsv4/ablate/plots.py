"""The figure of a `dsv4 ablate` study: one panel per summarised metric (every seed as a dot, a grey line
joining one seed's arms, the mean and standard deviation as a bar) and one panel per curve the study kept
(mean over seeds, per arm)."""

from __future__ import annotations

import statistics
from pathlib import Path

from dsv4.eval.plots import pyplot, save

CURVES = {  # run extra key -> (x of a point, y of a point, x label, y label, log x)
    "loss_vs_position": (lambda p: max(1, p["start"]), lambda p: p["loss"], "token position", "mean loss (nats)", True),
    "lm_loss": (lambda p: p[0], lambda p: p[1], "step", "training loss (nats)", False),
    "acceptance_curve": (lambda p: p["step"], lambda p: p["acceptance"], "step", "MTP acceptance (generated)", False),
    "text_acceptance": (lambda p: p["step"], lambda p: p["text_acceptance"], "step", "MTP acceptance (text)", False),
}


def _curves(res: dict) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{curve: {arm: [(x, mean y over seeds)]}} from res["extra"] ({ARM-seedN: {curve: points}})."""
    per: dict = {}
    for key, extra in res.get("extra", {}).items():
        arm = key.rsplit("-seed", 1)[0]
        for name, points in extra.items():
            if name not in CURVES:
                continue
            fx, fy = CURVES[name][:2]
            for p in points:
                per.setdefault(name, {}).setdefault(arm, {}).setdefault(fx(p), []).append(fy(p))
    return {
        n: {a: sorted((x, statistics.fmean(ys)) for x, ys in pts.items()) for a, pts in arms.items()}
        for n, arms in per.items()
    }


def study_figure(res: dict, path: str | Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    panels = [(ref, m, t) for ref, summary in res["summary"].items() for m, t in summary.items() if t]
    curves = _curves(res)
    n = len(panels) + len(curves)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (ref, metric, table) in zip(flat, panels):
        names = list(table)
        by_seed = [dict(zip(table[a].get("seeds", []), table[a]["values"])) for a in names]
        for seed in {k for d in by_seed for k in d}:  # one grey line per seed: the arms pair by seed
            xs = [i for i, d in enumerate(by_seed) if seed in d]
            if len(xs) > 1:
                ax.plot(xs, [by_seed[i][seed] for i in xs], color="0.8", lw=0.7, zorder=0)
        for i, arm in enumerate(names):
            row = table[arm]
            ax.scatter([i] * len(row["values"]), row["values"], s=12, alpha=0.6)
            ax.errorbar([i + 0.2], [row["mean"]], yerr=[row["std"]], fmt="o", capsize=3, color="k")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric if len(res["summary"]) == 1 else f"{metric} (vs {ref})", fontsize=9)
    for ax, (name, arms) in zip(flat[len(panels) :], curves.items()):
        _, _, xl, yl, logx = CURVES[name]
        for arm, pts in arms.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=arm, lw=1)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"dsv4 ablate {res['study']}: {len(res['runs'])} runs", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
