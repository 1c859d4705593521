"""Token shards on disk, and the batches the training loop reads from them.

Text is tokenized once per (source, tokenizer, split settings) into two flat token files, ``train.bin`` and
``val.bin`` (each document followed by the end-of-text token; uint16 when the vocabulary fits, else uint32),
memory-mapped on every later run. They live in ``<cache>/tokens/<name>-<key>/`` with ``meta.json``; the key
hashes everything that changes the tokens, so a stale cache is never reused and an unchanged one always is.
A build writes into a temporary sibling directory and renames it into place, so a crash leaves no half cache.

Batches are a pure function of (seed, step): a resumed run, or each of R ranks of a distributed one, computes
exactly the rows an uninterrupted single-process run would have.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .corpus import SPLIT_RULE, Corpus, split_unit
from .errors import DataError
from .tokenizers import Tokenizer

FORMAT_VERSION = 2  # 2: per-document token/byte counts and sources of the validation split
SPLITS = ("train", "val")
CACHE_ENV = "TFB_CACHE"


def default_cache_dir() -> Path:
    """``$TFB_CACHE``, else ``$XDG_CACHE_HOME/tokenformer-bench``, else ``~/.cache/tokenformer-bench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenformer-bench"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def cache_key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": corpus.identity, "tokenizer": tokenizer.identity,
                       "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                       "val_fraction": val_fraction}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# building

