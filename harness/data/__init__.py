"""Data for the training loop: text sources -> documents -> a deterministic train/validation split by document
-> tokens cached on disk -> fixed-length batches that are a pure function of (seed, step).

    ds = prepare_dataset()                       # embedded Shakespeare + KJV, byte tokenizer
    ds = prepare_dataset("data/*.jsonl", "gpt2", val_fraction=0.01)
    x, y = ds.batcher(seq_len=256, batch_size=32, seed=0).get_batch(step)
    for x, y in ds.val_batches(256, 32): ...
    ds.bits_per_byte(mean_val_loss)

See ``corpus`` (sources, split), ``tokenizers`` and ``shards`` (cache, batches, metrics).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from .corpus import (EMBEDDED_PACKAGES, EMBEDDED_PIP_COMMAND, Corpus, Document, embedded_corpus_available,
                     embedded_files, ensure_embedded_corpus, markdown_to_text, open_source, split_ids, split_unit)
from .errors import DataError
from .shards import (Batcher, TokenDataset, ValBatches, bits_per_byte, default_cache_dir, load_or_build,
                     open_split, perplexity)
from .tokenizers import (GPT2_PIP_COMMAND, NEOX_PIP_COMMAND, ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer,
                         tokenizer_from_file)

__all__ = ["prepare_dataset", "TokenDataset", "Batcher", "ValBatches", "DataError", "Document", "Corpus",
           "open_source", "split_ids", "split_unit", "ensure_embedded_corpus", "embedded_corpus_available",
           "embedded_files", "markdown_to_text", "get_tokenizer", "tokenizer_from_file", "Tokenizer",
           "ByteTokenizer", "HFTokenizer", "bits_per_byte", "perplexity", "default_cache_dir",
           "EMBEDDED_PACKAGES", "EMBEDDED_PIP_COMMAND", "GPT2_PIP_COMMAND", "NEOX_PIP_COMMAND"]

DEFAULT_VAL_FRACTION = 0.05


def prepare_dataset(source: str | os.PathLike | Sequence[str | os.PathLike] | Any = "embedded",
                    tokenizer: str | Tokenizer = "byte", *, cache_dir: str | Path | None = None,
                    val_fraction: float = DEFAULT_VAL_FRACTION, text_field: str = "text",
                    max_documents: int | None = None, max_bytes: int | None = None,
                    progress: bool | None = None) -> TokenDataset:
    """Tokenize ``source`` with ``tokenizer`` once (cached under ``cache_dir``, default ``$TFB_CACHE`` or
    ``~/.cache/tokenformer-bench``) and open the train/validation token memmaps.

    ``source``: ``"embedded"`` | ``"embedded:shakespeare"`` | ``"embedded:kjv"`` | paths, directories or globs of
    ``.txt`` (one file = one document) / ``.jsonl[.gz|.zst]`` (one line = one document, field ``text_field``) /
    ``.parquet`` (one row = one document, column ``text_field``) | a ``save_to_disk`` directory
    (``"<dir>[:<split>]"``) | ``"bin:[uint16:|uint32:]<paths>"`` (ids of ``tokenizer``, not re-tokenized) |
    ``"hf:<dataset>[:<config>]"`` (needs ``max_documents`` or ``max_bytes``); see ``corpus``. A config object
    with these fields as attributes (``harness.config.DataConfig``) may be passed instead, and then supplies them all.
    ``val_fraction`` of the documents (by a hash of their ids, never fewer than one) form the validation split.
    ``progress``: tqdm bar while tokenizing (None: only on a terminal).
    """
    if not isinstance(source, (str, os.PathLike, list, tuple)) and hasattr(source, "source"):
        cfg = source
        source = cfg.source
        tokenizer = getattr(cfg, "tokenizer", tokenizer)
        cache_dir = getattr(cfg, "cache_dir", cache_dir)
        val_fraction = getattr(cfg, "val_fraction", val_fraction)
        text_field = getattr(cfg, "text_field", text_field)
        max_documents = getattr(cfg, "max_documents", max_documents)
        max_bytes = getattr(cfg, "max_bytes", max_bytes)
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0 and math.isfinite(val_fraction)):
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tok = get_tokenizer(tokenizer)
    corpus = open_source(source, text_field, max_documents, max_bytes, tokenizer=tok)
    path, meta, cached = load_or_build(corpus, tok, float(val_fraction), cache_dir, progress)
    return TokenDataset(path, meta, tok, open_split(path, meta, "train"), open_split(path, meta, "val"), cached)
