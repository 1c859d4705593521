"""Real-corpus formats of data.source: parquet, jsonl(.gz/.zst), `datasets` saved to disk, pre-tokenized .bin,
and hf: streaming of a local directory.

Every fixture is written here into tmp_path and the documents read back are compared with the texts written;
nothing touches the network (the hf: test blocks sockets). pyarrow, zstandard and datasets are the `corpora`
extra; a test needing one that is absent skips.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import data, preflight
from harness.config import DataConfig
from harness.data import DataError, open_source, prepare_dataset
from harness.data.tokenizers import ByteTokenizer
from harness.train.loop import train
from tests.fixtures import tiny_train_config

ROOT = Path(__file__).resolve().parents[2]
WORDS = "north wind sun traveller cloak stronger warmth shining café naïve über".split()
EOT = 256  # the byte tokenizer's end-of-text id


def _texts(n: int = 24) -> list[str]:
    """Distinct documents of 20-60 words (non-ASCII included, so bytes != characters)."""
    rng = np.random.default_rng(0)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, 20 + i % 5 * 10)) + "." for i in range(n)]


def _byte_ids(texts) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]


# ---------------------------------------------------------------------------------------------- writers

def _write_jsonl(path: Path, texts, field: str = "text") -> Path:
    lines = "".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()
    if path.name.endswith(".gz"):
        lines = gzip.compress(lines)
    elif path.name.endswith(".zst"):
        zstd = pytest.importorskip("zstandard")
        lines = zstd.ZstdCompressor().compress(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lines)
    return path


def _write_parquet(path: Path, texts, field: str = "text") -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: list(texts), "n": list(range(len(texts)))}), path, row_group_size=7)
    return path


def _write_bin(path: Path, docs_ids, dtype=np.uint16, eot: int = EOT) -> Path:
    """nanoGPT's layout: each document's ids followed by the end-of-text id, one flat array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate([np.append(ids, eot) for ids in docs_ids]).astype(dtype).tofile(path)
    return path


def _save_dataset(path: Path, splits: dict[str, list[str]] | list[str]) -> Path:
    datasets = pytest.importorskip("datasets")
    mk = lambda texts: datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    if isinstance(splits, dict):
        datasets.DatasetDict({k: mk(v) for k, v in splits.items()}).save_to_disk(str(path))
    else:
        mk(splits).save_to_disk(str(path))
    return path


def _split_docs(tokens) -> list[np.ndarray]:
    """A cached split's token file cut back into documents (each ends with EOT)."""
    arr = np.asarray(tokens).astype(np.int64)
    ends = np.flatnonzero(arr == EOT)
    return [arr[a:b] for a, b in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]


FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "saved", "saved_dict", "bin")


def _write(fmt: str, d: Path, texts) -> tuple[str, list[str]]:
    """The same documents in format ``fmt`` under ``d``: (source spec, the ids the documents must get)."""
    n = range(1, len(texts) + 1)
    if fmt.startswith("jsonl"):  # a path, a path, a glob; compressed shards keep the uncompressed name's ids
        path = _write_jsonl(d / f"part.{fmt}", texts)
        return (str(d / "*.jsonl.zst") if fmt == "jsonl.zst" else str(path)), [f"part.jsonl:{i}" for i in n]
    if fmt == "parquet":
        _write_parquet(d / "part.parquet", texts)
        return str(d / "*.parquet"), [f"part.parquet:{i}" for i in n]
    if fmt == "saved":
        return str(_save_dataset(d / "ds", texts)), [f"ds:{i}" for i in n]
    if fmt == "saved_dict":
        return str(_save_dataset(d / "dd", {"train": texts, "test": texts[:2]})), [f"dd/train:{i}" for i in n]
    _write_bin(d / "part.bin", _byte_ids(texts))
    return f"bin:{d}/*.bin", [f"part.bin:{i}" for i in n]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_the_documents_written_and_splits_by_their_ids(fmt, tmp_path):
    texts = _texts()
    source, ids = _write(fmt, tmp_path / "data", texts)
    docs = list(open_source(source, tokenizer="byte").documents())
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == ids
    ds = prepare_dataset(source, "byte", cache_dir=tmp_path / "cache", val_fraction=0.25)
    val_ids = ds.meta["val"]["doc_ids"]
    assert set(val_ids) == data.split_ids(ids, 0.25)  # the one split rule, on this format's ids
    by_id = dict(zip(ids, texts))
    # the cached split holds exactly those documents' text: validation by id, train the rest in order
    assert [bytes(x.astype(np.uint8)).decode() for x in _split_docs(ds.val)] == [by_id[i] for i in val_ids]
    assert [bytes(x.astype(np.uint8)).decode() for x in _split_docs(ds.train)] == \
        [t for i, t in zip(ids, texts) if i not in set(val_ids)]
    assert ds.meta["train"]["n_bytes"] + ds.meta["val"]["n_bytes"] == sum(len(t.encode()) for t in texts)
    assert prepare_dataset(source, "byte", cache_dir=tmp_path / "cache", val_fraction=0.25).from_cache


