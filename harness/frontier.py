"""IsoFLOP matrices: each architecture at several ladder sizes per budget, chosen around its optimum.

A matrix with

    frontier:
      ladder: cpu                 # the scale of models.ladder (cpu | gpu)
      budgets: [{flops: 1e11}, {flops: 3.2e11}, ...]
      sizes_per_budget: 3         # k: the sizes trained first at each budget
      tokens_per_param: 20        # the prior (Chinchilla) until a fit exists
      max_epochs: 1.0             # a size that would read more than this many epochs of the train split is
                                  # never trained (optional; null = no limit)
      reference: transformer_pp   # the entry the compute multiplier is measured against

trains, for every model entry and every budget (smallest first), the k ladder rungs nearest the predicted
compute-optimal size N*(C): Chinchilla's 20 tokens per parameter while nothing is measured, then the tokens
per parameter at the one measured optimum, then a power law N*(C) = a·C^b fitted to the measured optima
(``harness.scaling``). After a budget's runs finish, if the lowest mean loss is at the smallest or largest
rung trained, the next rung beyond it is added (and so on) until the profile has an interior minimum or the
ladder (or the epoch limit) ends it. Every decision is written to ``frontier.json`` in the matrix directory.

Learning rates: an ``lr_sweep`` tunes every (rung, budget) it lists (``lr_sweep.budgets``, default all);
the other (rung, budget) cells take lr*(N, C) = a·N^b·C^c fitted per architecture to the swept optima
(``harness.sweep.fit_lr_surface``), so a rung never swept still gets a rate from measured optima.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from models import ladder as _ladder
from models import registry

from . import store
from .config import BudgetConfig, ConfigError

KEYS = ("ladder", "budgets", "sizes_per_budget", "tokens_per_param", "max_epochs", "reference")
FRONTIER = "frontier.json"
MAX_EXTENSIONS = 8   # sizes added past an edge at one budget before giving up (the ladder ends sooner)


@dataclass
class FrontierSpec:
    ladder: str
    budgets: list[dict[str, float]]
    k: int
    tokens_per_param: float
    max_epochs: float | None
    reference: str | None


def parse(raw: Any, where: str) -> FrontierSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: frontier must be a mapping ({', '.join(KEYS)})")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: frontier.{unknown[0]}: unknown key (valid: {', '.join(KEYS)})")
    scale = raw.get("ladder", "cpu")
    if scale not in _ladder.SCALES:
        raise ConfigError(f"{where}: frontier.ladder: {scale!r} is not one of {', '.join(_ladder.SCALES)}")
    budgets = raw.get("budgets")
    if not isinstance(budgets, list) or len(budgets) < 2:
        raise ConfigError(f"{where}: frontier.budgets: a list of at least 2 budgets in flops")
    parsed = []
    for i, b in enumerate(budgets):
        if not isinstance(b, dict) or set(b) != {"flops"}:
            raise ConfigError(f"{where}: frontier.budgets[{i}]: expected {{flops: N}} (an IsoFLOP profile is at "
                              f"fixed compute), got {b!r}")
        try:
            flops = float(b["flops"])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: frontier.budgets[{i}].flops: expected a number, got {b['flops']!r}") from None
        if not flops > 0 or not math.isfinite(flops):
            raise ConfigError(f"{where}: frontier.budgets[{i}].flops: must be > 0, got {b['flops']!r}")
        parsed.append({"flops": flops})
    if any(b["flops"] >= a["flops"] for a, b in zip(parsed[1:], parsed)):
        raise ConfigError(f"{where}: frontier.budgets: must be strictly increasing (each budget's plan uses "
                          f"the fits of the smaller ones)")
    k = raw.get("sizes_per_budget", 3)
    if not isinstance(k, int) or isinstance(k, bool) or k < 3:
        raise ConfigError(f"{where}: frontier.sizes_per_budget: an integer >= 3 (a parabola needs three sizes), "
                          f"got {k!r}")
    tpp = raw.get("tokens_per_param", 20)
    if isinstance(tpp, bool) or not isinstance(tpp, (int, float)) or not tpp > 0:
        raise ConfigError(f"{where}: frontier.tokens_per_param: a positive number, got {tpp!r}")
    max_epochs = raw.get("max_epochs")
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float))
                                   or not max_epochs > 0):
        raise ConfigError(f"{where}: frontier.max_epochs: a positive number or null, got {max_epochs!r}")
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ConfigError(f"{where}: frontier.reference: the label of a model entry, got {reference!r}")
    return FrontierSpec(scale, parsed, k, float(tpp), None if max_epochs is None else float(max_epochs), reference)


# ---------------------------------------------------------------------------------------------- rung choice
def rung_tokens(rung: _ladder.Rung, compute: float) -> float:
    """Tokens a run of ``rung`` reads at ``compute`` training FLOPs."""
    return compute / rung.flops_per_token


def optimum_from_ratio(rungs: list[_ladder.Rung], compute: float, tokens_per_param: float) -> float:
    """The size N (total parameters) at which a run of ``compute`` reads ``tokens_per_param`` tokens per
    parameter, interpolated log-linearly along the ladder (tokens per parameter falls monotonically with size
    at fixed compute); clamped to the ladder's ends."""
    pts = [(math.log(r.params), math.log(rung_tokens(r, compute) / r.params)) for r in rungs]
    target = math.log(tokens_per_param)
    if target >= pts[0][1]:
        return rungs[0].params
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 <= target <= y0:
            t = (y0 - target) / (y0 - y1) if y0 != y1 else 0.0
            return math.exp(x0 + t * (x1 - x0))
    return rungs[-1].params


