"""Canonical token ids for the Engram hash (spec 4.1): the surjective map P over the vocabulary and its
`canonical_map.json` next to the tokenizer.

canonical_text: NFKC -> NFD -> strip combining marks -> lowercase -> collapse whitespace -> strip.
P[i] = the smallest id whose decoded text has the same canonical_text; byte fragments, special tokens
and empty keys keep their own id. The model takes P as a LongTensor (Transformer.set_canonical_map) and
never reads the tokenizer itself.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import torch

from dsv4.data.tokenizer import byte_alphabet

__all__ = [
    "canonical_map",
    "canonical_map_path",
    "canonical_text",
    "compression_ratio",
    "load_canonical_map",
    "save_canonical_map",
]


def canonical_text(text: str) -> str:
    """NFKC -> NFD -> strip combining marks -> lowercase -> collapse whitespace -> strip (spec 4.1);
    whitespace-only text maps to a single space."""
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    key = re.sub(r"\s+", " ", t).strip()
    if not key and text and not text.strip():
        return " "
    return key


def canonical_map(tokenizer=None, vocab_size: int | None = None) -> torch.Tensor:
    """The surjective map P over the vocabulary (spec 4.1): LongTensor [V], P[i] = the smallest id whose
    decoded text has the same canonical_text. Byte fragments (bytes not valid UTF-8 on their own),
    special tokens and tokens whose key would be empty keep their own id; ids past the tokenizer's
    vocabulary and the no-tokenizer case map to themselves."""
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("canonical_map needs a tokenizer or a vocab_size")
        return torch.arange(vocab_size)
    table = byte_alphabet()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    n = max(vocab_size or 0, tokenizer.get_vocab_size())
    out = torch.arange(n)
    first: dict[str, int] = {}
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token in special or i >= n:
            continue
        try:
            text = bytes(table[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue  # a byte fragment (or a non byte-level piece): its own id
        key = canonical_text(text)
        if key:
            out[i] = first.setdefault(key, i)
    return out


def compression_ratio(cmap: torch.Tensor) -> float:
    """Distinct canonical ids / vocabulary size (the paper's 23% reduction is a ratio of 0.77)."""
    return cmap.unique().numel() / cmap.numel()


def canonical_map_path(path: str | Path) -> Path:
    """canonical_map.json next to a tokenizer.json (or inside a run folder)."""
    path = Path(path)
    return (path.parent if path.suffix == ".json" else path) / "canonical_map.json"


def save_canonical_map(cmap: torch.Tensor, path: str | Path) -> Path:
    """Write the map as JSON ({"canonical_ids": [...]}) to `path`, or next to the tokenizer when `path` is
    a tokenizer.json or a run folder."""
    path = Path(path)
    out = canonical_map_path(path) if path.is_dir() or path.name == "tokenizer.json" else path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"canonical_ids": [int(i) for i in cmap.tolist()]}))
    return out


def load_canonical_map(path: str | Path) -> torch.Tensor:
    """The map saved by save_canonical_map (the file, a tokenizer.json beside it, or the run folder)."""
    path = Path(path)
    if path.is_dir() or path.name == "tokenizer.json":
        path = canonical_map_path(path)
    return torch.tensor(json.loads(path.read_text())["canonical_ids"], dtype=torch.long)
