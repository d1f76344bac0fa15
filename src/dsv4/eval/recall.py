"""Indexer mass recall (docs/spec.md section 10): R = sum over the selected entries of the dense attention mass.

The model runs in the dense warm-up mode, so every visible entry is attended and its mass p (summed
over heads, L1-normalised over visible entries) is known; R_t = sum_{s in top-k(t)} p_ts. 1 - R bounds
the output error of sparse attention. The same k picked at random gives the baseline.
"""

from __future__ import annotations

import torch

from dsv4.kernels.topk import topk_indices


@torch.no_grad()
def indexer_recall(
    model, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None, seed: int = 0
) -> dict[int, dict[str, float]]:
    """{layer: {"recall": mean R over queries with more visible entries than k, "random": same for a
    random selection of the same size, "queries": count}}."""
    was_training = model.training
    model.eval()
    out = model(input_ids, segment_ids=segment_ids, indexer_mode="dense", return_stats=True)
    model.train(was_training)
    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    result = {}
    for rec in out.stats.get("indexer", []):
        vis, p, idx = rec["visible"], rec["probs"].float(), rec["idx"]
        p = torch.where(vis, p, 0.0)
        total = p.sum(-1)
        k = idx.shape[-1]
        crowded = (vis.sum(-1) > k) & (total > 0)  # queries where selection is a real choice
        sel = torch.zeros_like(vis).scatter_(-1, idx.clamp_min(0), idx >= 0) & vis
        rand_idx = topk_indices(torch.rand(vis.shape, generator=gen, device=vis.device), k, vis)
        rsel = torch.zeros_like(vis).scatter_(-1, rand_idx.clamp_min(0), rand_idx >= 0) & vis
        r = (p * sel).sum(-1) / total.clamp_min(1e-30)
        rr = (p * rsel).sum(-1) / total.clamp_min(1e-30)
        n = int(crowded.sum())
        result[rec["layer"]] = {
            "recall": r[crowded].mean().item() if n else float("nan"),
            "random": rr[crowded].mean().item() if n else float("nan"),
            "queries": n,
        }
    return result


def recall_on_run(run_dir, seq_len: int = 1024, batches: int = 2) -> list[dict]:
    """Per indexer layer: mean mass recall on validation windows of a training run (its own val split); a
    checkpoint directory names its run. ValueError for seq_len < 2 or batches < 1, before anything is loaded."""

    from dsv4.data import find_files, split_files, tokenize_files_cached, val_batches
    from dsv4.run import RunDir, load_run

    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2 (a window holds inputs and their next tokens)")
    if batches < 1:
        raise ValueError(f"batches={batches}: must be >= 1")
    model, tok = load_run(run_dir)
    tc = RunDir.of(run_dir).train_settings()
    _, val_files = split_files(find_files(tc.get("data")), tc.get("val_fraction", 0.05))
    stream = tokenize_files_cached(val_files, tok, None, show_progress=False)
    acc: dict[int, list] = {}
    for vb in val_batches(stream, 1, seq_len, batches):
        seg = vb.segment_ids if tc.get("doc_mask", True) else None
        for layer, r in indexer_recall(model, vb.input_ids, seg).items():
            acc.setdefault(layer, []).append(r)
    out = []
    for layer, rs in sorted(acc.items()):
        ok = [r for r in rs if r["queries"]]
        n = sum(r["queries"] for r in ok)
        mean = {key: sum(r[key] * r["queries"] for r in ok) / n if n else float("nan") for key in ("recall", "random")}
        out.append({"layer": layer, "kind": model.cfg.layer_kind(layer), **mean, "queries": n})
    return out
