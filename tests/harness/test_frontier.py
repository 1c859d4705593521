"""IsoFLOP frontier matrices: deterministic expansion round the prior, edge extension, the LR surface, bad
input. Training is replaced by a known synthetic loss L(N, lr) (a parabola in log N whose minimum we set, and
a parabola in log lr round lr*(N)), so the planner's decisions can be checked against hand computation."""
import copy
import json
import math

import pytest

from harness import frontier, matrix as matrix_mod
from harness.config import ConfigError
from models import ladder

RAW = {
    "name": "fr",
    "matching": "iso_flop",
    "defaults": {"data": {"source": "embedded", "tokenizer": "byte"}, "seq_len": 256, "batch_size": 8,
                 "progress": False},
    "models": [{"model": "tokenformer"}, {"model": "transformer_pp"}],
    "frontier": {"ladder": "cpu", "budgets": [{"flops": 1e11}, {"flops": 1e12}, {"flops": 1e13}],
                 "sizes_per_budget": 3, "reference": "transformer_pp"},
    "seeds": [0, 1],
    "lr_sweep": {"center": 4e-3, "points": 5, "bounds": [1e-4, 1e-1], "budgets": [0, 1]},
}


def expand(raw=RAW):
    return matrix_mod.expand(copy.deepcopy(raw), "fr.yaml")


def test_expansion_is_deterministic_and_centred_on_20_tokens_per_param():
    a, b = expand(), expand()
    assert [c.cell_id for c in a.cells] == [c.cell_id for c in b.cells]
    rungs = ladder.ladder("tokenformer", "cpu")
    for bi, c in enumerate((1e11, 1e12, 1e13)):
        tpp = {r.name: c / r.flops_per_token / r.params for r in rungs}
        # by hand: the rung whose tokens/param is nearest 20 (in log) is in the window of 3
        nearest = min(tpp, key=lambda n: abs(math.log(tpp[n] / 20)))
        names = sorted({x.rung["rung"] for x in a.main_cells if x.arch == "tokenformer" and x.budget_index == bi},
                       key=lambda n: int(n[1:]))
        assert len(names) == 3 and nearest in names
        assert names == [r.name for r in rungs if r.name in names]  # contiguous rungs
    # sweep cells only at the swept budgets, 5 rates x 1 seed per rung; main cells: every seed
    assert {x.budget_index for x in a.sweep_cells} == {0, 1}
    assert len(a.main_cells) == 2 * 3 * 3 * 2
    cell = a.main_cells[0]
    assert cell.config.model_overrides["d_model"] == int(cell.rung["rung"][1:])
    assert cell.label == f"{cell.arch}@{cell.rung['rung']}"


@pytest.mark.parametrize("trained,losses,expect", [
    (["d32", "d48", "d64"], {"d32": 3.0, "d48": 2.9, "d64": 2.95}, (None, "interior")),
    (["d32", "d48", "d64"], {"d32": 3.0, "d48": 2.9, "d64": 2.8}, ("d96", "extend_up")),
    (["d32", "d48", "d64"], {"d32": 2.7, "d48": 2.9, "d64": 2.95}, ("d16", "extend_down")),
    (["d8", "d16", "d32"], {"d8": 2.7, "d16": 2.9, "d32": 2.95}, (None, "ladder_end")),
    # a failed rung (infinite mean) counts as tried: the extension goes beyond it, never back to it
    (["d32", "d48", "d64"], {"d32": 3.0, "d48": 2.9, "d64": math.inf}, ("d96", "extend_up")),
    (["d32", "d48", "d64"], {"d48": 2.9, "d64": 3.0}, ("d16", "extend_down")),
])
def test_next_rung_extends_past_an_edge_minimum(trained, losses, expect):
    rungs = ladder.ladder("transformer_pp", "cpu")
    nxt, status = frontier.next_rung(rungs, trained, losses)
    assert ((nxt.name if nxt else None), status) == expect


def test_epoch_limit_stops_an_extension():
    rungs = ladder.ladder("transformer_pp", "cpu")
    nxt, status = frontier.next_rung(rungs, ["d32", "d48", "d64"], {"d32": 2.7, "d48": 2.9, "d64": 3.0},
                                     ok=lambda r: r.name != "d16")
    assert (nxt, status) == (None, "epoch_limit")