def predicted_optimum(rungs: list[_ladder.Rung], spec: FrontierSpec, compute: float,
                      measured: list[tuple[float, float]]) -> tuple[float, str]:
    """N*(compute) and where it came from, given the optima measured at smaller budgets ``[(C, N_opt)]``."""
    measured = sorted(measured)
    if len({c for c, _ in measured}) >= 2:
        from .scaling import fit_power_law
        a, b = fit_power_law([c for c, _ in measured], [n for _, n in measured])
        return a * compute ** b, f"power law N* = {a:.3g}·C^{b:.3f} over {len(measured)} budgets"
    if measured:
        c, n = measured[-1]
        r = next((r for r in rungs if math.isclose(r.params, n)), None)
        ratio = (c / (r.flops_per_token if r else _interp_fpt(rungs, n))) / n
        return optimum_from_ratio(rungs, compute, ratio), f"{ratio:.3g} tokens/param (the optimum at {c:.3g})"
    return (optimum_from_ratio(rungs, compute, spec.tokens_per_param),
            f"prior: {spec.tokens_per_param:g} tokens/param")


def _interp_fpt(rungs: list[_ladder.Rung], n: float) -> float:
    """Training FLOPs per token at a size between rungs (log-log interpolation)."""
    xs = [math.log(r.params) for r in rungs]
    ys = [math.log(r.flops_per_token) for r in rungs]
    x = math.log(n)
    if x <= xs[0]:
        return math.exp(ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            return math.exp(y0 + (x - x0) * (y1 - y0) / (x1 - x0))
    return math.exp(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))


def allowed(rung: _ladder.Rung, compute: float, spec: FrontierSpec, train_tokens: float | None) -> bool:
    if spec.max_epochs is None or not train_tokens:
        return True
    return rung_tokens(rung, compute) <= spec.max_epochs * train_tokens * (1 + 1e-9)


