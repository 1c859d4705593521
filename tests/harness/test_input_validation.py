"""Input validation at the edge: every ranged setting is checked when the config is built, and `harness train`,
`run`, `grow`, `eval` and `bench` refuse what cannot work -- one line naming the field or the file, exit 2,
nothing written (no run directory, no record, no report, no token cache)."""
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from harness import preflight, store
from harness.cli import main
from harness.config import BudgetConfig, ConfigError, TrainConfig, from_dict
from harness.matrix import expand
from tests.fixtures import write_corpus

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ config fields
@pytest.mark.parametrize("settings, field", [
    ({"optim": {"grad_clip": -1}}, "optim.grad_clip"),
    ({"optim": {"grad_clip": 0}}, "optim.grad_clip"),
    ({"optim": {"eps": 0}}, "optim.eps"),
    ({"optim": {"eps": -1e-8}}, "optim.eps"),
    ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay"),
    ({"optim": {"betas": [1.0, 0.95]}}, "optim.betas[0]"),
    ({"optim": {"betas": [0.9, -0.1]}}, "optim.betas[1]"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"schedule": {"warmup_steps": -5}}, "schedule.warmup_steps"),
    ({"schedule": {"warmup_fraction": 1.0}}, "schedule.warmup_fraction"),
    ({"schedule": {"warmup_fraction": -0.1}}, "schedule.warmup_fraction"),
    ({"schedule": {"decay_fraction": 0}}, "schedule.decay_fraction"),
    ({"schedule": {"decay_fraction": 1.5}}, "schedule.decay_fraction"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ({"data": {"val_fraction": 1}}, "data.val_fraction"),
    ({"data": {"max_documents": 0}}, "data.max_documents"),
    ({"data": {"source": ""}}, "data.source"),
    ({"data": {"tokenizer": " "}}, "data.tokenizer"),
    ({"eval_bootstrap_iters": -1}, "eval_bootstrap_iters"),
    ({"eval_limit": 0}, "eval_limit"),
    ({"seed": -1}, "seed"),
    ({"seq_len": 0}, "seq_len"),
    ({"budget": {"flops": "inf"}}, "budget.flops"),
])
def test_bad_value_names_the_field(settings, field):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, settings).validate()
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_grad_clip_message_and_non_finite_budget():
    with pytest.raises(ConfigError, match=r"^optim\.grad_clip: must be > 0, got -1"):
        from_dict(TrainConfig, {"optim": {"grad_clip": -1}}).validate()
    for kind in ("tokens", "flops"):
        with pytest.raises(ConfigError, match=rf"^budget\.{kind}: must be finite"):
            TrainConfig(budget=BudgetConfig(**{kind: math.inf})).validate()


def test_edges_of_the_ranges_are_valid():
    from_dict(TrainConfig, {"optim": {"betas": [0.0, 0.999], "weight_decay": 0.0},
                            "schedule": {"warmup_steps": 0, "warmup_fraction": 0.0, "decay_fraction": 1.0},
                            "data": {"max_documents": 1}, "eval_bootstrap_iters": 0, "eval_limit": 1}).validate()
    TrainConfig().validate()


def test_a_matrix_cell_names_the_entry_and_the_field():
    raw = {"name": "m", "defaults": {"optim": {"grad_clip": -1}}, "models": [{"model": "gpt2", "preset": "tiny"}]}
    with pytest.raises(ConfigError, match=r"models\[0\]: optim\.grad_clip: must be > 0"):
        expand(raw)


# ------------------------------------------------------------------------------------------ model fit
def _cfg(**kw):
    base = {"model": "transformer_pp", "preset": "tiny", "seq_len": 32, "batch_size": 4, "device": "cpu"}
    return from_dict(TrainConfig, {**base, **kw}).validate()


@pytest.mark.parametrize("kw", [
    {"model": "gpt2", "seq_len": 256},                                         # learned positions grow
    {"model": "gpt2", "seq_len": 256, "model_overrides": {"max_seq_len": 64}},
    {"model": "gpt2", "seq_len": None, "model_overrides": {"max_seq_len": 512}},
    {"model": "mamba", "seq_len": 512},
    {"model": "tokenformer", "model_overrides": {"vocab_size": 1024}},
])
def test_model_config_mirrors_the_training_loop(kw):
    from harness.train.loop import build_model_config
    cfg = _cfg(**kw)
    assert preflight.build_model_config(cfg, 257) == build_model_config(cfg, 257)
    preflight.check_model_fit(cfg)  # what the loop trains passes