class _SplitWriter:
    """Appends documents' tokens to one split file and keeps what meta.json and the split fix-up need."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.f = open(path, "wb")
        self.n_tokens = self.n_bytes = 0
        self.doc_ids: list[str] = []
        # per document, in file order: tokens (eot included), UTF-8 bytes, source; what per-source validation
        # metrics need to map a scored position back to its corpus
        self.doc_tokens: list[int] = []
        self.doc_bytes: list[int] = []
        self.doc_sources: list[str] = []
        self.source_bytes: dict[str, int] = {}
        self.extreme: tuple[float, str, int, int, int] | None = None  # (unit, id, start, end, n_bytes)

    def add(self, doc_id: str, ids: np.ndarray, eot: int, n_bytes: int, unit: float, keep_low: bool,
            source: str = "") -> None:
        start = self.n_tokens
        source = source or doc_id
        self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.f.write(np.asarray([eot], dtype=self.dtype).tobytes())
        self.n_tokens += len(ids) + 1
        self.n_bytes += n_bytes
        self.doc_ids.append(doc_id)
        self.doc_tokens.append(len(ids) + 1)
        self.doc_bytes.append(n_bytes)
        self.doc_sources.append(source)
        self.source_bytes[source] = self.source_bytes.get(source, 0) + n_bytes
        if self.extreme is None or (unit < self.extreme[0] if keep_low else unit > self.extreme[0]):
            self.extreme = (unit, doc_id, start, self.n_tokens, n_bytes)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def stats(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "n_bytes": self.n_bytes, "n_documents": len(self.doc_ids),
                "source_bytes": dict(sorted(self.source_bytes.items()))}

    def documents(self) -> dict[str, list]:
        return {"doc_ids": self.doc_ids, "doc_tokens": self.doc_tokens, "doc_bytes": self.doc_bytes,
                "doc_sources": self.doc_sources}


def _move_document(src: _SplitWriter, dst: _SplitWriter) -> None:
    """Move ``src``'s extreme document (the only way a split can be empty with >= 2 documents is that every
    document hashed to the other side) into the empty ``dst``; both files are already closed."""
    _, doc_id, start, end, n_bytes = src.extreme
    tokens = np.memmap(src.path, dtype=src.dtype, mode="r")
    dst.path.write_bytes(tokens[start:end].tobytes())
    rest = src.path.with_suffix(".rest")
    with open(rest, "wb") as f:
        for a, b in ((0, start), (end, len(tokens))):
            for i in range(a, b, 1 << 26):
                f.write(tokens[i:min(b, i + (1 << 26))].tobytes())
    del tokens
    os.replace(rest, src.path)
    src.n_tokens -= end - start
    src.n_bytes -= n_bytes
    i = src.doc_ids.index(doc_id)
    source = src.doc_sources[i]
    for lst in (src.doc_ids, src.doc_tokens, src.doc_bytes, src.doc_sources):
        del lst[i]
    src.source_bytes[source] -= n_bytes
    if not src.source_bytes[source]:
        del src.source_bytes[source]
    dst.n_tokens, dst.n_bytes, dst.doc_ids = end - start, n_bytes, [doc_id]
    dst.doc_tokens, dst.doc_bytes, dst.doc_sources = [end - start], [n_bytes], [source]
    dst.source_bytes = {source: n_bytes}


def _chunks(docs, max_docs: int = 512, max_bytes: int = 8 << 20):
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d.text)
        if len(chunk) >= max_docs or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def build_shards(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, out_dir: Path,
                 progress: bool | None = None) -> dict[str, Any]:
    """Tokenize ``corpus`` into ``out_dir`` (``train.bin``, ``val.bin``, ``meta.json``, the latter written last)
    in one streaming pass; documents go to validation by ``corpus.SPLIT_RULE``. Returns the metadata.
    Pre-tokenized documents (``Document.tokens``, from a ``bin:`` source) are copied, not re-tokenized: the
    same split rule, layout and cache, only the encoder is skipped."""
    t0 = time.time()
    if corpus.tokenizer is not None and corpus.tokenizer.identity != tokenizer.identity:
        raise DataError(f"source {corpus.spec!r} holds {corpus.tokenizer.name} token ids; it cannot be read with "
                        f"the {tokenizer.name} tokenizer (set data.tokenizer to its tokenizer)")
    dtype = token_dtype(tokenizer.vocab_size)
    w = {s: _SplitWriter(out_dir / f"{s}.bin", dtype) for s in SPLITS}
    bar = tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {corpus.name}",
               disable=None if progress is None else not progress, leave=False)
    try:
        for chunk in _chunks(corpus.documents()):
            encoded = iter(tokenizer.encode_arrays([d.text for d in chunk if d.tokens is None]))
            for doc in chunk:
                ids = doc.tokens if doc.tokens is not None else next(encoded)
                unit = split_unit(doc.id)
                n_bytes = len(doc.text.encode("utf-8"))
                if unit < val_fraction:
                    w["val"].add(doc.id, ids, tokenizer.eot_id, n_bytes, unit, keep_low=False, source=doc.source)
                else:
                    w["train"].add(doc.id, ids, tokenizer.eot_id, n_bytes, unit, keep_low=True, source=doc.source)
                bar.update(n_bytes)
    finally:
        bar.close()
        for s in SPLITS:
            if not w[s].f.closed:
                w[s].close()
    n_docs = sum(len(x.doc_ids) for x in w.values())
    if n_docs < 2:
        raise DataError(f"source {corpus.spec!r} has {n_docs} non-empty document(s); a document-level "
                        "train/validation split needs at least 2 (give more files, or one .jsonl line per document)")
    if not w["val"].doc_ids:
        _move_document(w["train"], w["val"])
    elif not w["train"].doc_ids:
        _move_document(w["val"], w["train"])
    if len(set(w["train"].doc_ids) | set(w["val"].doc_ids)) != n_docs:
        raise DataError(f"source {corpus.spec!r} repeats document ids; each document needs its own id")
    return {
        "format": FORMAT_VERSION,
        "source": corpus.spec,
        "source_identity": corpus.identity,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                      **tokenizer.identity},
        "dtype": dtype.name,
        "split": {"val_fraction": val_fraction, "rule": SPLIT_RULE},
        "layout": "each document's tokens followed by eot_id; n_bytes counts the documents' UTF-8 text only",
        "train": w["train"].stats(),
        "val": {**w["val"].stats(), **w["val"].documents()},
        "build_seconds": round(time.time() - t0, 3),
    }


def _valid(path: Path, key: str) -> dict[str, Any] | None:
    """The metadata of a complete cache entry at ``path``, else None (absent, other format, truncated)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s in SPLITS:
            if (path / f"{s}.bin").stat().st_size != meta[s]["n_tokens"] * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_build(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, cache_dir: str | Path | None = None,
                  progress: bool | None = None) -> tuple[Path, dict[str, Any], bool]:
    """(entry directory, metadata, whether it came from the cache). Concurrent builders (e.g. every rank of a
    distributed job) are safe: each builds in its own temporary directory, the first rename wins and the
    others use the winner's files."""
    key = cache_key(corpus, tokenizer, val_fraction)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / "tokens" / f"{corpus.name}-{tokenizer.name if tokenizer.name in ('byte', 'gpt2', 'neox') else 'tok'}-{key}"
    meta = _valid(final, key)
    if meta is not None:
        return final, meta, True
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # an incomplete or foreign entry: move it aside, never read it
        trash = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
        os.replace(final, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        meta = build_shards(corpus, tokenizer, val_fraction, tmp, progress)
        meta["key"] = key
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, final)  # the commit: a directory appears complete or not at all
        except OSError:
            won = _valid(final, key)  # another process committed first
            if won is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, won, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, meta, False


