"""Training data: corpus discovery (corpus), byte-level BPE (tokenizer), token streams and batches (packing)."""
from .corpus import (DataError, DataWarning, Document, default_corpus, find_files, iter_documents, split_files,
                     text_files)
from .packing import Batch, Batches, TokenStream, tokenize_corpus, tokenize_files_cached, val_batches
from .tokenizer import BOS_ID, EOS_ID, ids_to_bytes, load_tokenizer, token_byte_lengths, train_tokenizer

__all__ = ["DataError", "DataWarning", "Document", "default_corpus", "find_files", "iter_documents", "split_files",
           "text_files", "Batch", "Batches", "TokenStream", "tokenize_corpus", "tokenize_files_cached", "val_batches",
           "BOS_ID", "EOS_ID", "ids_to_bytes", "load_tokenizer", "token_byte_lengths", "train_tokenizer"]
