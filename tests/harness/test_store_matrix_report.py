import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import store
from harness.config import ConfigError
from harness.matrix import expand, load_matrix, shipped_matrices
from harness.report import write_report

MATRIX = {
    "name": "m",
    "defaults": {"seq_len": 32, "batch_size": 4, "budget": {"steps": 3}},
    "models": [{"model": "tokenformer", "preset": "tiny"}, {"model": "gpt2", "preset": "tiny", "optim": {"lr": 1e-3}}],
    "budgets": [{"steps": 3}, {"flops": 1e9}],
    "seeds": [0, 1],
}


def test_expand_is_models_x_budgets_x_seeds():
    m = expand(MATRIX)
    assert len(m.cells) == 2 * 2 * 2 and len({c.cell_id for c in m.cells}) == 8
    gpt2 = [c for c in m.cells if c.config.model == "gpt2"]
    assert all(c.config.optim.lr == 1e-3 for c in gpt2)
    assert {c.config.seed for c in m.cells} == {0, 1}
    assert {c.config.budget.flops for c in m.cells} == {None, 1e9}


def test_config_hash_ignores_how_but_not_what():
    a, b = expand(MATRIX).cells[0], expand({**MATRIX, "defaults": {**MATRIX["defaults"], "progress": False}}).cells[0]
    assert a.config_hash == b.config_hash
    c = expand({**MATRIX, "defaults": {**MATRIX["defaults"], "seq_len": 16}}).cells[0]
    assert a.config_hash != c.config_hash


def test_shipped_default_matrix_has_the_four_architectures():
    assert "default" in shipped_matrices()
    m = load_matrix()
    assert {c.config.model for c in m.cells} == {"tokenformer", "transformer_pp", "mamba", "gpt2"}
    assert len({c.config.budget.flops for c in m.cells}) == 1  # one equal FLOP budget


@pytest.mark.parametrize("change,match", [
    ({"colour": 1}, "unknown key colour"),
    ({"models": [{"model": "tokenformerr", "preset": "tiny"}]}, r"models\[0\].*tokenformerr"),
    ({"models": [{"model": "gpt2", "preset": "9b"}]}, r"models\[0\].*9b"),
    ({"models": [{"model": "gpt2", "preset": "tiny", "optim": {"lrr": 1}}]}, r"optim\.lrr"),
    ({"budgets": [{"flops": 0}]}, r"budget\.flops"),
    ({"seeds": ["a"]}, "seeds"),
    ({"models": [{"model": "gpt2", "preset": "tiny", "model_overrides": {"ffn": "moe"}}]}, "ffn"),
])
def test_bad_matrix_names_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        expand({**MATRIX, **change})


def _cli(*args, cwd):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("content,match", [
    ("name: m\nmodels: [{model: gpt2, preset: tiny}]\nbudgets: [{steps: 0}]\n", "budget.steps"),
    ("name: m\nmodels: [{model: gpt2, preset: tiny}\n", "malformed YAML"),
    ("name: m\nmodels: [{model: gpt3, preset: tiny}]\n", "gpt3"),
])
def test_bad_matrix_file_one_line_nonzero_exit_store_unchanged(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    out = tmp_path / "store"
    proc = _cli("run", str(path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert not out.exists()


def test_missing_matrix_file(tmp_path):
    proc = _cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_record_write_is_atomic(tmp_path, monkeypatch):
    d = tmp_path / "cell"
    store.write_record(d, {"status": "complete", "val_loss": 1.0})

    def boom(fd):  # the new record is written to the temporary file, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        store.write_record(d, {"status": "failed"})
    monkeypatch.undo()
    assert store.read_record(d) == {"status": "complete", "val_loss": 1.0}
    assert [p.name for p in d.iterdir()] == ["record.json"]  # no temp file left behind


def _fixture_store(root: Path):
    for i, (model, loss) in enumerate([("tokenformer", 2.0), ("transformer_pp", 1.9), ("mamba", 1.95)]):
        d = root / "fx" / f"{model}-tiny-seed0"
        store.write_record(d, {"matrix": "fx", "cell_id": d.name, "model": model, "preset": "tiny", "seed": 0,
                               "budget_label": "flops=1e+12", "params": 1000 + i, "non_embedding_params": 500,
                               "tokens": 1e6, "flops": 1e12, "steps": 10, "wall_time_s": 5.0, "tokens_per_s": 2e5,
                               "final_train_loss": loss + 0.1, "val_loss": loss, "val_bpb": loss / 0.693,
                               "val_ppl": 7.0, "status": "complete", "device": "cpu", "precision": "float32"})
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "flops": s * 1e11, "val_loss": loss + 1 / s}) + "\n"
                                                 for s in range(1, 11)))


