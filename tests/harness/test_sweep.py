"""The self-extending learning-rate sweep: its choice rule, its power-law fit, and a run that extends itself,
hits its bound, shares identical cells and keeps sweep seeds out of the evaluation."""
import json
import math

import pytest

from harness import sweep
from harness.config import ConfigError
from harness.matrix import expand, run_matrix

SPEC = sweep.SweepSpec(grid=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], ratio=2.0, bounds=(1e-4, 3.2e-2), seeds=[9], budgets=None)


def test_choose_interior_edge_and_bound():
    # a U-shaped curve: the minimum at 4e-3 is interior, nothing to add
    u = {1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.2, 8e-3: 2.4, 1.6e-2: 2.9}
    assert sweep.choose(u, SPEC) == {"lr": 4e-3, "val_loss": 2.2, "next": None, "status": "interior"}
    # still falling at the top end: extend upwards by the grid ratio
    falling = {1e-3: 3.0, 2e-3: 2.8, 4e-3: 2.6, 8e-3: 2.5, 1.6e-2: 2.4}
    assert sweep.choose(falling, SPEC)["next"] == pytest.approx(3.2e-2)
    # one more point at the bound, still best: 6.4e-2 would cross the bound 3.2e-2, so the cell is flagged
    at = sweep.choose({**falling, 3.2e-2: 2.3}, SPEC)
    assert at["lr"] == 3.2e-2 and at["status"] == "at_bound" and at["next"] is None
    # best at the bottom: extend downwards
    rising = {1e-3: 2.0, 2e-3: 2.1, 4e-3: 2.2, 8e-3: 2.3, 1.6e-2: 2.4}
    assert sweep.choose(rising, SPEC)["next"] == pytest.approx(5e-4)


def test_diverged_points_are_infinitely_bad_not_skipped():
    curve = {1e-3: 3.0, 2e-3: 2.8, 4e-3: 2.6, 8e-3: 2.5, 1.6e-2: math.inf}
    pick = sweep.choose(curve, SPEC)
    assert pick["lr"] == 8e-3 and pick["status"] == "interior"  # the diverged top point bounds the optimum
    with pytest.raises(ValueError, match="diverged"):
        sweep.choose({1e-3: math.inf, 2e-3: math.inf}, SPEC)


def test_power_law_fit_recovers_a_known_law():
    # lr = 0.5 * C^-0.25 exactly at C = 1e8, 1e10 (hand values: 0.5e-2, 0.5 * 10^-2.5)
    points = [(1e8, 0.5 * 1e8 ** -0.25), (1e10, 0.5 * 1e10 ** -0.25), (1e12, 0.5 * 1e12 ** -0.25)]
    fit = sweep.fit_power_law(points)
    assert fit["a"] == pytest.approx(0.5) and fit["b"] == pytest.approx(-0.25)
    assert all(abs(p["residual_log10"]) < 1e-12 for p in fit["points"])
    assert points[0][1] == pytest.approx(5e-3)
    # a flat law
    fit2 = sweep.fit_power_law([(1.0, 1.0), (100.0, 1.0)])
    assert fit2["b"] == pytest.approx(0.0) and fit2["a"] == pytest.approx(1.0)
    lr, clipped = sweep.predict({"a": 1.0, "b": 1.0}, 10.0, (1e-4, 1.0))
    assert lr == 1.0 and clipped


def test_sweep_extends_until_its_bound_shares_twins_and_keeps_seeds_apart(corpus, tmp_path):
    """Rates far below the optimum: the loss falls at every larger rate, so the sweep grows upwards one point
    a round until the bound, and the cell is flagged; two entries of one config train once."""
    from dataclasses import asdict

    from tests.fixtures import tiny_train_config
    defaults = asdict(tiny_train_config(corpus, tmp_path / "c", budget={"steps": 3}, eval_every=3,
                                        checkpoint_every=10))
    raw = {"name": "sw", "defaults": defaults, "seeds": [0],
           "models": [{"model": "transformer_pp", "preset": "tiny", "label": "a"},
                      {"model": "transformer_pp", "preset": "tiny", "label": "b"}],
           "lr_sweep": {"center": 4e-6, "points": 5, "bounds": [1e-7, 3.2e-5], "seeds": [5]}}
    m = expand(raw)
    records = run_matrix(m, tmp_path / "store", log=lambda *_: None)
    choice = json.loads((tmp_path / "store/sw/lr_choice.json").read_text())
    for label in ("a", "b"):
        pick = choice[label]["0"]
        # grid 1e-6..1.6e-5, extended once to 3.2e-5 = the bound, where it stays best
        assert pick["lr"] == pytest.approx(3.2e-5) and pick["status"] == "at_bound"
        assert len(pick["curve"]) == 6
    sweep_recs = [r for r in records if r["phase"] == "sweep"]
    assert {r["seed"] for r in sweep_recs} == {5}
    main = {r["label"]: r for r in records if r["phase"] == "main"}
    assert main["a"]["seed"] == 0 and main["a"]["lr"] == pytest.approx(3.2e-5)
    # b is a's twin: shared, not trained again, same numbers under its own label
    assert main["b"]["shared_with"] == main["a"]["cell_id"] and main["b"]["label"] == "b"
    assert main["b"]["val_loss"] == main["a"]["val_loss"]
    assert not (tmp_path / "store/sw" / main["b"]["cell_id"] / "checkpoint").exists()
    assert sum("shared_with" not in r for r in sweep_recs) == 6  # 6 trained, their 6 twins shared
    # the report flags the cell at its bound
    from harness.report import write_report
    text = write_report(tmp_path / "store" / "sw").read_text()
    assert "Cells whose rate is still at a bound: a @ steps=3; b @ steps=3." in text
    assert "3.2e-05 (at bound)" in text


