"""The loop under torchrun on CPU (gloo): DDP and FSDP2 equal one process with the same global batch; a
2-rank checkpoint resumes in one process; a killed rank ends the job with one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, write_corpus(root / "corpus")


def harness_train(root, corpus, out, *extra, env_extra=None):
    args = [sys.executable, "-m", "harness", "train", "--model", "tokenformer", "--preset", "tiny", "--steps", "4",
            "--seq-len", "32", "--batch-size", "8", "--set", f"data.source={corpus}",
            "--set", f"data.cache_dir={root / 'cache'}", "--set", "data.val_fraction=0.2", "--set", "eval_every=2",
            "--set", "log_every=1", "--set", "checkpoint_every=2", "--set", "progress=false",
            "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, cwd=root, env=env, timeout=600)


def curve(out):
    return [(m["step"], m["loss"], m.get("val_loss")) for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]


def assert_same_curve(a, b, rel=1e-5):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert lb == pytest.approx(la, rel=rel)
        assert (va is None) == (vb is None) and (va is None or vb == pytest.approx(va, rel=rel))


@pytest.fixture(scope="module")
def single(setup):
    root, corpus = setup
    # one process accumulating two micro-batches of 4 = the same global batch of 8 that 2 ranks split
    proc = harness_train(root, corpus, root / "single", "--set", "micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    return curve(root / "single")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(setup, single, parallel):
    root, corpus = setup
    proc = harness_train(root, corpus, root / parallel, "--nproc", "2", "--set", f"parallel={parallel}")
    assert proc.returncode == 0, proc.stderr
    assert_same_curve(single, curve(root / parallel))
    summary = json.loads((root / parallel / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == parallel


def test_killed_rank_fails_cleanly_and_checkpoint_resumes_on_one_process(setup, single):
    root, corpus = setup
    out = root / "killed"
    proc = harness_train(root, corpus, out, "--nproc", "2", env_extra={"HARNESS_FAULT_KILL": "1:3"})
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("harness: error:")]
    assert len(err) == 1 and "failed on a rank" in err[0] and "step 2" in err[0], proc.stderr[-2000:]
    # the 2-rank checkpoint of step 2 resumes in one process and continues on the same curve
    proc = harness_train(root, corpus, out, "--set", "micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    assert_same_curve(single, curve(out))