def test_compressing_a_jsonl_shard_keeps_its_ids_and_split(tmp_path):
    texts = _texts(40)
    vals = []
    for suffix in ("jsonl", "jsonl.gz", "jsonl.zst"):  # same name in three folders: comparable ids
        path = _write_jsonl(tmp_path / suffix / f"shard.{suffix}", texts)
        ds = prepare_dataset(str(path), cache_dir=tmp_path / "cache", val_fraction=0.2)
        vals.append((ds.meta["val"]["doc_ids"], np.asarray(ds.val).tobytes(), np.asarray(ds.train).tobytes()))
    assert vals[0][0] and vals[0] == vals[1] == vals[2]


def test_directories_and_globs_mix_the_formats(tmp_path):
    texts = _texts(12)
    d = tmp_path / "mix"
    _write_jsonl(d / "a.jsonl.gz", texts[:4])
    _write_parquet(d / "b.parquet", texts[4:8])
    (d / "c.txt").write_text(texts[8])
    (d / "ignored.bin").write_bytes(b"\0\0")  # a directory of text sources never reads token files as text
    docs = list(open_source(str(d)).documents())
    assert [x.id for x in docs] == ([f"a.jsonl:{i}" for i in range(1, 5)] + [f"b.parquet:{i}" for i in range(1, 5)]
                                    + ["c.txt"])
    assert [x.text for x in docs] == texts[:9]
    assert [x.source for x in docs] == ["a.jsonl.gz"] * 4 + ["b.parquet"] * 4 + ["c.txt"]
    assert [x.text for x in open_source(str(tmp_path / "**" / "*.parquet"), max_documents=2).documents()] == texts[4:6]


def test_parquet_column_is_text_field_and_empty_rows_are_skipped_but_counted(tmp_path):
    texts = _texts(5)
    path = _write_parquet(tmp_path / "p.parquet", [texts[0], "   ", texts[1], texts[2]], field="body")
    docs = list(open_source(str(path), text_field="body").documents())
    assert [(x.id, x.text) for x in docs] == [("p.parquet:1", texts[0]), ("p.parquet:3", texts[1]),
                                              ("p.parquet:4", texts[2])]


def test_bin_token_ids_round_trip_through_the_cache(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, 30 + 7 * i) for i in range(20)]
    for dtype, spec in ((np.uint16, "bin:"), (np.uint32, "bin:uint32:")):
        path = _write_bin(tmp_path / dtype.__name__ / "train.bin", docs, dtype)
        ds = prepare_dataset(spec + str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=0.3)
        assert not ds.from_cache and ds.meta["source_identity"]["dtype"] == dtype.__name__
        val = ds.meta["val"]["doc_ids"]
        by_id = {f"train.bin:{i + 1}": ids for i, ids in enumerate(docs)}
        assert set(val) == data.split_ids(by_id, 0.3)
        got_val, got_train = _split_docs(ds.val), _split_docs(ds.train)
        assert len(got_val) == len(val) and all(np.array_equal(g, by_id[i]) for g, i in zip(got_val, val))
        rest = [ids for i, ids in by_id.items() if i not in set(val)]
        assert len(got_train) == len(rest) and all(np.array_equal(g, w) for g, w in zip(got_train, rest))
        # the same caching rules as text: reused unchanged, rebuilt when the file changes
        assert prepare_dataset(spec + str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=0.3).from_cache
        _write_bin(path, docs[:-1], dtype)
        assert not prepare_dataset(spec + str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=0.3).from_cache