def open_split(path: Path, meta: dict[str, Any], split: str) -> np.ndarray:
    n = meta[split]["n_tokens"]
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))


# ---------------------------------------------------------------------------------------------------------
# batches

def _rows(tokens: np.ndarray, starts: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = np.stack([np.asarray(tokens[s:s + width]) for s in starts.tolist()]) if len(starts) else \
        np.zeros((0, width), dtype=np.int64)
    t = torch.from_numpy(w.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Batcher:
    """Training batches over one token array: ``get_batch(step, rank, world_size)`` -> ``(x, y)``, int64
    ``(rows, seq_len)`` with ``y`` = ``x`` shifted by one (each row is a window of ``seq_len + 1`` tokens).

    Global sample ``i = step * batch_size + row`` is window ``perm_e[i % W]`` of epoch ``e = i // W``, where
    the W windows are non-overlapping and ``perm_e`` and a start offset in ``[0, seq_len)`` are drawn from
    ``(seed, e)``: every epoch sees every window position once, shifted so that epochs do not repeat the same
    windows. Nothing depends on what was drawn before, so ``step`` alone is the data position (``state_dict``
    holds it for the loop's iterator use), and rank ``r`` of ``R`` takes rows ``r::R`` of the same global
    batch — the ranks' rows partition it.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, split: str = "train"):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        n = len(tokens)
        full = (n - 1) // seq_len
        if full < 1:
            raise DataError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, int(seed)
        # one window held in reserve lets each epoch start anywhere in [0, seq_len)
        self.windows, self.max_shift = (full - 1, seq_len - 1) if full >= 2 else (full, 0)
        self.step = 0
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def epoch(self, step: int) -> float:
        """Epochs over the split completed before ``step`` (fractional)."""
        return step * self.batch_size / self.windows

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, e])))
            shift = int(rng.integers(0, self.max_shift + 1))
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[e] = (shift, rng.permutation(self.windows))
        return self._epochs[e]

    def starts(self, step: int) -> np.ndarray:
        """Token offsets of global batch ``step``'s windows."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(g // self.windows).tolist():
            sel = g // self.windows == e
            shift, perm = self._epoch(e)
            out[sel] = shift + perm[g[sel] % self.windows] * self.seq_len
        return out

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s contiguous block of ``batch_size / world_size`` rows of global batch ``step`` (all of it by
        default), on the CPU. Contiguous blocks, so that one process accumulating micro-batches of that size
        sums exactly the groups the ranks all-reduce: data-parallel and single-process runs then agree to the bit."""
        if not 0 <= rank < world_size <= self.batch_size or self.batch_size % world_size:
            raise DataError(f"need 0 <= rank < world_size and world_size dividing batch_size, got rank={rank}, "
                            f"world_size={world_size}, batch_size={self.batch_size}")
        per = self.batch_size // world_size
        return _rows(self.tokens, self.starts(step)[rank * per:(rank + 1) * per], self.seq_len + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from ``self.step`` on; the step advances as each batch is handed out, so ``state_dict()``
        taken after consuming a batch resumes at the next one."""
        while True:
            batch = self.get_batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        diff = [k for k in ("seed", "seq_len", "batch_size", "n_tokens") if state.get(k) != mine[k]]
        if diff:
            raise DataError("cannot resume the batch stream: " + ", ".join(
                f"{k} was {state.get(k)} and is now {mine[k]}" for k in diff))
        self.step = int(state["step"])


class ValBatches:
    """The validation split as non-overlapping windows (window ``k`` = tokens ``[k·L, k·L + L]``, so every
    token after the first is predicted exactly once in a full pass), ``batch_size`` windows per batch, the last
    batch possibly smaller. ``max_batches`` keeps ``max_batches · batch_size`` windows: the first ones, or with
    ``spread=True`` ones evenly spaced over the whole split (an intermediate evaluation that sees every corpus
    of the mix, not the first document). ``n_tokens`` is how many targets a pass scores; with
    ``rank``/``world_size`` each rank gets its contiguous block of each batch (``np.array_split``; a short last
    batch may leave a rank none) and ``n_tokens`` stays the all-ranks total."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, spread: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        windows = (len(tokens) - 1) // seq_len
        if windows < 1:
            raise DataError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                            "; raise val_fraction or lower seq_len")
        keep = windows if max_batches is None else min(windows, max_batches * batch_size)
        if keep == windows:
            self.window_ids = np.arange(windows, dtype=np.int64)
        elif spread:  # evenly spaced over the split: window floor(i * windows / keep)
            self.window_ids = (np.arange(keep, dtype=np.int64) * windows) // keep
        else:
            self.window_ids = np.arange(keep, dtype=np.int64)
        self.tokens, self.seq_len, self.batch_size, self.rank, self.world_size = tokens, seq_len, batch_size, rank, world_size
        self.total_windows = windows
        self.windows = keep
        self.full = keep == windows
        self.n_batches = math.ceil(keep / batch_size)
        self.n_tokens = keep * seq_len

    def __len__(self) -> int:
        return self.n_batches

    def with_starts(self) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(starts, x, y)`` per batch: ``starts`` are this rank's rows' first token positions in the split,
        so target ``y[r, t]`` is token ``starts[r] + 1 + t``."""
        for b in range(self.n_batches):
            k = np.array_split(self.window_ids[b * self.batch_size:(b + 1) * self.batch_size], self.world_size)[self.rank]
            starts = k * self.seq_len
            yield (starts, *_rows(self.tokens, starts, self.seq_len + 1))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, x, y in self.with_starts():
            yield x, y


# ---------------------------------------------------------------------------------------------------------
# metrics

def bits_per_byte(mean_loss: float, n_tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: total nats over ``n_tokens`` predictions, in bits, per byte of UTF-8 text
    they cover — ``mean_loss * n_tokens / n_bytes / ln 2``."""
    if n_bytes <= 0:
        raise DataError(f"bits_per_byte needs n_bytes > 0, got {n_bytes}")
    return mean_loss * n_tokens / n_bytes / math.log(2)


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)`` per token (inf where it overflows)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


@dataclass
class TokenDataset:
    """A prepared dataset: ``train`` / ``val`` token memmaps, their ``meta`` (``meta.json``), the tokenizer,
    and whether this call found it in the cache (``from_cache``)."""
    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    from_cache: bool

    def batcher(self, seq_len: int, batch_size: int, seed: int = 0) -> Batcher:
        """Training batches (see ``Batcher``); the validation split is never reachable from here."""
        return Batcher(self.train, seq_len, batch_size, seed, "train")

    def val_batches(self, seq_len: int, batch_size: int, max_batches: int | None = None,
                    rank: int = 0, world_size: int = 1, spread: bool = False) -> ValBatches:
        return ValBatches(self.val, seq_len, batch_size, max_batches, rank, world_size, spread)

    def val_sources(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(source names, the source index of each validation document, each document's end position in the
        split): position p belongs to document ``searchsorted(ends, p, side='right')``."""
        m = self.meta["val"]
        names = sorted(set(m["doc_sources"]))
        index = {n: i for i, n in enumerate(names)}
        return (names, np.asarray([index[s] for s in m["doc_sources"]], dtype=np.int64),
                np.cumsum(np.asarray(m["doc_tokens"], dtype=np.int64)))

    def source_bytes_per_token(self, split: str = "val") -> dict[str, float]:
        """Each source's UTF-8 bytes per token in ``split`` (eot tokens count, as in ``bytes_per_token``)."""
        m = self.meta[split]
        if "doc_sources" not in m:
            return {}
        tok: dict[str, int] = {}
        byt: dict[str, int] = {}
        for s, t, b in zip(m["doc_sources"], m["doc_tokens"], m["doc_bytes"]):
            tok[s] = tok.get(s, 0) + t
            byt[s] = byt.get(s, 0) + b
        return {s: byt[s] / tok[s] for s in tok}

    def bytes_per_token(self, split: str = "val") -> float:
        return self.meta[split]["n_bytes"] / self.meta[split]["n_tokens"]

    def bits_per_byte(self, mean_loss: float, split: str = "val") -> float:
        """Bits per byte of a mean loss measured on (a prefix of) ``split``, at the split's overall ratio of
        text bytes to tokens (eot predictions count as tokens, their separators as no bytes)."""
        return bits_per_byte(mean_loss, self.meta[split]["n_tokens"], self.meta[split]["n_bytes"])

    def meta_summary(self) -> dict[str, Any]:
        """What a run records about its data (no document lists)."""
        return {"source": self.meta["source"], "tokenizer": self.meta["tokenizer"]["name"],
                "vocab_size": self.tokenizer.vocab_size, "eot_id": self.tokenizer.eot_id,
                "val_fraction": self.meta["split"]["val_fraction"], "key": self.meta["key"],
                "train": dict(self.meta["train"]),
                "val": {k: v for k, v in self.meta["val"].items() if not k.startswith("doc_")}}
