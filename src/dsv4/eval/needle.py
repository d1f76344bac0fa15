"""`dsv4 eval needle-recall`: for retrieval prompts (dsv4.eval.retrieval), whether each indexer layer's top-k
at the question's last token selected an entry holding the queried needle: the mechanism behind the
retrieval score.

The prompt up to the question's last token runs through the cache in chunks (dsv4.eval.cached); every
CSA / DSA layer reports the top-k of that query (Attention.observe_selection). An entry holds the needle
when the tokens it pools meet the needle's span: a DSA entry is one token s; a CSA entry j (overlapped
compressor, ratio m) pools the tokens [(j - 1) m, (j + 1) m). A needle inside a layer's raw window is
attended whatever the indexer picks; it is counted apart ("window"), not as a selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv4.eval.cached import chunk_logits
from dsv4.eval.plots import heat_maps
from dsv4.eval.retrieval import load_for_grid, make_sample


def entry_tokens(kind: str, ratio: int, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries j -> [first, last + 1) of the tokens each pools (CSA overlapped: two blocks; DSA: one token)."""
    if kind == "dsa":
        return j, j + 1
    return ((j - 1) * ratio).clamp_min(0), (j + 1) * ratio


def selection_chance(kind: str, ratio: int, window: int, topk: int, query: int, needle: tuple[int, int]) -> float:
    """The chance that k entries drawn uniformly from the query's candidates (CSA: every complete compressed
    entry; DSA: every raw token outside the window) include one holding the needle: 1 - C(M - h, k) / C(M, k)
    for M candidates, h of them needle entries, k = min(topk, M). The baseline of needle_selected's verdict."""
    from dsv4.model.indexer import visible_count

    m = int(visible_count(query + 1, ratio, window if kind == "dsa" else 0))
    first, end = entry_tokens(kind, ratio, torch.arange(m))
    h = int(((first < needle[1]) & (end > needle[0])).sum())
    miss = 1.0
    for i in range(min(topk, m)):
        miss *= max(0, m - h - i) / (m - i)
    return 1.0 - miss if h else 0.0


@torch.no_grad()
def needle_selected(model, ids: list[int], needle: tuple[int, int], query: int, chunk: int = 4096) -> dict:
    """{layer: "selected" | "window" | "missed"} for the query at position `query` of ids (its prefix is run)."""
    attns = {i: blk.attn for i, blk in enumerate(model.layers) if blk.attn.kind in ("csa", "dsa")}
    seen: dict[int, torch.Tensor] = {}

    def observe(layer: int, q_pos: torch.Tensor, idx: torch.Tensor) -> None:
        hit = (q_pos.reshape(-1) == query).nonzero()
        if hit.numel():  # a chunk: the query's column; a decode step (batch 1): its one row
            seen[layer] = idx[0, int(hit[0, 0])].cpu() if idx.shape[1] > 1 else idx[0, 0].cpu()

    for a in attns.values():
        a.observe_selection = observe
    try:
        for _ in chunk_logits(model, torch.tensor([ids[: query + 1]]), query, chunk):
            pass
    finally:
        for a in attns.values():
            a.observe_selection = None
    out = {}
    lo, hi = needle
    for i, a in sorted(attns.items()):
        sel = seen[i]
        sel = sel[sel >= 0]
        first, end = entry_tokens(a.kind, a.ratio, sel)
        if bool(((first < hi) & (end > lo)).any()):
            out[i] = "selected"
        elif a.window and hi > query - a.window + 1:
            out[i] = "window"
        else:
            out[i] = "missed"
    return out


def run_needle_recall(
    run: str | Path,
    tasks=("passkey", "niah"),
    lengths=(1024, 4096, 16384),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 2,
    chunk: int = 4096,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """{"recall": {layer: {length: {depth: fraction selected}}}, "window": same for in-window, "chance": the
    mean selection_chance (what a random top-k would select), ...}."""
    from tqdm.auto import tqdm

    model, tok = load_for_grid(run, tasks, samples, lengths, depths, device)
    if not model.cfg.has_indexer:
        raise ValueError(f"{run}: the model has no CSA or DSA layer, so no indexer to check")
    cells = [(n, d) for n in sorted(lengths) for d in sorted(depths)]
    counts: dict = {}
    bar = tqdm(total=len(cells) * samples * len(tasks), unit="prompt", desc="needle-recall", disable=not progress)
    for n, d in cells:
        for t in tasks:
            for i in range(samples):
                s = make_sample(t, tok, n, d, i)
                query = s.answers[0][0] - 1
                res = needle_selected(model, s.ids, s.needle, query, chunk)
                for layer, what in res.items():
                    c = counts.setdefault(layer, {}).setdefault(str(n), {}).setdefault(f"{d:g}", [0, 0, 0, 0.0])
                    c[0] += what == "selected"
                    c[1] += what == "window"
                    c[2] += 1
                    a = model.layers[layer].attn
                    c[3] += selection_chance(a.kind, a.ratio, a.window, model.cfg.index_topk, query, s.needle)
                bar.update(1)
    bar.close()

    def frac(k: int) -> dict:
        return {
            str(layer): {n: {d: v[k] / v[2] for d, v in row.items()} for n, row in per.items()}
            for layer, per in counts.items()
        }

    kinds = {str(i): model.cfg.layer_kind(i) for i in counts}
    return dict(
        run=str(run),
        tasks=list(tasks),
        samples=samples,
        lengths=sorted(lengths),
        depths=sorted(depths),
        kinds=kinds,
        recall=frac(0),
        window=frac(1),
        chance=frac(3),
    )


def format_table(res: dict) -> str:
    depths = [f"{d:g}" for d in res["depths"]]
    out = []
    for layer, per in res["recall"].items():
        out.append(f"layer {layer} ({res['kinds'][layer]}): needle selected, by length (rows) and depth (columns)")
        out.append(f"  {'length':>7}  " + "  ".join(f"{d:>5}" for d in depths))
        for n, row in per.items():
            chance = res["chance"][layer][n]
            out.append(
                f"  {int(n):>7}  "
                + "  ".join(f"{row[d]:5.2f}" for d in depths)
                + f"   (random top-k: {sum(chance.values()) / len(chance):.2f})"
            )
    return "\n".join(out)


def plot(res: dict, path: str | Path) -> Path | None:
    panels = {f"layer {layer} ({res['kinds'][layer]})": per for layer, per in res["recall"].items()}
    return heat_maps(panels, res["depths"], path, "needle selected")


def cmd_eval_needle_recall(args) -> int:
    res = run_needle_recall(
        args.ckpt, args.tasks, args.lengths, args.depths, args.samples, args.chunk, args.device, not args.quiet
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        print(f"plot: {plot(res, args.plot)}")
    return 0