def test_bin_documents_are_eot_runs_counted_from_one(tmp_path):
    path = tmp_path / "x.bin"
    np.array([104, 105, EOT, EOT, 121, 111, EOT, 33], dtype=np.uint16).tofile(path)  # empty run 2; no final eot
    docs = list(open_source(f"bin:{path}", tokenizer="byte").documents())
    assert [(x.id, x.text, x.tokens.tolist()) for x in docs] == [
        ("x.bin:1", "hi", [104, 105]), ("x.bin:3", "yo", [121, 111]), ("x.bin:4", "!", [33])]
    preflight.check_data(DataConfig(source=f"bin:{path}"))  # what `harness train` checks first: it passes


class _BigVocab(ByteTokenizer):
    vocab_size = 70_000  # as a 100k-class BPE: ids do not fit in uint16

    @property
    def identity(self):
        return {"kind": "big-test", "version": 1}


def test_bin_dtype_follows_the_vocabulary_unless_stated(tmp_path):
    path = _write_bin(tmp_path / "t.bin", _byte_ids(_texts(3)), np.uint32)
    assert open_source(f"bin:{path}", tokenizer="byte").identity["dtype"] == "uint16"  # 4-byte ids: even size
    assert open_source(f"bin:{path}", tokenizer=_BigVocab()).identity["dtype"] == "uint32"
    assert open_source(f"bin:uint32:{path}", tokenizer="byte").identity["dtype"] == "uint32"
    assert [d.text for d in open_source(f"bin:{path}", tokenizer=_BigVocab()).documents()] == _texts(3)


def test_saved_dataset_dict_reads_train_or_the_named_split(tmp_path):
    texts = _texts(9)
    path = _save_dataset(tmp_path / "dd", {"validation": texts[6:], "train": texts[:6]})
    assert [d.text for d in open_source(str(path)).documents()] == texts[:6]
    named = list(open_source(f"{path}:validation").documents())
    assert [d.text for d in named] == texts[6:] and named[0].id == "dd/validation:1"
    only_val = _save_dataset(tmp_path / "v", {"validation": texts})
    with pytest.raises(DataError, match=r"saved dataset .*v has no split 'train' \(splits: validation\)"):
        open_source(str(only_val))


def test_hf_source_streams_a_local_directory_without_the_network(tmp_path, monkeypatch):
    pytest.importorskip("datasets")

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = _texts(16)
    for d in (_write_jsonl(tmp_path / "jl" / "train.jsonl", texts).parent,
              _write_parquet(tmp_path / "pq" / "train.parquet", texts).parent):
        corpus = open_source(f"hf:{d}", max_documents=100)
        assert [x.text for x in corpus.documents()] == texts
        assert corpus.identity["files"]  # a local directory's files are in the cache key, as for local sources
        ds = prepare_dataset(f"hf:{d}", cache_dir=tmp_path / "cache", max_documents=100, val_fraction=0.25)
        assert ds.meta["train"]["n_documents"] + ds.meta["val"]["n_documents"] == len(texts)
        assert [x.text for x in open_source(f"hf:{d}", max_documents=3).documents()] == texts[:3]


@pytest.mark.parametrize("fmt", ["parquet", "bin"])
def test_a_short_training_run_on_parquet_and_bin(fmt, tmp_path):
    texts = [t * 3 for t in _texts(16)]
    source, _ = _write(fmt, tmp_path / "data", texts)
    cfg = tiny_train_config(source, tmp_path / "cache", budget={"steps": 3}, eval_every=3, checkpoint_every=3)
    summary = train(cfg, tmp_path / "run")
    assert summary["complete"] and summary["steps"] == 3
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["val_loss"])


# ---------------------------------------------------------------------------------------------- errors