def test_report_from_fixture_store(tmp_path):
    _fixture_store(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text()
    section = text.split("### fx — budget flops=1e+12")[1]
    rows = [l for l in section.splitlines() if l.startswith("| ") and "tiny" in l]
    # matrix entry order, then label, then seed
    assert [r.split("|")[1].strip() for r in rows] == ["mamba/tiny", "tokenformer/tiny", "transformer_pp/tiny"]
    png = tmp_path / "val_loss_vs_flops.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rec(root, label, seed, loss, model="transformer_pp", **extra):
    d = root / "mx" / f"{label.replace(' ', '_')}-seed{seed}"
    store.write_record(d, {"matrix": "mx", "cell_id": d.name, "model": model, "preset": "tiny", "label": label,
                           "seed": seed, "phase": "main", "matching": "iso_flop", "budget_index": 0,
                           "budget_label": "flops=1e+12", "params": 1, "non_embedding_params": 1, "tokens": 1e6,
                           "flops": 1e12, "steps": 1, "wall_time_s": 1, "tokens_per_s": 1, "lr": 3e-3,
                           "final_train_loss": loss, "val_loss": loss, "val_bpb": loss / math.log(2), "val_ppl": 1,
                           "val_tokens": 1000, "val_full": True, "status": "complete", **extra})
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "flops": s * 1e11, "val_loss": loss + 1 / s}) + "\n"
                                             for s in range(1, 4)))


def test_entries_of_one_model_stay_apart_in_tables_and_plots(tmp_path):
    """Two ablation rungs of transformer_pp/tiny: two labelled rows in 'Every cell', two lines in the plot."""
    from harness.results import load
    from harness.results.plots import loss_vs_flops
    for seed in (0, 1):
        _rec(tmp_path, "1 transformer_pp", seed, 2.0 + seed / 100, entry_index=0, waterfall=True)
        _rec(tmp_path, "2 +pattention FFN", seed, 1.9 + seed / 100, entry_index=1, waterfall=True,
             compare_to="1 transformer_pp")
    text = write_report(tmp_path).read_text()
    every = text.split("## Every cell")[1]
    labels = [l.split("|")[1].strip() for l in every.splitlines() if l.startswith("| ") and "tiny" in l]
    assert labels == ["1 transformer_pp", "1 transformer_pp", "2 +pattention FFN", "2 +pattention FFN"]
    assert loss_vs_flops(load(tmp_path), tmp_path / "p.png") == ["1 transformer_pp", "2 +pattention FFN"]


def test_holm_correction_turns_a_lone_significant_verdict_into_not_distinguishable(tmp_path):
    """Five candidates against one reference, paired by seed. Candidate 'c0' differs by 0.08, 0.10, 0.12 on
    seeds 0-2: mean 0.1, sd 0.02, t = 0.1 / (0.02 / sqrt 3) = 8.660; df 2, so p = 1 - t / sqrt(t^2 + 2)
    = 1 - 8.660254 / 8.774964 = 0.013073 - 'worse' uncorrected. The four others have noisy differences
    (p > 0.3), so c0 holds the smallest p and Holm multiplies it by m = 5: 0.065365 >= 0.05."""
    ref = [2.0, 2.1, 2.2]
    for s, x in enumerate(ref):
        _rec(tmp_path, "tokenformer/tiny", s, x, model="tokenformer", entry_index=0)
        _rec(tmp_path, "c0", s, x + (0.08, 0.10, 0.12)[s], entry_index=1)
        for k in range(1, 5):
            _rec(tmp_path, f"c{k}", s, x + (0.05, -0.05, 0.01 * k)[s], entry_index=1 + k)
    text = write_report(tmp_path).read_text()
    row = next(l for l in text.splitlines() if l.startswith("| c0 "))
    assert "0.0131" in row and "0.0654" in row and "not distinguishable" in row
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    c0 = next(v for v in verdicts if v["label"] == "c0")
    assert c0["p"] == pytest.approx(1 - 8.660254037844386 / math.sqrt(77)) and c0["p_holm"] == pytest.approx(5 * c0["p"])
    assert c0["verdict"] == "not distinguishable" and c0["test"] == "paired t"
    assert sum(v["p_holm"] >= v["p"] for v in verdicts) == 5


