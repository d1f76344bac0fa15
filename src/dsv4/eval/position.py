"""`dsv4 eval loss-vs-position`: mean next-token loss by position over long held-out documents, which shows
how much far context helps.

The files at PATH (for example every file of one repository or package) are read in order and joined into
one long document (a blank line between files, no <|eos|>, so nothing masks the far context); its tokens
are cut into non-overlapping windows of seq_len, and every window is scored from its first token through
the cache in chunks (dsv4.eval.cached.position_losses). Position p's loss predicts token p + 1 from the
p + 1 tokens before it. Reported: the mean loss at every position, averaged over the windows, and over
power-of-two position bins [1, 2), [2, 4), ... for the table and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv4.eval.cached import position_losses
from dsv4.eval.plots import pyplot, save


def bins_of(losses: torch.Tensor) -> list[dict]:
    """[P] mean losses by position -> [{"start", "end", "loss"}] over the bins [0, 1), [1, 2), [2, 4), ..."""
    out, lo = [], 0
    while lo < losses.numel():
        hi = min(losses.numel(), max(1, 2 * lo))
        out.append(dict(start=lo, end=hi, loss=float(losses[lo:hi].mean())))
        lo = hi
    return out


def loss_vs_position(
    run: str | Path,
    data: str | Path,
    seq_len: int = 4096,
    windows: int = 4,
    chunk: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """{"mean_loss": [seq_len - 1], "bins": [...], "windows", "seq_len", "files", "tokens"} of the run's model."""
    from tqdm.auto import tqdm

    from dsv4.data.corpus import DataError, find_files, iter_documents
    from dsv4.run import load_run

    if seq_len < 2 or windows < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 2 and windows={windows} >= 1")
    model, tok = load_run(run, device=device)
    if seq_len > model.cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings")
    files = find_files(data)
    text = "\n\n".join(d.text for d in iter_documents(files))
    ids = tok.encode(text).ids
    n = min(windows, len(ids) // seq_len)
    if n < 1:
        raise DataError(f"{data}: {len(ids):,} tokens, fewer than one window of seq_len={seq_len}")
    total = torch.zeros(seq_len - 1, dtype=torch.float64)
    for w in tqdm(range(n), unit="window", desc="loss-vs-position", disable=not progress):
        window = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
        total += position_losses(model, window, chunk).double()
    mean = (total / n).float()
    return dict(
        run=str(run),
        data=str(data),
        files=len(files),
        tokens=len(ids),
        seq_len=seq_len,
        windows=n,
        mean_loss=mean.tolist(),
        bins=bins_of(mean),
    )


def format_table(res: dict) -> str:
    out = [
        f"{res['files']} file(s), {res['tokens']:,} tokens; {res['windows']} window(s) of {res['seq_len']}",
        f"  {'positions':>17}  {'mean loss':>9}",
    ]
    out += [f"  {b['start']:>7} - {b['end'] - 1:>7}  {b['loss']:9.4f}" for b in res["bins"]]
    return "\n".join(out)


def plot(res: dict, path: str | Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ys = res["mean_loss"]
    ax.plot(range(1, len(ys) + 1), ys, lw=0.5, alpha=0.4, label="every position")
    mids = [(b["start"] + b["end"] + 1) / 2 for b in res["bins"]]
    ax.plot(mids, [b["loss"] for b in res["bins"]], "o-", label="bins")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (tokens of context + 1)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"loss vs position, {res['windows']} window(s) of {res['seq_len']}")
    ax.legend()
    fig.tight_layout()
    return save(fig, path)


def cmd_eval_loss_vs_position(args) -> int:
    res = loss_vs_position(
        args.ckpt, args.data, args.seq_len, args.windows, args.chunk, args.device, progress=not args.quiet
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res) + "\n")
    if args.plot:
        print(f"plot: {plot(res, args.plot)}")
    return 0