def _bad_sources(tmp: Path) -> dict[str, tuple[str, str]]:
    """case -> (source, what its one-line error must name)."""
    texts = _texts(4)
    (tmp / "garbage.parquet").write_bytes(b"not parquet at all")
    (tmp / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])
    (tmp / "bad.jsonl.zst").write_bytes(b"not zstd")
    _write_parquet(tmp / "body.parquet", texts, field="body")
    _write_parquet(tmp / "nulls.parquet", [texts[0], None, texts[1]])
    _write_bin(tmp / "range.bin", [np.array([104, 300, 105])])
    (tmp / "ragged.bin").write_bytes(b"\x01\x00\x02")
    _save_dataset(tmp / "dd", {"test": texts})
    _save_dataset(tmp / "nocol", {"train": texts})
    return {
        "no files": (str(tmp / "nothing" / "*.parquet"), "nothing/*.parquet"),
        "no bin files": (f"bin:{tmp}/nothing/*.bin", "nothing/*.bin"),
        "unreadable parquet": (str(tmp / "garbage.parquet"), "garbage.parquet"),
        "truncated gzip": (str(tmp / "trunc.jsonl.gz"), "trunc.jsonl.gz"),
        "corrupt zstd": (str(tmp / "bad.jsonl.zst"), "bad.jsonl.zst"),
        "missing column": (str(tmp / "body.parquet"), "body.parquet: no column 'text'"),
        "null row": (str(tmp / "nulls.parquet"), "nulls.parquet: row 2 is null"),
        "id out of range": (f"bin:{tmp / 'range.bin'}", "range.bin: token id 300 at position 1"),
        "wrong dtype": (f"bin:{tmp / 'ragged.bin'}", "ragged.bin: 3 bytes"),
        ".bin without bin:": (str(tmp / "range.bin"), "range.bin: a .bin file is pre-tokenized"),
        "missing split": (str(tmp / "dd"), "dd has no split 'train'"),
        "named split missing": (f"{tmp / 'dd'}:validation", "dd has no split 'validation'"),
        "saved column missing": (str(tmp / "nocol"), "nocol:train: no column 'body'"),
    }


def test_bad_sources_fail_with_one_line_naming_the_file(tmp_path):
    cases = _bad_sources(tmp_path)
    for case, (source, needle) in cases.items():
        field = "body" if case == "saved column missing" else "text"
        with pytest.raises(DataError) as e:
            prepare_dataset(source, "byte", cache_dir=tmp_path / "cache", text_field=field)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, (case, msg)
    assert not list((tmp_path / "cache").glob("tokens/*"))  # nothing half-built is left in the cache


def test_bin_ids_of_another_tokenizer_are_refused(tmp_path):
    from harness.data import shards
    path = _write_bin(tmp_path / "t.bin", _byte_ids(_texts(4)))
    corpus = open_source(f"bin:{path}", tokenizer="byte")
    with pytest.raises(DataError, match="holds byte token ids; it cannot be read with the .* tokenizer"):
        shards.load_or_build(corpus, _BigVocab(), 0.25, tmp_path / "cache")
    with pytest.raises(DataError, match=r"is pre-tokenized: name its tokenizer \(data\.tokenizer\)"):
        open_source(f"bin:{path}")


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    sources = {"zstandard": str(_write_jsonl(tmp_path / "a.jsonl.zst", ["x", "y"])),
               "pyarrow.parquet": str(_write_parquet(tmp_path / "a.parquet", ["x", "y"])),
               "datasets": str(_save_dataset(tmp_path / "saved", ["x", "y"]))}
    sources["hf"] = f"hf:{_write_jsonl(tmp_path / 'local' / 'a.jsonl', ['x', 'y']).parent}"
    for module, source in sources.items():
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "datasets" if module == "hf" else module, None)  # as if not installed
            with pytest.raises(DataError, match=r"needs `(zstandard|pyarrow|datasets)` \(the `corpora` extra\): "
                                                r"run `python -m pip install 'tokenformer-bench\[corpora\]'`"):
                list(open_source(source, max_documents=5).documents())


def test_cli_exits_2_with_one_line_for_a_bad_shard(tmp_path):
    _write_bin(tmp_path / "range.bin", [np.array([104, 300, 105])] * 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--model", "transformer_pp", "--preset", "tiny",
                           "--steps", "2", "--seq-len", "32", "--batch-size", "4",
                           "--set", f"data.source=bin:{tmp_path / 'range.bin'}",
                           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "device=cpu",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "range.bin: token id 300" in lines[0], proc.stderr