def test_changed_verdicts_are_listed_from_an_earlier_snapshot(tmp_path):
    for s, x in enumerate([2.0, 2.1, 2.2]):
        _rec(tmp_path, "tokenformer/tiny", s, x, model="tokenformer", entry_index=0)
        _rec(tmp_path, "transformer_pp/tiny", s, x + (0.05, -0.05, 0.0)[s], entry_index=1)
    store.write_json_atomic(tmp_path / "mx" / "earlier_verdicts.json", {"description": "Revision abc", "verdicts": [
        {"section": "matched compute", "label": "transformer_pp/tiny", "vs": "tokenformer/tiny",
         "budget": "flops=3e+12", "budget_index": 0, "verdict": "worse", "p": 0.02, "method": "Welch, uncorrected"}]})
    text = write_report(tmp_path).read_text()
    section = text.split("## Earlier verdicts that changed")[1]
    assert "Revision abc. 1 of 1 earlier verdicts changed" in section
    row = next(l for l in section.splitlines() if l.startswith("| transformer_pp/tiny vs tokenformer/tiny"))
    assert "flops=3e+12" in row and "flops=1e+12" in row and "worse (p=0.02" in row and row.rstrip("| ").endswith("yes")


def test_report_on_empty_store_is_an_error(tmp_path):
    proc = _cli("report", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no result records" in proc.stderr


SWEEP = {"center": 2e-3, "points": 5, "bounds": [1e-4, 1e-1], "seeds": [7]}


def test_lr_sweep_runs_at_every_budget_on_its_own_seeds_and_skips_entries_with_their_own_lr():
    m = expand({**MATRIX, "lr_sweep": SWEEP})
    sweep = m.sweep_cells
    assert {c.label for c in sweep} == {"tokenformer/tiny"}  # gpt2 sets optim.lr itself: not swept
    # geometric, ratio 2 by default, centred: 5e-4, 1e-3, 2e-3, 4e-3, 8e-3 - at each of the two budgets
    for bi in (0, 1):
        lrs = sorted(c.config.optim.lr for c in sweep if c.budget_index == bi)
        assert lrs == pytest.approx([5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    assert {c.config.seed for c in sweep} == {7} and {c.config.seed for c in m.main_cells} == {0, 1}
    assert all(c.lr_from_sweep == (c.label == "tokenformer/tiny") for c in m.main_cells)
    assert len(m.main_cells) == 8 and len(sweep) == 10


def test_lr_sweep_power_law_mode_sweeps_only_the_named_budgets():
    raw = {**MATRIX, "budgets": [{"flops": 1e9}, {"flops": 3e9}, {"flops": 9e9}],
           "lr_sweep": {**SWEEP, "budgets": [0, 1]}}
    m = expand(raw)
    assert {c.budget_index for c in m.sweep_cells} == {0, 1}
    with pytest.raises(ConfigError, match=r"lr_sweep.budgets: a power-law fit over budgets needs every budget in flops"):
        expand({**raw, "budgets": [{"steps": 3}, {"flops": 3e9}, {"flops": 9e9}]})


@pytest.mark.parametrize("change,match", [
    ({"matching": "iso_flop"}, "needs budgets in flops"),
    ({"matching": "iso_vibes"}, "matching"),
    ({"lr_sweep": {"values": [1e-3], "bounds": [1e-4, 1e-1]}}, r"lr_sweep.values: a grid needs at least 5 points"),
    ({"lr_sweep": {"center": 1e-3, "points": 1, "bounds": [1e-4, 1e-1]}}, r"lr_sweep.points: a grid needs at least 5"),
    ({"lr_sweep": {"center": 1e-3}}, r"lr_sweep.bounds: required"),
    ({"lr_sweep": {"values": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3], "bounds": [1e-4, 1e-1]}}, "not a geometric grid"),
    ({"lr_sweep": {**SWEEP, "seeds": [1]}}, r"lr_sweep.seeds: seed 1 is also an evaluation seed"),
    ({"lr_sweep": {**SWEEP, "budgets": [0]}}, r"lr_sweep.budgets"),
    ({"lr_sweep": {**SWEEP, "bounds": [1e-3, 1e-2]}}, r"lr_sweep.bounds: the grid .* is not inside"),
    ({"lr_sweep": {**SWEEP, "ratio": 1}}, r"lr_sweep.ratio: must be > 1"),
    ({"lr_sweep": {**SWEEP, "budget": 0}}, r"lr_sweep.budget: unknown key"),
])
def test_bad_matching_and_sweep(change, match):
    with pytest.raises(ConfigError, match=match):
        expand({**MATRIX, **change})


def test_bad_sweep_in_a_matrix_file_is_one_line_and_exit_2(tmp_path):
    import yaml
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MATRIX, "lr_sweep": {"center": 1e-3, "points": 5}}))
    proc = _cli("run", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "lr_sweep.bounds" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_iso_params_checks_non_embedding_counts():
    ok = {**MATRIX, "matching": "iso_params", "models": [{"model": "tokenformer", "preset": "150m"},
                                                         {"model": "transformer_pp", "preset": "tf150m"}]}
    assert len(expand(ok).cells) == 8
    bad = {**ok, "models": [{"model": "tokenformer", "preset": "150m"}, {"model": "gpt2", "preset": "350m"}]}
    with pytest.raises(ConfigError, match="iso_params"):
        expand(bad)


def test_matched_compute_table_verdicts(tmp_path):
    def rec(label, model, seed, loss):
        d = tmp_path / "mc" / f"{label}-{seed}"
        store.write_record(d, {"matrix": "mc", "cell_id": d.name, "model": model, "preset": "tiny", "label": label,
                               "seed": seed, "phase": "main", "matching": "iso_flop", "budget_index": 0,
                               "budget_label": "flops=1e+12", "params": 1, "non_embedding_params": 1, "tokens": 1e6,
                               "flops": 1e12, "steps": 1, "wall_time_s": 1, "tokens_per_s": 1, "lr": 3e-3,
                               "final_train_loss": loss, "val_loss": loss, "val_bpb": loss / 0.69, "val_ppl": 1,
                               "status": "complete"})
    for s, (a, b, c) in enumerate([(2.00, 1.90, 2.01), (2.01, 1.91, 1.99), (2.02, 1.92, 2.02)]):
        rec("tokenformer/tiny", "tokenformer", s, a)
        rec("transformer_pp/tiny", "transformer_pp", s, b)
        rec("gpt2/tiny", "gpt2", s, c)
    text = write_report(tmp_path).read_text()
    section = text.split("## Matched-compute comparison")[1].split("## Every cell")[0]
    rows = {l.split("|")[1].strip(): l for l in section.splitlines() if l.startswith("| ") and "/tiny" in l}
    assert "(reference)" in rows["tokenformer/tiny"]
    assert "better" in rows["transformer_pp/tiny"]
    assert "not distinguishable" in rows["gpt2/tiny"]
    assert "2.0100 ± " in rows["tokenformer/tiny"]


@pytest.mark.parametrize("name", sorted(shipped_matrices()))
def test_every_shipped_matrix_expands(name):
    m = load_matrix(name)
    assert m.cells and len({c.cell_id for c in m.cells}) == len(m.cells)


def test_validation_by_source_table(tmp_path):
    """Per-source loss over two seeds, by hand: 1.0 and 2.0 have mean 1.5, sd 0.7071, sem 0.5; the 97.5% t
    quantile for 1 df is 12.7062, so the interval is ± 6.3531."""
    for seed, (kjv, play) in enumerate([(1.0, 3.0), (2.0, 3.0)]):
        _rec(tmp_path, "tokenformer/tiny", seed, 2.0, model="tokenformer",
             val_sources={"kjv": {"loss": kjv, "bpb": kjv / math.log(2), "tokens": 170},
                          "shakespeare": {"loss": play, "bpb": play / math.log(2), "tokens": 121}})
    text = write_report(tmp_path).read_text()
    section = text.split("## Validation by source")[1].split("\n## ")[0]
    row = next(l for l in section.splitlines() if l.startswith("| tokenformer/tiny"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in next(l for l in section.splitlines() if l.startswith("| entry")).strip("|").split("|")]
    got = dict(zip(header, cells))
    assert got["kjv loss"] == "1.5000 ± 6.3531" and got["shakespeare loss"] == "3.0000 ± 0.0000"
    assert got["kjv tokens"] == "170" and got["shakespeare tokens"] == "121"
    assert got["kjv bits/byte"].startswith(f"{1.5 / math.log(2):.3f} ± ")


def test_a_fresh_clone_trains_into_an_ignored_directory_that_holds_no_committed_results():
    """`harness run` on a fresh clone must train, not report the committed reference results as 'complete,
    skipped': its default output is git-ignored and tracks nothing (the committed results use --out)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    record = store.DEFAULT_ROOT / "default" / "tokenformer-tiny-seed0" / "record.json"
    assert subprocess.run(["git", "check-ignore", "-q", str(record)], cwd=repo).returncode == 0
    tracked = subprocess.run(["git", "ls-files", str(store.DEFAULT_ROOT)], cwd=repo, capture_output=True, text=True)
    assert tracked.returncode == 0 and tracked.stdout == ""