def test_seq_len_beyond_memory_is_refused_and_unknown_memory_skips(monkeypatch):
    with pytest.raises(ConfigError, match=r"^seq_len: transformer_pp/tiny at seq_len 1000000 x micro_batch_size 64 "
                                          r"needs an estimated .* GiB"):
        preflight.check_model_fit(_cfg(seq_len=1_000_000, batch_size=64))
    monkeypatch.setattr(preflight, "available_memory", lambda device, world_size=1: (2**30, "test"))
    with pytest.raises(ConfigError, match=r"^micro_batch_size: .*more than the 1\.0 GiB available \(test\)"):
        preflight.check_model_fit(_cfg(seq_len=128, batch_size=4096))
    preflight.check_model_fit(_cfg(seq_len=128, batch_size=4096, micro_batch_size=4))  # accumulation fits
    monkeypatch.setattr(preflight, "available_memory", lambda device, world_size=1: None)
    preflight.check_model_fit(_cfg(seq_len=1_000_000, batch_size=64))


def test_estimate_is_not_above_a_measured_step():
    # the estimate stays low: a tiny training step at 4 x 1024 tokens peaks at ~23 kB/token on CPU (fp32)
    from models import registry
    cfg = registry.get_config("transformer_pp", "tiny", vocab_size=320, max_seq_len=1024)
    parts = preflight.training_memory_bytes(cfg, 1024, 4)
    assert 0 < parts["total"] - parts["params"] < 4 * 1024 * 23_000


def test_learned_positions_of_an_init_checkpoint_and_a_short_vocabulary(tmp_path):
    import json
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "state.json").write_text(json.dumps({"model_config": {"max_seq_len": 128}}))
    with pytest.raises(ConfigError, match=r"^seq_len: 256 is beyond the 128 learned positions"):
        preflight.check_model_fit(_cfg(model="gpt2", seq_len=256, init_from=str(ck)))
    preflight.check_model_fit(_cfg(model="gpt2", seq_len=128, init_from=str(ck)))
    preflight.check_model_fit(_cfg(model="transformer_pp", seq_len=256, init_from=str(ck)))  # rotary: no table
    with pytest.raises(ConfigError, match=r"^model_overrides\.vocab_size: 100 is smaller than the byte"):
        preflight.check_model_fit(_cfg(model_overrides={"vocab_size": 100}))


