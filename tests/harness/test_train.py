"""The training loop: it learns, resumes exactly, and rejects bad input with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.matrix import expand, run_matrix
from harness.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from harness.train.loop import train
from models import registry
from tests.fixtures import tiny_train_config



config = tiny_train_config


def _metrics(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("name", ["tokenformer", "mamba"])
def test_interrupted_and_resumed_run_is_bitwise_identical(corpus, tmp_path, name):
    cfg = config(corpus, tmp_path / "cache", model=name)
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "resumed", max_steps_this_run=5)  # 'killed' after step 5: last checkpoint at 3
    assert not part["complete"]
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["complete"] and resumed["resumed_from_step"] == 3
    a = (tmp_path / "full/checkpoint/model.safetensors").read_bytes()
    b = (tmp_path / "resumed/checkpoint/model.safetensors").read_bytes()
    assert a == b
    assert resumed["final_train_loss"] == full["final_train_loss"] and resumed["val_loss"] == full["val_loss"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(_metrics(tmp_path / "resumed/metrics.jsonl")) == strip(_metrics(tmp_path / "full/metrics.jsonl"))


def test_gradient_accumulation_matches_full_batch(corpus, tmp_path):
    a = train(config(corpus, tmp_path / "c", budget={"steps": 3}), tmp_path / "a")
    b = train(config(corpus, tmp_path / "c", budget={"steps": 3}, micro_batch_size=2), tmp_path / "b")
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-5)


def test_budgets_in_tokens_and_flops(corpus, tmp_path):
    s = train(config(corpus, tmp_path / "c", budget={"tokens": 1000}), tmp_path / "t")
    assert s["steps"] == 8 and s["tokens"] == 8 * 4 * 32  # ceil(1000 / 128)
    fpt = s["flops_per_token"]
    f = train(config(corpus, tmp_path / "c", budget={"flops": fpt * 128 * 5}), tmp_path / "f")
    assert f["steps"] == 5 and f["flops"] == pytest.approx(fpt * 128 * 5)


def test_training_lowers_validation_loss(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "c", model="transformer_pp", budget={"steps": 40}, eval_every=20,
                 optim={"lr": 1e-2})
    train(cfg, tmp_path / "r")
    vals = [m["val_loss"] for m in _metrics(tmp_path / "r/metrics.jsonl") if "val_loss" in m]
    assert len(vals) == 2 and vals[-1] < 0.7 * 5.77  # far below uniform over 320 ids (ln 320 = 5.77)


def test_checkpoint_round_trip_and_bad_checkpoint(tmp_path):
    model = registry.build("gpt2", "tiny")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, opt, {"step": 1})
    other = registry.build("gpt2", "tiny")
    opt2 = torch.optim.AdamW(other.parameters())
    assert load_checkpoint(tmp_path / "ck", other, opt2)["step"] == 1
    for (k, v), (k2, v2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(v, v2)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "ck/model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck", other)
    (tmp_path / "ck/state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(tmp_path / "ck", other)
    with pytest.raises(CheckpointError, match="does not fit"):
        save_checkpoint(tmp_path / "ck2", model, None, {"step": 0})
        load_checkpoint(tmp_path / "ck2", registry.build("tokenformer", "tiny"))


def test_matrix_skips_complete_and_resumes_partial(corpus, tmp_path, monkeypatch):
    from dataclasses import asdict
    raw = {"name": "t", "defaults": asdict(config(corpus, tmp_path / "c")), "models": [
        {"model": "tokenformer", "preset": "tiny"}, {"model": "gpt2", "preset": "tiny"}]}
    m = expand(raw)
    root = tmp_path / "store"
    # a partial cell: a run killed after 4 steps (checkpoint at 3)
    train(m.cells[1].config, root / "t" / m.cells[1].cell_id, max_steps_this_run=4)
    logs = []
    records = run_matrix(m, root, log=logs.append)
    assert [r["status"] for r in records] == ["complete", "complete"]
    assert records[0]["resumed_from_step"] is None and records[1]["resumed_from_step"] == 3
    assert records[0]["params"] == registry.build("tokenformer", "tiny", vocab_size=320).num_params()
    for key in ("git_revision", "versions", "config", "val_bpb", "val_ppl", "peak_memory_bytes", "environment"):
        assert key in records[0]
    import harness.train.loop as loop
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a complete cell was retrained"))
    logs.clear()
    run_matrix(m, root, log=logs.append)
    assert sum("complete, skipped" in l for l in logs) == 2


def _cli(*args, cwd):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_train_bad_inputs(tmp_path, corpus):
    missing = _cli("train", "--set", f"data.source={tmp_path / 'nope'}", "--steps", "2", "--out", str(tmp_path / "o1"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    zero = _cli("train", "--steps", "0", "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert zero.returncode == 2 and "budget.steps" in zero.stderr
    (tmp_path / "o3/checkpoint").mkdir(parents=True)
    (tmp_path / "o3/checkpoint/state.json").write_text("{")
    bad = _cli("train", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'c'}",
               "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "o3"), cwd=tmp_path)
    assert bad.returncode == 2 and "checkpoint" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_matrix_cell_runs_lm_eval_after_training_and_report_shows_it(corpus, tmp_path):
    pytest.importorskip("lm_eval")
    from dataclasses import asdict

    from harness.report import write_report
    defaults = asdict(config(corpus, tmp_path / "c", budget={"steps": 2}))
    m = expand({"name": "ev", "defaults": defaults, "models": [{"model": "gpt2", "preset": "tiny"}]})
    root = tmp_path / "store"
    first = run_matrix(m, root, log=lambda *_: None)[0]
    assert "lm_eval" not in first
    # adding eval tasks to a finished matrix evaluates without retraining (same cell, same config hash)
    defaults["eval_tasks"], defaults["eval_limit"] = ["heldout"], 2
    m2 = expand({"name": "ev", "defaults": defaults, "models": [{"model": "gpt2", "preset": "tiny"}]})
    assert m2.cells[0].config_hash == m.cells[0].config_hash
    rec = run_matrix(m2, root, log=lambda *_: None)[0]
    assert rec["finished_at"] == first["finished_at"]  # not retrained
    assert rec["lm_eval"]["tasks"] == ["heldout"] and "error" not in rec["lm_eval"], rec["lm_eval"]
    assert (root / "ev" / m.cells[0].cell_id / "lm_eval").is_dir()
    assert "## Zero-shot (lm-eval)" in write_report(root / "ev").read_text()


def test_lr_sweep_chooses_a_rate_per_budget_and_each_main_cell_uses_its_own(corpus, tmp_path):
    from dataclasses import asdict
    defaults = asdict(config(corpus, tmp_path / "c", budget={"steps": 6}))
    # grid 1e-5 .. 1e-1 (ratio 10) whose ends are the bounds: no extension, an end optimum is flagged
    m = expand({"name": "sw", "defaults": defaults, "models": [{"model": "transformer_pp", "preset": "tiny"}],
                "budgets": [{"steps": 6}, {"steps": 12}], "seeds": [0],
                "lr_sweep": {"center": 1e-3, "ratio": 10, "points": 5, "bounds": [1e-5, 1e-1], "seeds": [3]}})
    records = run_matrix(m, tmp_path / "store", log=lambda *_: None)
    choice = json.loads((tmp_path / "store/sw/lr_choice.json").read_text())["transformer_pp/tiny"]
    sweep = [r for r in records if r["phase"] == "sweep"]
    assert len(sweep) == 10 and {r["seed"] for r in sweep} == {3}
    for bi in (0, 1):
        curve = {float(lr): p["val_loss"] for lr, p in choice[str(bi)]["curve"].items()}
        assert len(curve) == 5 and choice[str(bi)]["lr"] == min(curve, key=curve.get)
        assert curve[1e-5] > min(curve.values())  # 1e-5 barely moves in 6-12 steps
    main = {r["budget_index"]: r for r in records if r["phase"] == "main"}
    assert {bi: r["lr"] for bi, r in main.items()} == {bi: choice[str(bi)]["lr"] for bi in (0, 1)}
    assert all(r["lr_from_sweep"] and r["seed"] == 0 for r in main.values())


def test_growth_chain_in_a_matrix(corpus, tmp_path):
    """base -> grown (preserving) with the data stream and cumulative FLOPs continuing, plus a scratch
    reference; the report's growth-cost table comes out of it."""
    from dataclasses import asdict

    from harness.report import write_report
    defaults = asdict(config(corpus, tmp_path / "c", budget={"steps": 4}))
    big = {"qkv_tokens": 96, "proj_tokens": 96, "ffn_hidden": 384}
    m = expand({"name": "gr", "defaults": defaults, "models": [
        {"label": "base", "model": "tokenformer", "preset": "tiny", "budget": {"steps": 4}},
        {"label": "grown", "model": "tokenformer", "preset": "tiny", "budget": {"steps": 3}, "model_overrides": big,
         "grow_from": {"from": "base", "method": "tokens", "init": "preserving"}},
        {"label": "scratch", "reference": True, "model": "tokenformer", "preset": "tiny", "budget": {"steps": 5},
         "model_overrides": big}]})
    records = {r["label"]: r for r in run_matrix(m, tmp_path / "store", log=lambda *_: None)}
    assert all(r["status"] == "complete" for r in records.values()), records
    base, grown = records["base"], records["grown"]
    event = grown["growth_event"]
    assert event["gap"]["rel_logit_change"] < 1e-6 and event["function_preserving"]
    # function-preserving growth: validation loss just after growth equals the base's final one
    assert grown["init_val_loss"] == pytest.approx(base["val_loss"], rel=1e-5)
    assert grown["data_offset"] == 4 and grown["flops_offset"] == pytest.approx(base["flops"])
    assert grown["cumulative_flops"] == pytest.approx(base["flops"] + grown["flops"])
    text = write_report(tmp_path / "store" / "gr").read_text()
    assert "## Growth cost (base run counted)" in text and "exact (zero keys, √n held); fresh AdamW, schedule restarted" in text
    # re-running skips everything, including the growth
    again = run_matrix(m, tmp_path / "store", log=lambda *_: None)
    assert [r["finished_at"] for r in again] == [r["finished_at"] for r in records.values()]


