"""Training data: corpus discovery (corpus), byte-level BPE (tokenizer), token streams and batches (packing),
the Engram canonical token map (canonical)."""

from .canonical import canonical_map, canonical_map_path, load_canonical_map, save_canonical_map
from .corpus import (
    DataError,
    DataWarning,
    Document,
    default_corpus,
    find_files,
    iter_documents,
    split_files,
    text_files,
)
from .packing import Batch, Batches, TokenStream, tokenize_corpus, tokenize_files_cached, val_batches
from .tokenizer import BOS_ID, EOS_ID, ids_to_bytes, load_tokenizer, token_byte_lengths, train_tokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "Batch",
    "Batches",
    "DataError",
    "DataWarning",
    "Document",
    "TokenStream",
    "canonical_map",
    "canonical_map_path",
    "default_corpus",
    "find_files",
    "ids_to_bytes",
    "iter_documents",
    "load_canonical_map",
    "load_tokenizer",
    "save_canonical_map",
    "split_files",
    "text_files",
    "token_byte_lengths",
    "tokenize_corpus",
    "tokenize_files_cached",
    "train_tokenizer",
    "val_batches",
]