# ------------------------------------------------------------------------------------------ data and device
def test_data_sources_are_checked_without_tokenizing(tmp_path):
    from harness.config import DataConfig
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "one.txt").write_text("a single document")
    (tmp_path / "empty_dir").mkdir()
    cases = [(str(tmp_path / "nope.txt"), "no such file"), (str(tmp_path / "*.nothing"), "matched no files"),
             (str(tmp_path / "blank.txt"), "holds no text"), (str(tmp_path / "one.txt"), "single document"),
             (str(tmp_path / "empty_dir"), "holds no .txt or .jsonl"), ("embedded:moon", "unknown embedded")]
    for source, needle in cases:
        with pytest.raises(ConfigError, match=r"^data\.source: .*" + needle):
            preflight.check_data(DataConfig(source=source))
    corpus = write_corpus(tmp_path / "corpus", docs=3)
    preflight.check_data(DataConfig(source=str(corpus), cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_tokenizers_and_devices():
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: unknown tokenizer 'gpt5'"):
        preflight.check_tokenizer("gpt5")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: tokenizer file not found"):
        preflight.check_tokenizer("/no/such/tokenizer.json")
    preflight.check_tokenizer("byte")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match=r"^device: "):
            preflight.check_device(bad)
    assert preflight.check_device("cpu").type == "cpu"
    if not CUDA:
        with pytest.raises(ConfigError, match=r"^device: 'cuda' asked for but CUDA is not available"):
            preflight.check_device("cuda")


def test_matrix_names_stay_inside_the_root_and_complete_cells_are_not_rechecked(tmp_path):
    raw = {"name": "m", "defaults": {"device": "cuda:99", "seq_len": 32, "batch_size": 4},
           "models": [{"model": "gpt2", "preset": "tiny"}]}
    for name in ("..", "."):
        # the matrix loader refuses such a name; the path check behind it refuses it too (a library caller
        # may build a Matrix by hand)
        with pytest.raises(ConfigError, match=r"name must be a plain identifier"):
            expand({**raw, "name": name})
        m = expand(raw)
        m.name = name
        with pytest.raises(ConfigError, match=r"name '\.+' would write outside the results root"):
            preflight.check_matrix_paths(m, tmp_path / "store")
    m = expand(raw)
    with pytest.raises(ConfigError, match=r"gpt2-tiny-.*: device: 'cuda:99'"):
        preflight.preflight_matrix(m, tmp_path / "store")
    cell = m.cells[0]
    store.write_record(store.cell_dir(tmp_path / "store", m.name, cell.cell_id),
                       {"status": "complete", "config_hash": cell.config_hash})
    preflight.preflight_matrix(m, tmp_path / "store")  # nothing left to train: nothing to check
    with pytest.raises(ConfigError, match="device"):
        preflight.preflight_matrix(m, tmp_path / "store", force=True)


# ------------------------------------------------------------------------------------------ the CLI
def _harness(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


CASES = [  # id, --set items, what the one line must name
    ("grad_clip", ["optim.grad_clip=-1"], "optim.grad_clip"),
    ("warmup", ["schedule.warmup_steps=-5"], "schedule.warmup_steps"),
    ("seq_len", ["seq_len=1000000", "batch_size=64"], "seq_len"),
    ("missing_data", ["data.source={tmp}/nope"], "nope"),
    ("empty_data", ["data.source={tmp}/empty.txt"], "empty.txt"),
    ("tokenizer", ["data.tokenizer=no_such_tokenizer"], "data.tokenizer"),
    ("cuda", ["device=cuda"], "device"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every bad `harness train` and `harness run` of CASES (and a matrix named '..'), run side by side."""
    tmp = tmp_path_factory.mktemp("edge")
    corpus = write_corpus(tmp / "corpus", docs=6)
    (tmp / "empty.txt").write_text("")
    common = {"seq_len": 32, "batch_size": 4, "budget": {"steps": 2}, "progress": False, "device": "cpu",
              "data": {"source": str(corpus), "cache_dir": str(tmp / "cache"), "val_fraction": 0.2}}
    (tmp / "m.yaml").write_text(yaml.safe_dump({"name": "m", "defaults": common,
                                                "models": [{"model": "transformer_pp", "preset": "tiny"}]}))
    (tmp / "up.yaml").write_text(yaml.safe_dump({"name": "..", "defaults": common,
                                                 "models": [{"model": "transformer_pp", "preset": "tiny"}]}))
    before = sorted(p.name for p in tmp.iterdir())
    jobs = {}
    for case, sets, _ in CASES:
        flags = [a for s in sets for a in ("--set", s.format(tmp=tmp))]
        jobs[("train", case)] = ["train", "--model", "transformer_pp", "--preset", "tiny", "--steps", "2",
                                 "--seq-len", "32", "--batch-size", "4", "--set", f"data.source={corpus}",
                                 "--set", f"data.cache_dir={tmp / 'cache'}", "--set", "progress=false",
                                 "--set", "device=cpu", *flags, "--out", str(tmp / f"train_{case}")]
        jobs[("run", case)] = ["run", str(tmp / "m.yaml"), *flags, "--out", str(tmp / f"run_{case}")]
    jobs[("run", "name")] = ["run", str(tmp / "up.yaml"), "--out", str(tmp / "run_name")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        procs = dict(zip(jobs, pool.map(lambda args: _harness(*args, cwd=tmp), jobs.values())))
    return tmp, procs, before


def _one_line_exit_2(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("case, needle", [(c, n) for c, _, n in CASES], ids=[c for c, _, _ in CASES])
def test_cli_refuses_with_one_line_and_writes_nothing(cli_runs, command, case, needle):
    if case == "cuda" and CUDA:
        pytest.skip("this machine has CUDA")
    tmp, procs, _ = cli_runs
    _one_line_exit_2(procs[(command, case)], needle)
    assert not (tmp / f"{command}_{case}").exists()
    assert not (tmp / "cache").exists()  # nothing was tokenized either


def test_cli_matrix_named_dotdot_writes_nothing(cli_runs):
    tmp, procs, before = cli_runs
    _one_line_exit_2(procs[("run", "name")], "got '..'")
    assert not (tmp / "run_name").exists()
    assert sorted(p.name for p in tmp.iterdir()) == before  # no cell, no report beside the root either


@pytest.fixture(scope="module")
def src_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grow")
    corpus = write_corpus(tmp / "corpus", docs=6)
    proc = _harness("train", "--model", "transformer_pp", "--preset", "tiny", "--steps", "2", "--seq-len", "32",
                    "--batch-size", "4", "--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp / 'cache'}",
                    "--set", "data.val_fraction=0.2", "--set", "progress=false", "--set", "data.max_documents=20",
                    "--out", str(tmp / "src"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, tmp / "src"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_grow_onto_its_own_source_deletes_nothing(src_run, capsys):
    tmp, src = src_run
    before = _snapshot(src)
    assert {"metrics.jsonl", "checkpoint/model.safetensors", "checkpoint/state.json"} <= set(before)
    proc = _harness("grow", str(src), "--out", str(src), "--force", "--method", "gstack", "--set", "n_layers=4",
                    cwd=tmp)
    _one_line_exit_2(proc, "source's run directory")
    assert _snapshot(src) == before
    for out in (src / "checkpoint", src.parent, src / "checkpoint" / "inner"):
        for given in (src, src / "checkpoint"):
            assert main(["grow", str(given), "--out", str(out), "--force", "--method", "gstack",
                         "--set", "n_layers=4"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "must not replace or overwrite its source" in err[0]
            assert _snapshot(src) == before
    assert not (src / "checkpoint" / "inner").exists()
    assert main(["grow", str(src), "--out", str(tmp / "grown"), "--method", "gstack", "--set", "n_layers=4"]) == 0
    assert _snapshot(src) == before and (tmp / "grown" / "state.json").is_file()


def test_eval_and_bench_refuse_with_one_line(src_run, capsys, tmp_path):
    _, src = src_run
    for argv, needle in [(["eval", str(tmp_path / "missing")], "no such checkpoint directory"),
                         (["eval", str(src), "--limit", "0"], "--limit"),
                         (["eval", str(src), "--bootstrap-iters", "-1"], "--bootstrap-iters"),
                         (["eval", str(src), "--batch-size", "0"], "--batch-size"),
                         (["eval", str(src), "--device", "tpu"], "--device"),
                         (["eval", str(src), "--output-path", str(src / "checkpoint" / "lm")], "--output-path"),
                         (["bench", "--model", "gpt2", "--preset", "tiny", "--seq-len", "1000000", "--batch-size",
                           "64", "--device", "cpu", "--out", str(tmp_path / "b")], "--seq-len 1000000 x --batch-size 64")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("harness: error: ") and needle in err[0], (argv, err)
    assert not (tmp_path / "b").exists()


GROWTH_BASE = {"label": "b", "model": "tokenformer", "budget": {"steps": 4}}
GROWN = {"label": "g", "model": "tokenformer", "budget": {"steps": 4}, "model_overrides": {"ffn_hidden": 512}}


@pytest.mark.parametrize("models, needle", [
    ([GROWTH_BASE, {**GROWN, "grow_from": {"from": "b", "method": "tokens", "schedule": "continue"}}],
     "models[1].grow_from.schedule: continue needs its base 'b' to set schedule.horizon_tokens"),
    ([{**GROWTH_BASE, "schedule": {"horizon_tokens": 2048}},
      {**GROWN, "schedule": {"horizon_tokens": 4096},
       "grow_from": {"from": "b", "method": "tokens", "schedule": "continue"}}],
     "models[1].schedule.horizon_tokens: 4096 differs from its base's 2048"),
    ([GROWTH_BASE, {**GROWN, "optim": {"lr": 1e-3},
                    "grow_from": {"from": "b", "method": "tokens", "schedule": "continue"}}],
     "models[1].grow_from.schedule: continue keeps its base's peak LR"),
    ([GROWTH_BASE, {**GROWN, "grow_from": {"from": "b", "method": "tokens", "noise": 0.1}}],
     "models[1].grow_from.noise: applies to method width only"),
    ([GROWTH_BASE, {**GROWN, "grow_from": {"from": "b", "method": "tokens", "lr": 1}}],
     "models[1].grow_from needs from and method"),
    ([GROWTH_BASE, {**GROWN, "lr_from": "nobody"}], "models[1].lr_from: 'nobody' is not the label of an earlier"),
    ([GROWTH_BASE, {**GROWN, "lr_from": "b", "optim": {"lr": 1e-3}}], "models[1].lr_from: give optim.lr or lr_from"),
    ([GROWTH_BASE, {**GROWN, "flops_of": "b"}], "models[1].flops_of: sets the budget"),
    ([GROWTH_BASE, {"label": "s", "model": "tokenformer", "flops_of": "b", "reference": "maybe"}],
     "models[1].reference: 'maybe' is not one of"),
])
def test_growth_entries_name_the_bad_field(models, needle):
    from harness.matrix import expand
    with pytest.raises(ConfigError) as e:
        expand({"name": "gv", "defaults": {"data": {"source": "embedded", "tokenizer": "byte"}, "seq_len": 32},
                "models": models}, "gv.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)