@pytest.mark.parametrize("change,match", [
    ({"budgets": [{"flops": 1e11}]}, "budgets: a frontier matrix takes its budgets"),
    ({"frontier": {"budgets": [{"flops": 1e12}, {"flops": 1e11}]}}, "frontier.budgets: must be strictly increasing"),
    ({"frontier": {"budgets": [{"flops": 1e11}, {"steps": 10}]}}, r"frontier.budgets\[1\]"),
    ({"frontier": {"budgets": [{"flops": 1e11}, {"flops": 1e12}], "sizes_per_budget": 2}}, "sizes_per_budget"),
    ({"frontier": {"budgets": [{"flops": 1e11}, {"flops": 1e12}], "ladder": "tpu"}}, "frontier.ladder"),
    ({"frontier": {"budgets": [{"flops": 1e11}, {"flops": 1e12}], "sizes": 3}}, "frontier.sizes: unknown key"),
    ({"frontier": {"budgets": [{"flops": 1e11}, {"flops": 1e12}], "reference": "gpt9"}}, "frontier.reference"),
    ({"models": [{"model": "tokenformer", "preset": "tiny"}, {"model": "transformer_pp"}]}, r"models\[0\].preset"),
    ({"models": [{"model": "tokenformer", "model_overrides": {"d_model": 8}}, {"model": "transformer_pp"}]},
     r"models\[0\].model_overrides.d_model"),
])
def test_bad_frontier_names_the_field(change, match):
    raw = copy.deepcopy(RAW)
    raw.update(change)
    with pytest.raises(ConfigError, match=match):
        matrix_mod.expand(raw, "fr.yaml")


# ---------------------------------------------------------------------------------------------- planning
BEST = {"tokenformer": "d96", "transformer_pp": "d64"}   # the synthetic optimum, far from the prior at 1e11


def fake_train(cfg, out_dir, resume=True, **_):
    """A known loss: a parabola in log N with its minimum at BEST[model] (at every budget), plus a parabola in
    log lr round lr*(N) = 0.01 (N / 1e5)^-0.5; no randomness, so the planner's choice is determined."""
    r = next(r for r in ladder.ladder(cfg.model, "cpu") if r.overrides == {k: cfg.model_overrides[k]
                                                                             for k in r.overrides})
    best = ladder.rung(cfg.model, BEST[cfg.model], "cpu")
    lr_star = 0.01 * (r.params / 1e5) ** -0.5
    loss = 2.0 + 0.1 * math.log(r.params / best.params) ** 2 + 0.05 * math.log(cfg.optim.lr / lr_star) ** 2
    return {"complete": True, "val_loss": loss, "val_bpb": loss / math.log(2), "tokens": 1.0, "steps": 1,
            "wall_time_s": 0.0, "flops": cfg.budget.flops}


def test_run_extends_each_budget_to_an_interior_minimum(tmp_path, monkeypatch):
    import harness.train.loop as loop
    monkeypatch.setattr(loop, "train", fake_train)
    m = expand()
    matrix_mod.run_matrix(m, tmp_path, log=lambda *a: None)
    plans = json.loads((tmp_path / "fr" / frontier.FRONTIER).read_text())["plans"]
    for arch, best in BEST.items():
        for bi in ("0", "1", "2"):
            plan = plans[arch][bi]
            assert plan["status"] == "interior", (arch, bi, plan)
            # the best rung is trained, with a neighbour either side
            names = plan["rungs"]
            assert best in names and names.index(best) not in (0, len(names) - 1)
    # budgets 0 and 1 swept: the chosen rate is the grid point nearest lr*(N); budget 2 takes the surface fit
    choice = json.loads((tmp_path / "fr" / matrix_mod.LR_CHOICE).read_text())
    trained = {(rec["label"], rec["budget_index"]): rec["lr"] for rec in
               (json.loads(p.read_text()) for p in (tmp_path / "fr").glob("*/record.json")) if rec["phase"] == "main"}
    assert {bi for _, bi in trained} == {0, 1, 2}
    for (label, bi), lr in trained.items():
        arch, rung = label.split("@")
        lr_star = 0.01 * (ladder.rung(arch, rung, "cpu").params / 1e5) ** -0.5
        pick = choice[label][str(bi)]
        assert pick["lr"] == lr  # the main cells trained at the chosen rate
        if bi < 2:
            assert pick["source"] == "sweep"
            assert abs(math.log(lr / lr_star)) <= math.log(2) / 2 + 1e-9, (label, bi)
        else:  # own power law over its swept budgets, or the architecture's (N, C) surface
            assert pick["source"] in ("power_law", "lr_surface")
            assert abs(math.log(lr / lr_star)) < math.log(2), (label, bi, pick["source"])
    # resuming plans the same cells and trains nothing new
    calls = []
    monkeypatch.setattr(loop, "train", lambda *a, **k: calls.append(a) or fake_train(*a, **k))
    matrix_mod.run_matrix(expand(), tmp_path, log=lambda *a: None)
    assert calls == []


def test_only_runs_one_entry_and_rejects_an_unknown_one(tmp_path, monkeypatch):
    import harness.train.loop as loop
    monkeypatch.setattr(loop, "train", fake_train)
    matrix_mod.run_matrix(expand(), tmp_path, log=lambda *a: None, only=["transformer_pp"])
    plans = json.loads((tmp_path / "fr" / frontier.FRONTIER).read_text())["plans"]
    assert set(plans) == {"transformer_pp"}
    with pytest.raises(ConfigError, match="--only gpt9"):
        matrix_mod.run_matrix(expand(), tmp_path, log=lambda *a: None, only=["gpt9"])


