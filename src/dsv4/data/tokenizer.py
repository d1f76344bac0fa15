"""A small byte-level BPE tokenizer trained on the corpus (HuggingFace `tokenizers`).

Byte-level means the base alphabet is all 256 bytes, so any string encodes without <unk> and
decode(encode(s)) == s exactly. Ids 0 and 1 are <|bos|> and <|eos|>, matching the model config's
bos_token_id / eos_token_id. Special-token strings appearing *inside* text are encoded as ordinary
bytes (encode_special_tokens), so a document cannot inject a fake document boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "BOS",
    "BOS_ID",
    "EOS",
    "EOS_ID",
    "byte_alphabet",
    "load_tokenizer",
    "token_byte_lengths",
    "tokenizer_path",
    "train_tokenizer",
]

BOS, EOS = "<|bos|>", "<|eos|>"
BOS_ID, EOS_ID = 0, 1
DEFAULT_VOCAB_SIZE = 8192
# Training-text budget: ~12 M chars of stdlib train in ~4 s on 2 cores, so 32 M stays well under a minute.
DEFAULT_MAX_CHARS = 32_000_000


def tokenizer_path(path: str | Path) -> Path:
    """`path` itself if it ends in .json, else path/tokenizer.json (so a run folder can be passed)."""
    path = Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


def _sample(texts: list[str], max_chars: int) -> list[str]:
    """Deterministic, order-independent subsample: keep documents with the smallest sha1 of their
    text until `max_chars` is reached (the last one is truncated). All texts if they already fit."""
    if sum(len(t) for t in texts) <= max_chars:
        return texts
    ranked = sorted(texts, key=lambda t: hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest())
    out, left = [], max_chars
    for t in ranked:
        if left <= 0:
            break
        out.append(t[:left])
        left -= len(out[-1])
    return out


def _configure(tok: Tokenizer) -> Tokenizer:
    # Not stored in tokenizer.json, so it is set again on every load.
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    path: str | Path | None = None,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE with <|bos|>=0, <|eos|>=1 and at most `vocab_size` ids; save it to `path`.

    If the texts hold more than `max_chars` characters, a deterministic subsample (by content hash)
    of that size is used. The result can be smaller than `vocab_size` on a tiny corpus (no more merges);
    the model's vocab_size should be the requested one.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}")
    sample = _sample([t for t in texts if t], max_chars)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(sample, trainer, length=len(sample))
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    _configure(tok)
    if path is not None:
        out = tokenizer_path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by train_tokenizer (a tokenizer.json file or the folder holding it)."""
    tok = Tokenizer.from_file(str(tokenizer_path(path)))
    if tok.token_to_id(BOS) != BOS_ID or tok.token_to_id(EOS) != EOS_ID:
        raise ValueError(f"{tokenizer_path(path)}: expected {BOS}=0 and {EOS}=1")
    return _configure(tok)


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to (int64, special tokens 0), for bits-per-byte without decoding.

    In a byte-level vocab every character of a token string stands for exactly one byte.
    """
    n = tok.get_vocab_size()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = np.zeros(n, dtype=np.int64)
    for token, i in tok.get_vocab().items():
        out[i] = 0 if token in special else len(token)
    return out


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's printable remapping): printable bytes stand for themselves,
    the others are shifted to code points 256, 257, ... in byte order. char -> byte."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def ids_to_bytes(tok: Tokenizer, ids) -> bytes:
    """The exact bytes a run of ids stands for (special tokens contribute nothing). Unlike decode(),
    this never replaces a UTF-8 sequence cut at a window edge, so byte counts match token_byte_lengths."""
    table = byte_alphabet()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    vocab = {i: t for t, i in tok.get_vocab().items()}
    pieces = {}
    out = bytearray()
    for i in ids:
        i = int(i)
        if i not in pieces:
            t = vocab.get(i)  # ids past the tokenizer's vocabulary (a model vocab can be larger): no bytes
            pieces[i] = b"" if t is None or t in special else bytes(table[c] for c in t)
        out += pieces[i]
    return bytes(out)
