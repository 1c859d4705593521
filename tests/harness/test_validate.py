"""Validation scores the whole split at the end of a run, overall and per source, and an intermediate
evaluation that subsamples spreads over the split. Checked against a plain loop over the documents' own text."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import data
from harness.train.validate import evaluate
from models import registry


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    return data.prepare_dataset(str(corpus), "byte", cache_dir=tmp_path_factory.mktemp("cache"), val_fraction=0.4)


def test_spread_subsample_covers_the_split_and_full_pass_covers_it_all(dataset):
    L = 16
    windows = (len(dataset.val) - 1) // L
    full = dataset.val_batches(L, 4)
    assert full.full and full.windows == windows and full.n_tokens == windows * L
    first = dataset.val_batches(L, 4, max_batches=2)
    spread = dataset.val_batches(L, 4, max_batches=2, spread=True)
    starts = np.concatenate([s for s, _, _ in spread.with_starts()])
    assert list(np.concatenate([s for s, _, _ in first.with_starts()])) == [k * L for k in range(8)]
    # 8 of `windows` windows, evenly spaced: floor(i * windows / 8)
    assert list(starts) == [(i * windows // 8) * L for i in range(8)]
    assert starts[-1] >= (windows * 7 // 8) * L  # reaches the last eighth of the split


def test_full_evaluation_matches_a_plain_loop_per_source(dataset, corpus):
    torch.manual_seed(0)
    cfg = registry.get_config("transformer_pp", "tiny", vocab_size=320, max_seq_len=16)
    model = registry.build_from_config(cfg, "transformer_pp").eval()
    L = 16
    out = evaluate(model, dataset, L, 8, 3, 1, torch.device("cpu"), None, full=True)

    # independent reference: the validation documents' own files, byte-tokenized by hand (bytes + one eot),
    # concatenated in corpus order; score every window, attribute each target to the file it falls in
    val_ids = dataset.meta["val"]["doc_ids"]
    assert len(val_ids) >= 2, "the fixture needs two validation sources"
    eot = dataset.tokenizer.eot_id
    tokens, owner = [], []
    for doc_id in val_ids:
        ids = list((corpus / doc_id).read_text().encode("utf-8")) + [eot]
        tokens += ids
        owner += [doc_id] * len(ids)
    assert tokens == dataset.val.tolist()
    windows = (len(tokens) - 1) // L
    nats = {d: [] for d in val_ids}
    with torch.no_grad():
        for k in range(windows):
            w = torch.tensor(tokens[k * L:k * L + L + 1])
            ce = F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none")
            for t in range(L):
                nats[owner[k * L + 1 + t]].append(ce[t].item())
    every = [x for d in val_ids for x in nats[d]]
    assert out["val_full"] and out["val_tokens"] == windows * L == len(every)
    assert out["val_loss"] == pytest.approx(sum(every) / len(every), rel=1e-6)
    for doc_id in val_ids:  # one .txt file = one source of a user corpus
        src = out["val_sources"][doc_id]
        assert src["tokens"] == len(nats[doc_id])
        assert src["loss"] == pytest.approx(sum(nats[doc_id]) / len(nats[doc_id]), rel=1e-6)
        n_bytes = len((corpus / doc_id).read_text().encode("utf-8"))
        # bits per byte at the source's bytes per token (its eot counts as a token, not a byte)
        assert src["bpb"] == pytest.approx(src["loss"] * (n_bytes + 1) / n_bytes / math.log(2), rel=1e-9)
    # an intermediate evaluation subsamples and says so
    part = evaluate(model, dataset, L, 8, 3, 1, torch.device("cpu"), None)
    assert not part["val_full"] and part["val_tokens"] == 8 * L
