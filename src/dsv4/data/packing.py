"""Tokenized corpora as one flat id stream, and deterministic batches cut from it.

All documents are concatenated with <|eos|> after each one. Training windows start at random
offsets drawn from np.random.default_rng([seed, step]), so the batch of a step is a pure function
of (seed, step): resuming at step k reproduces exactly the data of an uninterrupted run.
segment_ids mark document boundaries inside a window for document-masked attention.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .corpus import DataError, Document, iter_documents
from .tokenizer import EOS_ID

__all__ = ["Batch", "Batches", "TokenStream", "segment_ids", "tokenize_corpus", "tokenize_files_cached", "val_batches"]

ENCODE_CHUNK_CHARS = 2_000_000  # text handed to one encode_batch call (bounds memory, drives the bar)


@dataclass
class TokenStream:
    """A tokenized corpus: `tokens` (uint16 or int32, eos after each document), `doc_starts`
    (int64 offset of each document's first token) and `n_bytes` (UTF-8 bytes of all the text)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    n_bytes: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def save(self, path: str | Path, key: str = "") -> Path:
        """Write an .npz cache (uncompressed, so loading is a fast read); `key` identifies its inputs."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, tokens=self.tokens, doc_starts=self.doc_starts, n_bytes=np.int64(self.n_bytes), key=np.array(key))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenStream:
        """Read a cache written by save()."""
        with np.load(Path(path)) as z:
            return cls(z["tokens"], z["doc_starts"], int(z["n_bytes"]))

    @staticmethod
    def cached_key(path: str | Path) -> str | None:
        """The key stored in a cache file, or None if it is missing or unreadable."""
        try:
            with np.load(Path(path)) as z:
                return str(z["key"])
        except (OSError, KeyError, ValueError):
            return None


def _dtype(tok: Tokenizer) -> type:
    return np.uint16 if tok.get_vocab_size() <= 65535 else np.int32


def tokenize_corpus(docs: Iterable[Document | str], tokenizer: Tokenizer, *, show_progress: bool = True) -> TokenStream:
    """Encode documents (Document or plain str) into one stream with <|eos|> after each.

    Documents are encoded in chunks with encode_batch(_fast) (parallel in Rust); the bar counts text bytes.
    """
    dtype = _dtype(tokenizer)
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    n_bytes = 0
    bar = tqdm(unit="B", unit_scale=True, desc="tokenize", disable=not show_progress)

    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets: ~1.5x faster.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def flush(batch: list[str], nb: int) -> None:
        for enc in encode(batch, add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=dtype)
            ids[:-1] = enc.ids
            ids[-1] = EOS_ID
            parts.append(ids)
            lengths.append(len(ids))
        batch.clear()
        bar.update(nb)

    batch: list[str] = []
    chars = pending = 0
    for doc in docs:
        text = doc.text if isinstance(doc, Document) else doc
        if not text:
            continue
        nb = len(text.encode("utf-8"))
        n_bytes += nb
        pending += nb
        batch.append(text)
        chars += len(text)
        if chars >= ENCODE_CHUNK_CHARS:
            flush(batch, pending)
            chars = pending = 0
    if batch:
        flush(batch, pending)
    bar.close()
    if not parts:
        raise DataError("no text documents to tokenize (all empty)")
    tokens = np.concatenate(parts)
    doc_starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    return TokenStream(tokens, doc_starts, n_bytes)


def _files_key(files: Sequence[Path], tokenizer: Tokenizer, text_field: str) -> str:
    """Hash of the tokenizer and of each file's path, size and mtime: changes when any input changes."""
    h = hashlib.sha256(tokenizer.to_str().encode())
    h.update(text_field.encode())
    for p in files:
        st = Path(p).stat()
        h.update(f"\0{Path(p).absolute()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def tokenize_files_cached(
    files: Sequence[str | Path],
    tokenizer: Tokenizer,
    cache: str | Path | None,
    *,
    text_field: str = "text",
    show_progress: bool = True,
) -> TokenStream:
    """tokenize_corpus(iter_documents(files)) with an .npz cache at `cache`, reused while the tokenizer
    and the files (path, size, mtime) are unchanged. cache=None disables caching."""
    files = [Path(p) for p in files]
    key = _files_key(files, tokenizer, text_field) if cache is not None else ""
    if cache is not None and TokenStream.cached_key(cache) == key:
        return TokenStream.load(cache)
    stream = tokenize_corpus(iter_documents(files, text_field), tokenizer, show_progress=show_progress)
    if cache is not None:
        stream.save(cache, key)
    return stream


def segment_ids(input_ids: np.ndarray, eos_id: int = EOS_ID) -> np.ndarray:
    """Document index of each position within its row (0, 1, ...): a new segment starts right after eos."""
    seg = np.zeros(input_ids.shape, dtype=np.int64)
    np.cumsum(input_ids[..., :-1] == eos_id, axis=-1, out=seg[..., 1:])
    return seg


@dataclass
class Batch:
    """input_ids, targets (input shifted by one) and segment_ids, all int64 [B, T]; n_bytes = UTF-8
    bytes of the target tokens (None when the loader has no token byte lengths)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    n_bytes: int | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device`."""
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.segment_ids.to(device, non_blocking=non_blocking),
            self.n_bytes,
        )


