"""Readers for the file formats of real corpora: compressed JSONL, parquet, ``datasets`` saved to disk, and
pre-tokenized flat ``.bin`` token files (nanoGPT's format).

They yield raw records — ``(record number, text)`` or ``(record number, token ids)``, numbered from 1 and
counting the records that are then skipped as empty — and ``corpus`` turns those into ``Document``s, so the
document ids (and with them the train/validation split) are decided in one place. The optional libraries
(the ``corpora`` extra: pyarrow, zstandard, datasets) are imported only by the reader that needs them.
Every failure is a ``DataError`` of one line naming the file (and record) or the field.
"""
from __future__ import annotations

import gzip
import importlib
import io
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DataError

CORPORA_PIP_COMMAND = "python -m pip install 'tokenformer-bench[corpora]'"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COMPRESSED_SUFFIXES = (".gz", ".zst")
BIN_DTYPES = ("uint16", "uint32")
_BLOCK = 1 << 24  # tokens per read of a .bin file: bounded memory however large the file


def need(module: str, package: str, what: str):
    """Import an optional dependency or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} needs `{package}` (the `corpora` extra): run `{CORPORA_PIP_COMMAND}`") from None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# JSONL, plain or compressed

def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of a ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` file; a corrupt or
    truncated archive stops with the file named rather than with a decompressor's traceback."""
    name = path.name
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if name.endswith(".zst"):
        zstd = need("zstandard", "zstandard", f"{path}")
        errors += (zstd.ZstdError,)
    try:
        with open(path, "rb") as raw:
            if name.endswith(".gz"):
                f = gzip.GzipFile(fileobj=raw)
            elif name.endswith(".zst"):
                # read_across_frames: shards concatenated frame by frame (as `cat a.zst b.zst`) read whole
                f = io.BufferedReader(zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
            else:
                f = raw
            yield from enumerate(f, 1)
    except errors as e:
        raise DataError(f"{path}: unreadable ({_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------------------
# parquet

def _text_type(pa, t) -> bool:
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # string_view: newer pyarrow than 14
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def check_parquet(path: Path, text_field: str) -> int:
    """Read the footer only (cheap, so every shard is checked before anything is tokenized): the file is
    parquet and has a text column ``text_field``. Returns its row count."""
    pq = need("pyarrow.parquet", "pyarrow", f"{path}")
    pa = need("pyarrow", "pyarrow", f"{path}")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for a bad footer
        raise DataError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set data.text_field")
    t = schema.field(text_field).type
    if not _text_type(pa, t):
        raise DataError(f"{path}: column {text_field!r} is {t}, not text")
    return pf.metadata.num_rows


def parquet_texts(path: Path, text_field: str) -> Iterator[tuple[int, str | None]]:
    """``(row number, text)`` row by row, one record batch in memory at a time."""
    pq = need("pyarrow.parquet", "pyarrow", f"{path}")
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                n += 1
                yield n, text
    except DataError:
        raise
    except Exception as e:  # a corrupt page: name the file and how far it got
        raise DataError(f"{path}: unreadable after row {n} ({_one_line(e)})") from None


# ---------------------------------------------------------------------------------------------------------
# `datasets` saved with save_to_disk

def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A ``Dataset.save_to_disk`` directory (``state.json``) or a ``DatasetDict`` one (``dataset_dict.json``)."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


def open_saved_dataset(path: Path, split: str | None, text_field: str) -> tuple[Any, str | None]:
    """The dataset (memory-mapped Arrow, nothing read yet) and the split it is: a ``DatasetDict`` gives
    ``split`` or else ``train``; a plain ``Dataset`` is the split itself (naming another one is an error)."""
    datasets = need("datasets", "datasets", f"saved dataset {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable saved dataset ({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise DataError(f"saved dataset {path} has no split {want!r} (splits: {', '.join(ds)}); "
                            f"name one as '{path}:<split>'")
        ds, split = ds[want], want
    elif split is not None and split != str(ds.split or split):
        raise DataError(f"saved dataset {path} is a single split ({ds.split}), not {split!r}")
    if text_field not in ds.column_names:
        raise DataError(f"saved dataset {path}{':' + split if split else ''}: no column {text_field!r} "
                        f"(columns: {', '.join(ds.column_names)}); set data.text_field")
    return ds, split


def saved_texts(ds, text_field: str) -> Iterator[tuple[int, Any]]:
    n = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            n += 1
            yield n, text


# ---------------------------------------------------------------------------------------------------------
# pre-tokenized .bin

def check_bin(path: Path, dtype: np.dtype) -> int:
    """A flat array of ``dtype`` token ids: its size must be a whole number of ids. Returns the id count."""
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.name} token ids (wrong dtype?)")
    return size // dtype.itemsize


def bin_segments(path: Path, dtype: np.dtype, eot_id: int, vocab_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(document number, ids)`` for each run of ids ended by ``eot_id`` (nanoGPT appends it after every
    document; a last run without one is a document too). Every id is checked against ``vocab_size`` as it is
    read: ids from another tokenizer or a wrong dtype would otherwise index past the embedding table."""
    n_ids = check_bin(path, dtype)
    if n_ids == 0:
        return
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n_ids,))
    start = n = 0
    for b in range(0, n_ids, _BLOCK):
        block = np.asarray(tokens[b:b + _BLOCK])
        if int(block.max()) >= vocab_size:
            at = b + int(np.argmax(block >= vocab_size))
            raise DataError(f"{path}: token id {int(tokens[at])} at position {at} is outside the tokenizer's "
                            f"vocabulary of {vocab_size} (wrong data.tokenizer or dtype?)")
        for end in (np.flatnonzero(block == eot_id) + b).tolist():
            n += 1
            yield n, np.array(tokens[start:end])
            start = end + 1
    if start < n_ids:
        yield n + 1, np.array(tokens[start:])