def test_growth_study_tunes_grown_arms_carries_one_schedule_and_matches_flops(corpus, tmp_path):
    """A growth study end to end: the base and a fresh grown arm are swept (the arm's sweep cells grow from the
    first seed's base), a one-schedule base takes the base's rate and its carried arm continues that schedule,
    and scratch gets exactly the chain's total FLOPs as the loop measured them."""
    from dataclasses import asdict
    defaults = asdict(config(corpus, tmp_path / "c", budget={"steps": 4}))
    defaults["schedule"] = {"kind": "cosine", "warmup_fraction": 0.25, "min_lr_ratio": 0.1}
    big = {"qkv_tokens": 96, "proj_tokens": 96, "ffn_hidden": 384}
    m = expand({"name": "gs", "defaults": defaults, "seeds": [0, 1],
                "lr_sweep": {"center": 4e-3, "points": 5, "bounds": [1e-4, 1.0], "seeds": [7]},
                "models": [
        {"label": "base", "model": "tokenformer", "budget": {"steps": 4}},
        {"label": "base1", "model": "tokenformer", "budget": {"steps": 4}, "lr_from": "base",
         "schedule": {"horizon_tokens": 8 * 4 * 32}},
        {"label": "fresh", "model": "tokenformer", "budget": {"steps": 4}, "model_overrides": big,
         "grow_from": {"from": "base", "method": "tokens", "init": "random"}},
        {"label": "carried", "model": "tokenformer", "budget": {"steps": 4}, "model_overrides": big,
         "grow_from": {"from": "base1", "method": "tokens", "init": "preserving", "optimizer": "carry",
                       "schedule": "continue"}},
        {"label": "scratch", "reference": "scratch", "model": "tokenformer", "flops_of": "fresh",
         "model_overrides": big, "optim": {"lr": 4e-3}}]})
    records = run_matrix(m, tmp_path / "store", log=lambda *_: None)
    assert all(r["status"] == "complete" for r in records), [r.get("error") for r in records]
    main = {(r["label"], r["seed"]): r for r in records if r["phase"] == "main"}
    sweeps = [r for r in records if r["phase"] == "sweep"]
    choice = json.loads((tmp_path / "store/gs/lr_choice.json").read_text())
    assert {r["label"] for r in sweeps} == {"base", "fresh"} and set(choice) == {"base", "fresh"}
    # every swept rate of the grown arm starts from the seed-0 base's final checkpoint
    assert {r["growth_event"]["source"] for r in sweeps if r["label"] == "fresh"} == \
        {str(tmp_path / "store/gs" / main[("base", 0)]["cell_id"] / "checkpoint")}
    for seed in (0, 1):
        assert main[("fresh", seed)]["lr"] == choice["fresh"]["0"]["lr"]
        assert main[("base", seed)]["lr"] == main[("base1", seed)]["lr"] == main[("carried", seed)]["lr"] \
            == choice["base"]["0"]["lr"]
        # one schedule: the carried arm runs steps 5..8 of the 8-step schedule its base started
        carried = main[("carried", seed)]
        assert carried["steps"] == 8 and carried["growth_event"]["step"] == 4
        assert carried["config"]["schedule"]["horizon_tokens"] == 8 * 4 * 32
        # scratch: the chain's total FLOPs, as the loop counted them, to within one of its own steps
        chain = main[("fresh", seed)]["cumulative_flops"]
        scratch = main[("scratch", seed)]
        assert scratch["budget"]["flops"] == pytest.approx(chain, rel=1e-12)
        assert 0 <= scratch["flops"] - chain < scratch["flops_per_token"] * 4 * 32