def test_power_law_mode_interpolates_the_unswept_budget_from_the_swept_optima(tmp_path):
    """Sweep records written by hand at budgets 1e9 and 1e11 with optima 8e-3 and 2e-3: the fitted law is
    lr = a·C^b with b = log(2e-3 / 8e-3) / log(100) = -log10(2) = -0.30103, so C^b = 2^(-log10 C) and
    a = 8e-3 · 2^9 = 4.096; at C = 1e10 it gives 4.096 · 2^-10 = 4e-3 (the geometric mean of the two optima),
    which the main cell gets."""
    from harness import store
    from harness.matrix import apply_lr_choice, choose_lrs
    from harness.report import write_report
    raw = {"name": "pl", "defaults": {"seq_len": 32, "batch_size": 4}, "seeds": [0],
           "models": [{"model": "transformer_pp", "preset": "tiny"}],
           "budgets": [{"flops": 1e9}, {"flops": 1e10}, {"flops": 1e11}],
           "lr_sweep": {"center": 4e-3, "points": 5, "bounds": [1e-4, 1e-1], "seeds": [9], "budgets": [0, 2]}}
    m = expand(raw)
    best = {0: 8e-3, 2: 2e-3}
    for cell in m.sweep_cells:
        lr, bi = cell.config.optim.lr, cell.budget_index
        loss = 2.0 + abs(math.log(lr / best[bi]))  # V-shaped in log lr, minimum at the budget's optimum
        store.write_record(store.cell_dir(tmp_path, "pl", cell.cell_id),
                           {**{"matrix": "pl", "cell_id": cell.cell_id, "label": cell.label, "phase": "sweep",
                               "model": "transformer_pp", "preset": "tiny", "seed": 9, "budget_index": bi,
                               "lr": lr}, "config_hash": cell.config_hash, "status": "complete", "val_loss": loss})
    choice = choose_lrs(m, tmp_path)["transformer_pp/tiny"]
    assert choice["0"]["lr"] == pytest.approx(8e-3) and choice["2"]["lr"] == pytest.approx(2e-3)
    mid = choice["1"]
    assert mid["source"] == "power_law" and mid["status"] == "interpolated"
    assert mid["fit"]["b"] == pytest.approx(math.log(0.25) / math.log(100)) and mid["fit"]["a"] == pytest.approx(4.096)
    assert mid["lr"] == pytest.approx(4e-3)
    apply_lr_choice(m, {"transformer_pp/tiny": choice})
    assert {c.budget_index: c.config.optim.lr for c in m.main_cells} == pytest.approx({0: 8e-3, 1: 4e-3, 2: 2e-3})
    text = write_report(tmp_path / "pl").read_text()
    assert "Power law for transformer_pp/tiny: lr*(C) = 4.096·C^-0.3010" in text
    assert "| interpolated |" in text


@pytest.mark.parametrize("drift, kept", [(1e-13, True), (1e-3, False)])
def test_a_refit_differing_by_rounding_keeps_the_rate_a_finished_cell_used(tmp_path, drift, kept):
    """A pick refitted from the same sweep points can move in its last bits (a different summation order);
    the main cells of that (label, budget) already trained keep their exact rate, so their config hash still
    matches and nothing retrains. A real change (0.1 %) is taken, and the stale cell is then a config clash."""
    from harness import store
    from harness.matrix import apply_lr_choice, cell_status
    raw = {"name": "nz", "defaults": {"seq_len": 32, "batch_size": 4}, "seeds": [0, 1],
           "models": [{"model": "transformer_pp", "preset": "tiny"}], "budgets": [{"flops": 1e9}],
           "lr_sweep": {"center": 4e-3, "points": 5, "bounds": [1e-4, 1e-1], "seeds": [9]}}
    m = expand(raw)
    first = m.main_cells[0]
    used = 4e-3 * (1 + drift)
    apply_lr_choice(m, {"transformer_pp/tiny": {"0": {"lr": used}}}, [first])
    store.write_record(store.cell_dir(tmp_path, "nz", first.cell_id),
                       {"matrix": "nz", "cell_id": first.cell_id, "label": first.label, "phase": "main",
                        "lr": used, "lr_from_sweep": True, "config_hash": first.config_hash, "status": "complete"})
    m = expand(raw)
    apply_lr_choice(m, {"transformer_pp/tiny": {"0": {"lr": 4e-3}}}, root=tmp_path)
    # every seed of the (label, budget) takes one rate, the finished cell's when it is only rounding away
    assert {c.config.optim.lr for c in m.main_cells} == {used if kept else 4e-3}
    if kept:
        assert cell_status(tmp_path, m.main_cells[0]) == "complete"
    else:
        with pytest.raises(ConfigError, match="different config"):
            cell_status(tmp_path, m.main_cells[0])