def noisy_train(cfg, out_dir, resume=True, **_):
    """fake_train plus seed noise (a fixed function of the seed) and the tokens the budget buys."""
    out = fake_train(cfg, out_dir, resume)
    out["val_loss"] += 0.01 * math.sin(7.0 * (cfg.seed + 1))
    r = next(r for r in ladder.ladder(cfg.model, "cpu") if r.overrides == {k: cfg.model_overrides[k]
                                                                             for k in r.overrides})
    out["tokens"] = cfg.budget.flops / r.flops_per_token
    return out


def test_report_has_the_frontier_the_headline_and_the_readme_block(tmp_path, monkeypatch):
    import subprocess
    import sys

    import harness.train.loop as loop
    from harness.results import frontier as report_frontier
    from harness.results.writer import write_report
    monkeypatch.setattr(loop, "train", noisy_train)
    matrix_mod.run_matrix(expand(), tmp_path, log=lambda *a: None)
    text = write_report(tmp_path / "fr").read_text()
    assert "## Compute-optimal frontier" in text and "Compute multiplier against transformer_pp" in text
    assert "## Matched-compute comparison" not in text  # rungs of one model are not a matched comparison
    assert (tmp_path / "fr" / report_frontier.FIT_PLOT).stat().st_size > 10_000
    assert (tmp_path / "fr" / report_frontier.PROFILES_PLOT).stat().st_size > 10_000
    headline = (tmp_path / "fr" / report_frontier.HEADLINE).read_text()
    assert headline.count("| tokenformer ") == 1 and "transformer_pp |" not in headline.split("\n", 3)[-1]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- frontier:fr -->\nold\n<!-- /frontier:fr -->\nrest\n")
    cmd = [sys.executable, "-m", "harness", "report", str(tmp_path / "fr"), "--readme", str(readme)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("rest\n") and "old" not in body
    assert headline.strip() in body
    # a README without the block: one line, exit 2, README untouched
    readme.write_text("no block\n")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "frontier:fr" in proc.stderr and readme.read_text() == "no block\n"


def test_a_failed_seed_is_final_and_nothing_trains_twice(tmp_path, monkeypatch):
    """A seed that fails (here: every d96 main run of seed 1) makes its rung's mean infinite; the planner
    extends past it instead of retrying it, no cell trains twice in one run, and a resume trains nothing."""
    import harness.train.loop as loop
    calls = []

    def flaky(cfg, out_dir, resume=True, **kw):
        calls.append(str(out_dir))
        if cfg.model_overrides.get("d_model") == 96 and cfg.seed == 1:
            raise FloatingPointError("loss became nan at step 3")
        return fake_train(cfg, out_dir, resume, **kw)

    monkeypatch.setattr(loop, "train", flaky)
    raw = copy.deepcopy(RAW)
    raw["models"] = [{"model": "tokenformer"}, {"model": "transformer_pp"}]
    matrix_mod.run_matrix(expand(raw), tmp_path, log=lambda *a: None, only=["tokenformer"])
    assert len(calls) == len(set(calls))
    plans = json.loads((tmp_path / "fr" / frontier.FRONTIER).read_text())["plans"]["tokenformer"]
    for plan in plans.values():
        assert len(plan["rungs"]) == len(set(plan["rungs"]))
        if "d96" in plan["rungs"]:  # the failed rung is never the minimum; its neighbours were tried instead
            assert plan["mean_loss"]["d96"] == math.inf and "d128" in plan["rungs"]
    n = len(calls)
    matrix_mod.run_matrix(expand(raw), tmp_path, log=lambda *a: None, only=["tokenformer"])
    assert len(calls) == n
    # --force retrains each cell once, not once per extension round
    calls.clear()
    matrix_mod.run_matrix(expand(raw), tmp_path, log=lambda *a: None, only=["tokenformer"], force=True)
    assert len(calls) == len(set(calls)) == n


def test_picks_of_an_architecture_taken_out_of_the_matrix_are_dropped(tmp_path):
    """lr_choice.json is merged across runners: picks of every architecture still in the matrix stay (even a
    rung another runner added by extension), those of one removed from it (here gpt9) go."""
    (tmp_path / "fr").mkdir()
    old = {"gpt9@d8": {"0": {"lr": 1e-3}}, "tokenformer@d8": {"0": {"lr": 2e-3}}}
    (tmp_path / "fr" / matrix_mod.LR_CHOICE).write_text(json.dumps(old))
    choice = matrix_mod.choose_lrs(expand(), tmp_path)
    assert "gpt9@d8" not in choice and choice["tokenformer@d8"] == {"0": {"lr": 2e-3}}
    assert json.loads((tmp_path / "fr" / matrix_mod.LR_CHOICE).read_text()) == choice