def nearest(rungs: list[_ladder.Rung], n_star: float, k: int, ok=lambda r: True) -> list[_ladder.Rung]:
    """The ``k`` allowed rungs nearest ``n_star`` in log parameters, as a contiguous run of the allowed ladder
    (ties go to the larger rung), smallest first."""
    pool = [r for r in rungs if ok(r)]
    if len(pool) <= k:
        return pool
    best, score = 0, math.inf
    for i in range(len(pool) - k + 1):
        window = pool[i:i + k]
        # the window whose log-centre is closest to n_star; a symmetric window round the optimum
        s = abs((math.log(window[0].params) + math.log(window[-1].params)) / 2 - math.log(n_star))
        if s < score - 1e-12 or (abs(s - score) <= 1e-12):
            best, score = i, s
    return pool[best:best + k]


def next_rung(rungs: list[_ladder.Rung], trained: list[str], mean_loss: dict[str, float],
              ok=lambda r: True) -> tuple[_ladder.Rung | None, str]:
    """After a budget's runs: the rung to add when the lowest mean loss is at an end of what was trained.
    Returns (rung or None, status): interior | extend_down | extend_up | ladder_end | epoch_limit | no_result.
    A rung whose runs failed (infinite mean) counts as trained: the next rung is always beyond every trained
    one, never one already tried."""
    names = [r.name for r in rungs]
    tried = sorted({names.index(n) for n in trained})
    finite = sorted(names.index(n) for n in trained if n in mean_loss and math.isfinite(mean_loss[n]))
    if not finite:
        return None, "no_result"
    best = min(finite, key=lambda i: mean_loss[names[i]])
    if len(finite) >= 2 and finite[0] < best < finite[-1]:
        return None, "interior"
    down = best == finite[0] and not (len(finite) == 1)
    j = tried[0] - 1 if down else tried[-1] + 1
    if not 0 <= j < len(rungs):
        return None, "ladder_end"
    if not ok(rungs[j]):
        return None, "epoch_limit"
    return rungs[j], "extend_down" if down else "extend_up"


# ---------------------------------------------------------------------------------------------- planning
def rung_entry(matrix, entry, rung: _ladder.Rung):
    """The derived matrix entry of ``entry`` at ``rung`` (created once, kept in matrix.entries)."""
    label = f"{entry.label}@{rung.name}"
    for e in matrix.entries:
        if e.label == label:
            return e
    overrides = dict((entry.settings.get("model_overrides") or {}))
    clash = sorted(set(overrides) & set(rung.overrides))
    if clash:
        raise ConfigError(f"{matrix.source}: models[{entry.index}].model_overrides.{clash[0]}: set by the "
                          f"{matrix.frontier.ladder} ladder's shape rule (a frontier entry sets no shape)")
    settings = {**entry.settings, "preset": rung.preset, "model_overrides": {**overrides, **rung.overrides}}
    derived = replace(entry, label=label, settings=settings, frontier=False, arch=entry.label, rung=rung.to_dict(),
                      tuned=entry.tuned)
    matrix.entries.append(derived)
    return derived


