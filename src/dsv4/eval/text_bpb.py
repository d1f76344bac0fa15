"""`dsv4 eval bpb`: bits per byte of a trained run on any text, with xz -9 on the same bytes beside it.

The accounting is the training run's validation metric (dsv4.train.trainer, the demo's last line):
the text is tokenized with the run's tokenizer into one stream (<|eos|> after each document), cut into
non-overlapping windows of seq_len (dsv4.data.packing.val_batches), and

    bpb = sum of the next-token losses (nats) / ln 2 / UTF-8 bytes of the scored target tokens,

so a token's bytes count once, where it is predicted. xz -9 compresses exactly those target bytes
(dsv4.eval.bpb.xz_bits_per_byte). Documents are attention-masked from each other when the run trained
that way (its train_config.json `doc_mask`, default on).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dsv4.data.corpus import DataError, find_files, iter_documents
from dsv4.data.packing import tokenize_corpus, val_batches
from dsv4.data.tokenizer import ids_to_bytes, token_byte_lengths
from dsv4.eval.bpb import bits_per_byte, xz_bits_per_byte


@torch.no_grad()
def score_batches(model, batches, doc_mask: bool, dtype: torch.dtype = torch.float32):
    """(nats, target tokens, target bytes, first batch) of the model's next-token losses summed over the
    batches (dsv4.data.packing.Batch); bf16 dtype runs the forwards under autocast. The one scoring loop of
    the trainer's validation and of `dsv4 eval bpb`."""
    dev = next(model.parameters()).device
    nats, n_tok, n_bytes, first = 0.0, 0, 0, None
    for vb in batches:
        first = first or vb
        seg = vb.segment_ids.to(dev) if doc_mask else None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(vb.input_ids.to(dev), segment_ids=seg).logits
        nats += F.cross_entropy(logits.flatten(0, 1).float(), vb.targets.to(dev).flatten(), reduction="sum").item()
        n_tok += vb.targets.numel()
        n_bytes += vb.n_bytes
    return nats, n_tok, n_bytes, first


@torch.no_grad()
def bpb_on_text(
    run: str | Path,
    data: str | Path,
    seq_len: int = 1024,
    batch_size: int = 4,
    max_tokens: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """{"bpb", "xz_bpb", "bytes", "tokens", "loss", "files", "seq_len"} of the run's model on the files
    found at `data` (a file, folder or glob, as `dsv4 train --data`), scoring at most `max_tokens`."""
    from dsv4.run import RunDir, load_run
    from dsv4.train.config import TrainConfig

    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 1")
    model, tok = load_run(run, device=device)
    cfg_path = RunDir.of(run).train_config  # a run, or one of its ckpt-* folders
    doc_mask = TrainConfig.from_json(cfg_path).doc_mask if cfg_path.exists() else True
    files = find_files(data)
    stream = tokenize_corpus(iter_documents(files), tok, show_progress=progress)
    if len(stream) < 2:
        raise DataError(f"{data}: the text gives {len(stream)} token(s); at least 2 are needed")
    seq_len = min(seq_len, model.cfg.max_position_embeddings)
    n_windows = (len(stream) - 1) // min(seq_len, len(stream) - 1)
    n_batches = -(-n_windows // batch_size)
    if max_tokens is not None:
        n_batches = min(n_batches, max(1, -(-max_tokens // (batch_size * seq_len))))
    batches = tqdm(
        val_batches(stream, batch_size, seq_len, n_batches, token_bytes=token_byte_lengths(tok)),
        total=n_batches,
        unit="batch",
        desc="bpb",
        disable=not progress,
    )
    nats, n_tok, n_bytes, _ = score_batches(model, batches, doc_mask)
    target_bytes = ids_to_bytes(tok, stream.tokens[1 : n_tok + 1])  # the windows' targets, in order
    return {
        "bpb": bits_per_byte(nats, n_bytes),
        "xz_bpb": xz_bits_per_byte(target_bytes),
        "bytes": n_bytes,
        "tokens": n_tok,
        "loss": nats / n_tok,
        "files": len(files),
        "seq_len": seq_len,
        "doc_mask": doc_mask,
    }


def cmd_eval_bpb(args) -> int:
    r = bpb_on_text(
        args.ckpt,
        args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        device=args.device,
        progress=not args.quiet,
    )
    gap = r["bpb"] - r["xz_bpb"]
    print(
        f"{r['files']} file(s), {r['tokens']:,} tokens scored in windows of {r['seq_len']}, loss {r['loss']:.4f} nats"
    )
    print(
        f"bits per byte: {r['bpb']:.3f}   xz -9 on the same {r['bytes']:,} bytes: {r['xz_bpb']:.3f}   "
        f"({'beats xz' if gap < 0 else f'{gap:.3f} bpb above xz'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "run": str(args.ckpt), "data": str(args.data)}, indent=1) + "\n")
    return 0