def _make_batch(windows: np.ndarray, token_bytes: np.ndarray | None, eos_id: int) -> Batch:
    windows = windows.astype(np.int64)
    inp, tgt = windows[:, :-1], windows[:, 1:]
    n_bytes = int(token_bytes[tgt].sum()) if token_bytes is not None else None
    return Batch(
        torch.from_numpy(np.ascontiguousarray(inp)),
        torch.from_numpy(np.ascontiguousarray(tgt)),
        torch.from_numpy(segment_ids(inp, eos_id)),
        n_bytes,
    )


def _tokens(stream: TokenStream | np.ndarray) -> np.ndarray:
    return stream.tokens if isinstance(stream, TokenStream) else np.asarray(stream)


class Batches:
    """Deterministic random-window loader: get(step) is a pure function of (seed, step).

    Row b of step s is tokens[o : o + seq_len + 1] with o drawn from np.random.default_rng([seed, s]);
    windows may cross document boundaries (segment_ids mark them). `token_bytes` (from
    token_byte_lengths) enables Batch.n_bytes.
    """

    def __init__(
        self,
        stream: TokenStream | np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        token_bytes: np.ndarray | None = None,
        eos_id: int = EOS_ID,
    ):
        self.tokens = _tokens(stream)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"token stream too short: {len(self.tokens)} tokens < seq_len + 1 = {seq_len + 1}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.token_bytes, self.eos_id = token_bytes, eos_id
        self._cols = np.arange(seq_len + 1)

    def offsets(self, step: int) -> np.ndarray:
        """The window start offsets of `step` (int64 [batch_size])."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def get(self, step: int) -> Batch:
        """The batch of `step`: the same on every call, machine and resumed run."""
        return _make_batch(self.tokens[self.offsets(step)[:, None] + self._cols], self.token_bytes, self.eos_id)

    __getitem__ = get


def val_batches(
    stream: TokenStream | np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    *,
    token_bytes: np.ndarray | None = None,
    eos_id: int = EOS_ID,
) -> Iterator[Batch]:
    """Sequential windows over a validation stream for evaluation, always the same.

    Window k covers inputs tokens[k*T : k*T+T] and targets tokens[k*T+1 : k*T+T+1], so every
    target token is scored once and no two windows overlap in targets. The last batch may have fewer
    rows; the tail shorter than seq_len is dropped (a stream shorter than one window gives one short
    window). `max_batches` caps the number of batches.
    """
    tokens = _tokens(stream)
    if len(tokens) < 2:
        raise DataError(f"validation stream too short: {len(tokens)} tokens")
    T = min(seq_len, len(tokens) - 1)
    n_windows = (len(tokens) - 1) // T
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    cols = np.arange(T + 1)
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows), dtype=np.int64) * T
        yield _make_batch(tokens[starts[:, None] + cols], token_bytes, eos_id)