def sweep_grid(matrix, center: float | None) -> list[float]:
    """The sweep grid of one (rung, budget): the matrix's grid shifted by whole steps of its ratio so that its
    middle point is the one nearest ``center`` (None: the matrix's own grid), kept inside the bounds. Every
    rate stays on one global geometric lattice, so cell ids are stable."""
    spec = matrix.sweep
    grid = list(spec.grid)
    if center is None:
        return grid
    mid = grid[len(grid) // 2]
    k = round(math.log(center / mid) / math.log(spec.ratio))
    lo, hi = spec.bounds
    while k > 0 and grid[-1] * spec.ratio ** k > hi * (1 + 1e-9):
        k -= 1
    while k < 0 and grid[0] * spec.ratio ** k < lo * (1 - 1e-9):
        k += 1
    return [g * spec.ratio ** k for g in grid]


def sweep_center(matrix, choice: dict[str, Any], entry, rung: _ladder.Rung, bi: int) -> float | None:
    """Where to centre the sweep of ``entry`` at ``rung`` and budget ``bi``: lr*(N, C) fitted to the optima
    this architecture's rungs swept at the smaller budgets (none yet: the matrix's grid). Only smaller budgets:
    they are complete before ``bi`` starts, so a resumed run centres every sweep where the first run did."""
    from .sweep import fit_lr_surface
    points = []
    for e in matrix.entries:
        if e.arch != entry.label or e.rung is None:
            continue
        for k, p in (choice.get(e.label) or {}).items():
            if int(k) < bi and p.get("source") == "sweep" and p.get("lr") and p.get("status") != "extending":
                points.append((e.rung["params"], matrix.budgets[int(k)]["flops"], p["lr"]))
    if not points:
        return None
    fit = fit_lr_surface(points)
    return fit["a"] * rung.params ** fit["b_params"] * matrix.budgets[bi]["flops"] ** fit["c_compute"]


def cells_for(matrix, entry, rung: _ladder.Rung, bi: int, center: float | None = None) -> list:
    """The sweep (when budget ``bi`` is swept; grid centred on ``center``) and main cells of ``entry`` at
    ``rung`` and budget ``bi``, added to the matrix once."""
    derived = rung_entry(matrix, entry, rung)
    have = {c.cell_id: c for c in matrix.cells}
    out = []
    want = []
    if derived.tuned and bi in matrix.sweep.swept(len(matrix.budgets)):
        want += [("sweep", seed, lr) for lr in sweep_grid(matrix, center) for seed in matrix.sweep.seeds]
    want += [("main", seed, None) for seed in matrix.seeds]
    for phase, seed, lr in want:
        cell = matrix.make_cell(derived, phase, bi, seed, lr)
        out.append(have[cell.cell_id] if cell.cell_id in have else matrix.add_cell(cell))
    return out


def frontier_entries(matrix, only: list[str] | None = None) -> list:
    entries = [e for e in matrix.entries if e.frontier]
    if only:
        unknown = sorted(set(only) - {e.label for e in entries})
        if unknown:
            raise ConfigError(f"--only {unknown[0]}: not a model entry of {matrix.name} "
                              f"({', '.join(e.label for e in entries)})")
        entries = [e for e in entries if e.label in only]
    return entries


def entry_ladder(matrix, entry) -> list[_ladder.Rung]:
    return _ladder.ladder(entry.settings["model"], matrix.frontier.ladder)


def expand_prior(matrix) -> None:
    """The deterministic part of a frontier matrix: at every budget, every entry's k rungs round the prior
    N*(C) (tokens_per_param), with no results read. What `harness run --list` shows and the tests check."""
    for entry in frontier_entries(matrix):
        rungs = entry_ladder(matrix, entry)
        for bi, b in enumerate(matrix.budgets):
            n_star, _ = predicted_optimum(rungs, matrix.frontier, b["flops"], [])
            for r in nearest(rungs, n_star, matrix.frontier.k):
                cells_for(matrix, entry, r, bi)


def _mean_losses(matrix, root: Path, entry, bi: int) -> dict[str, float]:
    """Mean final val loss over the evaluation seeds, per rung name, of the main cells complete at budget bi
    (a rung counts only when every seed is complete; a failed seed makes its loss infinite)."""
    out: dict[str, float] = {}
    by_rung: dict[str, list[float]] = {}
    expected: dict[str, int] = {}
    for c in matrix.main_cells:
        if c.arch != entry.label or c.budget_index != bi:
            continue
        name = c.rung["rung"]
        expected[name] = expected.get(name, 0) + 1
        rec = store.read_record(store.cell_dir(root, matrix.name, c.cell_id)) or {}
        if rec.get("config_hash") != c.config_hash:
            continue
        if rec.get("status") == "complete" and rec.get("val_loss") is not None:
            by_rung.setdefault(name, []).append(float(rec["val_loss"]))
        elif rec.get("status") in ("failed", "diverged"):
            by_rung.setdefault(name, []).append(math.inf)
    for name, losses in by_rung.items():
        if len(losses) == expected[name]:
            out[name] = sum(losses) / len(losses)
    return out


def measured_optima(matrix, root: Path, entry, upto: int) -> list[tuple[float, float]]:
    """[(C, N_opt)] of budgets < upto: the IsoFLOP parabola's minimum where it is interior, else the best rung."""
    from .scaling import isoflop_minimum
    rungs = {r.name: r for r in entry_ladder(matrix, entry)}
    out = []
    for bi in range(upto):
        means = _mean_losses(matrix, root, entry, bi)
        if not means:
            continue
        pts = [(rungs[n].params, v) for n, v in means.items() if math.isfinite(v)]
        if not pts:
            continue
        m = isoflop_minimum([n for n, _ in pts], [v for _, v in pts])
        out.append((matrix.budgets[bi]["flops"], m["n_opt"]))
    return out


def run_frontier(matrix, root: Path, force: bool, log, nproc: int, run_cells, choose, only=None,
                 train_tokens: float | None = None) -> list[dict[str, Any]]:
    """Train a frontier matrix budget by budget (see the module docstring). ``run_cells`` and ``choose`` are
    the matrix runner's own cell runner and LR chooser; returns every record."""
    spec = matrix.frontier
    records = []
    # the prior expansion is what --list shows; the run plans its own cells (centred sweeps, extensions)
    matrix.cells = [c for c in matrix.cells if c.rung is None]
    matrix.entries = [e for e in matrix.entries if e.rung is None]
    forced: set[str] = set()  # with --force, each cell retrains once per process, not once per round
    for entry in frontier_entries(matrix, only):
        rungs = entry_ladder(matrix, entry)
        for bi, b in enumerate(matrix.budgets):
            compute = b["flops"]
            ok = (lambda r, c=compute: allowed(r, c, spec, train_tokens))
            measured = measured_optima(matrix, root, entry, bi)
            n_star, why = predicted_optimum(rungs, spec, compute, measured)
            chosen = nearest(rungs, n_star, spec.k, ok)
            decisions = []
            log(f"  {entry.label} @ {BudgetConfig(**b).label()}: N* ~ {n_star:.3g} ({why}) -> "
                + ", ".join(r.name for r in chosen))
            centers: dict[str, float | None] = {}
            for round_ in range(MAX_EXTENSIONS + 1):
                if matrix.sweep is not None:
                    choice = choose(matrix, root)
                    for r in chosen:
                        if r.name not in centers:  # fixed once per (rung, budget): later rounds extend it
                            centers[r.name] = sweep_center(matrix, choice, entry, r, bi)
                cells = [c for r in chosen for c in cells_for(matrix, entry, r, bi, centers.get(r.name))]
                records += _train_budget(matrix, cells, root, force, forced, log, nproc, run_cells, choose,
                                         f"{entry.label} {BudgetConfig(**b).label()}")
                means = _mean_losses(matrix, root, entry, bi)
                nxt, status = next_rung(rungs, [r.name for r in chosen], means, ok)
                if nxt is not None and round_ == MAX_EXTENSIONS:
                    nxt, status = None, "max_extensions"  # gave up: the minimum is still at an edge
                decisions.append({"trained": [r.name for r in chosen], "status": status,
                                  "added": nxt.name if nxt else None})
                if nxt is None:
                    break
                log(f"    lowest loss at an edge ({status}): adding {nxt.name}")
                chosen = sorted(chosen + [nxt], key=lambda r: r.params)
            _record_plan(root, matrix, entry.label, bi, {
                "budget": b, "n_star_predicted": n_star, "predicted_from": why, "decisions": decisions,
                "status": decisions[-1]["status"] if decisions else "none",
                "rungs": [r.name for r in chosen], "mean_loss": means})
    return records


def _final_failure(root: Path, cell) -> bool:
    """A cell whose record (of this very config) says it failed: a result of the frontier, not a task. Its
    sweep point counts as diverged, its seed as an infinite loss; rerun it with --force."""
    rec = store.read_record(store.cell_dir(root, cell.matrix, cell.cell_id)) or {}
    return rec.get("status") in ("failed", "diverged") and rec.get("config_hash") == cell.config_hash


def _run_once(matrix, cells, root, force, forced, log, nproc, run_cells, phase) -> list[dict[str, Any]]:
    """Run ``cells`` skipping final failures; under --force each cell id retrains at most once."""
    records = []
    fresh = [c for c in cells if force and c.cell_id not in forced]
    forced.update(c.cell_id for c in fresh)
    rest = [c for c in cells if c not in fresh and not _final_failure(root, c)]
    if fresh:
        records += run_cells(matrix, fresh, root, True, log, nproc, phase)
    if rest:
        records += run_cells(matrix, rest, root, False, log, nproc, phase)
    return records


def _train_budget(matrix, cells, root, force, forced, log, nproc, run_cells, choose,
                  phase) -> list[dict[str, Any]]:
    from .matrix import MAX_SWEEP_ROUNDS, apply_lr_choice, extend_sweep
    records = []
    sweep = [c for c in cells if c.phase == "sweep"]
    main = [c for c in cells if c.phase == "main"]
    if matrix.sweep is not None:
        todo = sweep
        for round_ in range(MAX_SWEEP_ROUNDS):
            if todo:
                records += _run_once(matrix, todo, root, force, forced, log, nproc, run_cells,
                                     f"{phase} lr sweep" + (f" +{round_}" if round_ else ""))
            choice = choose(matrix, root)
            keys = {(c.label, c.budget_index) for c in cells}
            todo = extend_sweep(matrix, choice, lambda label, bi: (label, bi) in keys)
            if not todo:
                break
        for label in dict.fromkeys(c.label for c in main if c.lr_from_sweep):
            pick = choice.get(label, {}).get(str(main[0].budget_index)) or {}
            if pick.get("lr"):
                log(f"    {label}: peak lr {pick['lr']:.4g} ({pick.get('source')}, {pick.get('status')})")
        apply_lr_choice(matrix, choice, main, root)
    records += _run_once(matrix, main, root, force, forced, log, nproc, run_cells, f"{phase} main")
    return records


def _record_plan(root: Path, matrix, label: str, bi: int, plan: dict[str, Any]) -> None:
    def update(old):
        new = copy.deepcopy(old)
        new["spec"] = ({"ladder": matrix.frontier.ladder, "budgets": matrix.budgets,
                                "sizes_per_budget": matrix.frontier.k,
                                "tokens_per_param": matrix.frontier.tokens_per_param,
                                "max_epochs": matrix.frontier.max_epochs, "reference": matrix.frontier.reference,
                                "entries": [e.label for e in matrix.entries if e.frontier]})
        new.setdefault("plans", {}).setdefault(label, {})[str(bi)] = plan
        return new
    store.update_json_locked(Path(root) / matrix.name / FRONTIER, update)


def check_entries(matrix) -> None:
    """Every frontier entry names a model with a ladder and sets no preset; the reference is an entry."""
    for e in matrix.entries:
        if not e.frontier:
            continue
        model = e.settings["model"]
        if model not in _ladder.names():
            raise ConfigError(f"{matrix.source}: models[{e.index}].model: {model!r} has no size ladder "
                              f"({', '.join(_ladder.names())})")
        registry.get(model)
        if "preset" in e.settings:
            raise ConfigError(f"{matrix.source}: models[{e.index}].preset: a frontier entry takes its sizes from "
                              f"the {matrix.frontier.ladder} ladder; remove preset")
    ref = matrix.frontier.reference
    if ref is not None and ref not in {e.label for e in matrix.entries}:
        raise ConfigError(f"{matrix.source}: frontier.reference: {ref!r} is not the label of a model entry")
