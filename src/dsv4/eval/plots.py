"""The figures of the long-context evaluations (dsv4.eval.retrieval, needle, position): matplotlib with the
Agg backend (None when it is missing), one save rule, and the depth x length heat map."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heat_maps(panels: dict[str, dict], depths: list[float], path: str | Path, label: str) -> Path | None:
    """One panel per title: {title: {length: {depth: value in [0, 1]}}}, depth down, context length across."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    keys = [f"{d:g}" for d in depths]
    im = None
    for ax, (title, per) in zip(axes[0], panels.items()):
        lengths = list(per)
        im = ax.imshow([[per[n][d] for n in lengths] for d in keys], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lengths])
        ax.set_yticks(range(len(keys)), keys)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label=label)
    return save(fig, path)
