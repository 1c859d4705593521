"""Run matrices: models x presets x budgets x seeds, expanded into cells that train, skip or resume.

A matrix file (YAML):

    name: default                 # the store directory under the output root
    description: ...
    matching: iso_flop            # iso_flop (flops budgets) | iso_tokens (tokens budgets) | iso_params (presets
                                  # matched by non-embedding parameters) | none; recorded in every cell; an entry
                                  # may set its own (a second table of the same matrix)
    waterfall: false              # true: the report walks the entries in order as a component waterfall, each
                                  # compared with the previous entry or the one its compare_to label names
    defaults: {...}               # TrainConfig fields shared by every cell (data, seq_len, batch_size, optim...)
    models:                       # one entry per model column; any TrainConfig field may be overridden here
      - {model: tokenformer, preset: tiny}
      - {model: mamba, preset: tiny, label: mamba-tiny}
    budgets: [{flops: 1e12}, {flops: 3e12}]   # a ladder; optional, default: defaults.budget
    seeds: [0, 1, 2]              # optional; default: [defaults.seed]
    lr_sweep:                     # optional: every entry's peak LR tuned at every budget (see harness.sweep):
      center: 3e-3                # a geometric grid (ratio 2, 5 points by default) that extends itself past
      bounds: [1e-4, 1e-1]        # an end holding the optimum until it is interior or a bound stops it;
      seeds: [1000]               # sweep seeds, disjoint from seeds; an entry that sets optim.lr is not swept
    frontier:                     # optional: IsoFLOP profiles -- each entry at the ladder sizes nearest its
      ladder: cpu                 # predicted compute-optimal size at every budget (see harness.frontier);
      budgets: [{flops: 1e11}, {flops: 3.2e11}]   # replaces budgets; entries name a model, never a preset
      sizes_per_budget: 3

Every cell is resolved and validated before the first one trains, so a bad matrix changes nothing on disk.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from models import registry

from . import frontier as _frontier
from . import store
from . import sweep as _sweep
from .sweep import SweepSpec
from .config import BudgetConfig, ConfigError, TrainConfig, from_dict, identity_dict, load_yaml, merge

TOP_LEVEL = ("name", "description", "matching", "defaults", "models", "budgets", "seeds", "lr_sweep", "waterfall",
             "frontier", "compare_frontier")
MATCHING = ("none", "iso_flop", "iso_tokens", "iso_params")
ISO_PARAMS_TOLERANCE = 0.10  # presets count as matched when non-embedding params are within 10%
LR_CHOICE = "lr_choice.json"


@dataclass
class Cell:
    matrix: str
    cell_id: str
    config: TrainConfig
    label: str = ""                 # the model column: "model/preset" or the entry's own label
    phase: str = "main"             # main | sweep
    matching: str = "none"
    budget_index: int = 0
    lr_from_sweep: bool = False     # main cell whose peak LR comes from the sweep
    entry_index: int = 0            # position of the model entry (a rung of a waterfall)
    compare_to: str | None = None   # the label this entry is compared with in a waterfall (default: previous)
    grow: dict[str, Any] | None = None  # growth stage: {"from": label, method, init, optimizer, schedule}
    reference: str | None = None    # a growth-cost reference: "scratch" (the target size) or "no_growth"
    lr_from: str | None = None      # the entry label whose peak LR this cell trains at
    flops_of: str | None = None     # the growth chain (its last stage's label) whose total FLOPs it is given
    arch: str = ""                  # the model entry (a frontier rung's label is "<arch>@<rung>")
    rung: dict[str, Any] | None = None  # a frontier cell's ladder rung (models.ladder.Rung.to_dict())

    @property
    def config_hash(self) -> str:
        cfg = identity_dict(self.config)
        for volatile in ("progress", "device", "parallel", "eval_tasks", "eval_limit", "eval_bootstrap_iters",
                         "init_from"):
            # how to run and what to measure afterwards, not what to train (init_from follows from `grow`)
            cfg.pop(volatile, None)
        cfg["grow"] = self.grow
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Entry:
    """One model entry of a matrix (a column of its tables, a rung of a waterfall), validated."""
    index: int
    label: str
    settings: dict[str, Any]        # the entry's TrainConfig fields (merged over the matrix defaults)
    matching: str
    compare_to: str | None
    grow: dict[str, Any] | None
    reference: str | None           # scratch | no_growth | None
    own_budget: bool                # an entry with its own budget (a growth stage) ignores the budgets list
    tuned: bool                     # its peak LR comes from the sweep
    frontier: bool = False          # a frontier entry: its cells are rungs of its ladder (derived entries)
    arch: str | None = None         # a derived entry: the frontier entry it is a rung of
    rung: dict[str, Any] | None = None
    lr_from: str | None = None      # its peak LR is that entry's (chosen, or set)
    flops_of: str | None = None     # its budget is that growth chain's total FLOPs


@dataclass
class Matrix:
    name: str
    description: str
    cells: list[Cell]
    source: str
    matching: str = "none"
    waterfall: bool = False
    entries: list[Entry] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    budgets: list[Any] = field(default_factory=list)
    sweep: SweepSpec | None = None
    frontier: "_frontier.FrontierSpec | None" = None
    seeds: list[int] = field(default_factory=list)
    compare_frontier: str | None = None  # a growth study's frontier matrix (same data): its L*(C) in the report

    @property
    def sweep_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.phase == "sweep"]

    @property
    def main_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.phase == "main"]

    @property
    def sweep_values(self) -> list[float]:
        return list(self.sweep.grid) if self.sweep else []

    def make_cell(self, entry: Entry, phase: str, bi: int, seed: int, lr: float | None = None) -> Cell:
        """The cell of ``entry`` at budget ``bi`` and ``seed`` (a sweep cell: at peak rate ``lr``), resolved
        and validated; ids name the entry, budget, seed (and rate)."""
        settings = merge(self.defaults, entry.settings)
        if self.budgets[bi] is not None and not entry.own_budget:
            settings["budget"] = self.budgets[bi]
        settings["seed"] = seed
        if lr is not None:
            settings = merge(settings, {"optim": {"lr": lr}})
        where = f"{self.source}: models[{entry.index}]" + (f" x budgets[{bi}]" if len(self.budgets) > 1 else "")
        cfg = _resolve(settings, where)
        _check_matching(entry.matching, cfg, where)
        tag = _slug(entry.label.replace("/", "-"))
        budget = cfg.budget.label().replace("=", "")
        cell_id = _slug(f"{tag}-{budget}-seed{seed}" if phase == "main" else f"sweep-{tag}-{budget}-lr{lr:.4g}-seed{seed}")
        return Cell(matrix=self.name, cell_id=cell_id, config=cfg, label=entry.label, phase=phase,
                    matching=entry.matching, budget_index=bi,
                    lr_from_sweep=phase == "main" and (entry.tuned or entry.lr_from is not None),
                    entry_index=entry.index, compare_to=entry.compare_to, grow=entry.grow,
                    reference=entry.reference, arch=entry.arch or entry.label, rung=entry.rung,
                    lr_from=entry.lr_from, flops_of=entry.flops_of)

    def add_cell(self, cell: Cell) -> Cell:
        if any(c.cell_id == cell.cell_id for c in self.cells):
            raise ConfigError(f"{self.source}: two cells would share the id {cell.cell_id}; give the entries labels")
        self.cells.append(cell)
        return cell


def shipped_matrices() -> dict[str, Path]:
    folder = resources.files("harness") / "matrices"
    return {p.name[:-5]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def locate(spec: str | None) -> Path:
    """A shipped matrix name (default: 'default') or a path to a YAML file."""
    spec = spec or "default"
    shipped = shipped_matrices()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such matrix file")
        return path
    raise ConfigError(f"unknown matrix {spec!r}; shipped: {', '.join(sorted(shipped))} (or give a .yaml path)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def load_matrix(spec: str | None = None, overrides: dict[str, Any] | None = None) -> Matrix:
    path = locate(spec)
    raw = load_yaml(path)
    return expand(raw, str(path), overrides)


def expand(raw: dict[str, Any], source: str = "<dict>", overrides: dict[str, Any] | None = None) -> Matrix:
    """The matrix ``raw`` (a matrix file's mapping; ``overrides`` deep-merge over its defaults) describes, every
    cell resolved and validated: the matrix's own settings (:func:`_parse`), then, in file order, each model
    entry (:func:`_entry`) and its cells (:func:`_entry_cells`), then a frontier's rungs and the checks across
    cells. The first error raises, naming the file and the entry."""
    matrix, models = _parse(raw, source, overrides)
    for mi, item in enumerate(models):
        entry = _entry(mi, item, matrix)
        matrix.entries.append(entry)
        for cell in _entry_cells(matrix, entry):
            matrix.add_cell(cell)
    if matrix.frontier is not None:
        _frontier.check_entries(matrix)
        _frontier.expand_prior(matrix)  # a frontier entry's cells: its ladder's rungs
    if matrix.sweep is not None and matrix.sweep.budgets is not None:
        _check_fit_budgets(matrix)
    iso_params = [c for c in matrix.cells if c.matching == "iso_params"]
    if iso_params:
        _check_iso_params(iso_params, source)
    return matrix


def _parse(raw: dict[str, Any], source: str, overrides: dict[str, Any] | None) -> tuple[Matrix, list[Any]]:
    """The matrix's own settings, validated, as a Matrix with no entries or cells yet; and its models list."""
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (valid: {', '.join(TOP_LEVEL)})")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
        raise ConfigError(f"{source}: name must be a plain identifier, got {name!r}")
    matching = raw.get("matching", "none")
    if matching not in MATCHING:
        raise ConfigError(f"{source}: matching: {matching!r} is not one of {', '.join(MATCHING)}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults must be a mapping")
    defaults = merge(defaults, overrides or {})
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models must be a non-empty list")
    frontier = _frontier.parse(raw["frontier"], source) if raw.get("frontier") is not None else None
    budgets = raw.get("budgets")
    if frontier is not None:
        if budgets is not None:
            raise ConfigError(f"{source}: budgets: a frontier matrix takes its budgets from frontier.budgets")
        budgets = frontier.budgets
    if budgets is None:
        budgets = [defaults.get("budget")] if defaults.get("budget") else [None]
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError(f"{source}: budgets must be a non-empty list")
    seeds = _int_list(raw.get("seeds", [defaults.get("seed", 0)]), f"{source}: seeds")
    sweep = _sweep.parse(raw["lr_sweep"], len(budgets), seeds, source) if raw.get("lr_sweep") is not None else None
    waterfall = raw.get("waterfall", False)
    if not isinstance(waterfall, bool):
        raise ConfigError(f"{source}: waterfall must be true or false")
    compare_frontier = raw.get("compare_frontier")
    if compare_frontier is not None and not (isinstance(compare_frontier, str)
                                             and re.fullmatch(r"[A-Za-z0-9_.-]+", compare_frontier)):
        raise ConfigError(f"{source}: compare_frontier must name a frontier matrix, got {compare_frontier!r}")
    matrix = Matrix(name=name, description=str(raw.get("description", "")), cells=[], source=source,
                    matching=matching, waterfall=waterfall, entries=[], defaults=defaults, budgets=budgets,
                    sweep=sweep, frontier=frontier, seeds=seeds, compare_frontier=compare_frontier)
    return matrix, models


def _entry_cells(matrix: Matrix, entry: Entry):
    """The cells of one (non-frontier) entry, in order: its LR-sweep cells (swept budgets x grid rates x sweep
    seeds) when it is tuned, then its main cells (budgets -- one for an entry with its own budget -- x seeds).
    Lazily, so each is resolved just before it is added."""
    if entry.frontier:
        return  # its cells are its ladder's rungs (frontier.expand_prior)
    if entry.tuned:
        sweep = matrix.sweep
        for bi in sweep.swept(len(matrix.budgets)):
            for lr in sweep.grid:
                for seed in sweep.seeds:
                    yield matrix.make_cell(entry, "sweep", bi, seed, lr)
    for bi in range(1 if entry.own_budget else len(matrix.budgets)):
        for seed in matrix.seeds:
            yield matrix.make_cell(entry, "main", bi, seed)


def _entry(mi: int, item: Any, matrix: Matrix) -> Entry:
    source, labels = matrix.source, [e.label for e in matrix.entries]
    if not isinstance(item, dict) or "model" not in item:
        raise ConfigError(f"{source}: models[{mi}] must be a mapping with a 'model' key")
    settings = dict(item)
    label = settings.pop("label", None) or (settings["model"] if matrix.frontier is not None else
                                            f"{settings['model']}/{settings.get('preset', matrix.defaults.get('preset', 'tiny'))}")
    if label in labels:
        raise ConfigError(f"{source}: models[{mi}]: two entries are both labelled {label!r}; add label: ...")
    entry_matching = settings.pop("matching", matrix.matching)
    if entry_matching not in MATCHING:
        raise ConfigError(f"{source}: models[{mi}].matching: {entry_matching!r} is not one of {', '.join(MATCHING)}")
    # compare_to: a label, or null for none; by default the previous entry
    compare_to = settings.pop("compare_to") if "compare_to" in settings else (labels[-1] if labels else None)
    if compare_to is not None and compare_to not in labels:
        raise ConfigError(f"{source}: models[{mi}].compare_to: {compare_to!r} is not the label of an earlier "
                          f"entry ({', '.join(labels) or 'none'})")
    grow = settings.pop("grow_from", None)
    reference = settings.pop("reference", None)
    lr_from = settings.pop("lr_from", None)
    flops_of = settings.pop("flops_of", None)
    where = f"{source}: models[{mi}]"
    if reference is True or reference is False:
        reference = "scratch" if reference else None
    if reference not in (None, *REFERENCES):
        raise ConfigError(f"{where}.reference: {reference!r} is not one of true (scratch), {', '.join(REFERENCES)}")
    merged = merge(matrix.defaults, settings)
    if grow is not None:
        grow = _grow_spec(grow, where, labels)
        if grow["schedule"] == "continue":
            # one schedule through growth (Staged Training): the base's peak LR and the base's horizon
            if "lr" in (settings.get("optim") or {}) or lr_from not in (None, grow["from"]):
                raise ConfigError(f"{where}.grow_from.schedule: continue keeps its base's peak LR; drop optim.lr "
                                  f"and lr_from")
            lr_from = grow["from"]
            base = next(e for e in matrix.entries if e.label == grow["from"])
            horizon = (merge(matrix.defaults, base.settings).get("schedule") or {}).get("horizon_tokens")
            own = (merged.get("schedule") or {}).get("horizon_tokens")
            if horizon is None:
                raise ConfigError(f"{where}.grow_from.schedule: continue needs its base {grow['from']!r} to set "
                                  f"schedule.horizon_tokens (the length of the one schedule)")
            if own is not None and own != horizon:
                raise ConfigError(f"{where}.schedule.horizon_tokens: {own:g} differs from its base's {horizon:g} "
                                  f"(schedule: continue runs one schedule)")
            settings = merge(settings, {"schedule": {"horizon_tokens": horizon}})
    if lr_from is not None:
        if lr_from not in labels:
            raise ConfigError(f"{where}.lr_from: {lr_from!r} is not the label of an earlier entry "
                              f"({', '.join(labels) or 'none'})")
        if "lr" in (settings.get("optim") or {}):
            raise ConfigError(f"{where}.lr_from: give optim.lr or lr_from, not both")
    if flops_of is not None:
        if "budget" in settings:
            raise ConfigError(f"{where}.flops_of: sets the budget (the chain's total FLOPs); drop budget")
        if flops_of not in labels:
            raise ConfigError(f"{where}.flops_of: {flops_of!r} is not the label of an earlier entry "
                              f"({', '.join(labels) or 'none'})")
        settings["budget"] = {"flops": chain_flops(matrix, flops_of)}
    # a grown stage that restarts its schedule is tuned like any run (its sweep grows from the first seed's base)
    tuned = (matrix.sweep is not None and "lr" not in (settings.get("optim") or {}) and lr_from is None
             and (grow is None or grow["schedule"] == "restart"))
    return Entry(index=mi, label=label, settings=settings, matching=entry_matching, compare_to=compare_to,
                 grow=grow, reference=reference, own_budget="budget" in settings, tuned=tuned,
                 frontier=matrix.frontier is not None, lr_from=lr_from, flops_of=flops_of)


REFERENCES = ("scratch", "no_growth")
GROW_KEYS = ("from", "method", "init", "optimizer", "schedule", "noise")


def _grow_spec(grow: Any, where: str, labels: list[str]) -> dict[str, Any]:
    """A validated grow_from: defaults filled (fresh optimizer, restarted schedule; width growth breaks the
    clones' symmetry with HyperCloning's noise unless noise is given)."""
    from .grow.width import DEFAULT_NOISE
    if not isinstance(grow, dict) or set(grow) - set(GROW_KEYS) or "from" not in grow or "method" not in grow:
        raise ConfigError(f"{where}.grow_from needs from and method (and optionally init, optimizer, schedule, "
                          f"noise)")
    if grow["from"] not in labels:
        raise ConfigError(f"{where}.grow_from.from: {grow['from']!r} is not the label of an earlier entry "
                          f"({', '.join(labels) or 'none'})")
    grow = {"optimizer": "fresh", "schedule": "restart", **grow}
    if grow["method"] == "width":
        grow.setdefault("noise", DEFAULT_NOISE)
        if not (isinstance(grow["noise"], (int, float)) and math.isfinite(grow["noise"]) and grow["noise"] >= 0):
            raise ConfigError(f"{where}.grow_from.noise: must be a number >= 0, got {grow['noise']!r}")
    elif "noise" in grow:
        raise ConfigError(f"{where}.grow_from.noise: applies to method width only")
    return grow


def chain_flops(matrix: Matrix, label: str) -> float:
    """Training FLOPs of entry ``label``'s run plus those of every stage it grew from: a growth chain's total,
    from the registry's exact counts at the run's vocabulary and context and the steps its budget buys (what
    the training loop will spend). A FLOPs-matched reference (flops_of) is given this budget."""
    from .preflight import build_model_config, tokenizer_vocab
    from .train.loop import total_steps
    entry = next(e for e in matrix.entries if e.label == label)
    where = f"{matrix.source}: models[{entry.index}]"
    if not entry.own_budget:
        raise ConfigError(f"{where}: a flops_of chain stage needs its own budget")
    cfg = _resolve({**merge(matrix.defaults, entry.settings), "seed": 0}, where)
    vocab = tokenizer_vocab(cfg.data.tokenizer)
    if vocab is None:
        raise ConfigError(f"{where}.data.tokenizer: flops_of needs a named tokenizer (its vocabulary sets the "
                          f"FLOPs), not {cfg.data.tokenizer!r}")
    model_cfg, seq = build_model_config(cfg, vocab)
    fpt = model_cfg.flops_per_token(seq)
    own = total_steps(cfg, fpt, seq) * cfg.batch_size * seq * fpt
    return own + (chain_flops(matrix, entry.grow["from"]) if entry.grow else 0.0)


def _stage(matrix: Matrix, entry: Entry) -> int:
    """When an entry can train: after the entries it grows from and takes its LR from (0: at once)."""
    deps = [d for d in ((entry.grow or {}).get("from"), entry.lr_from) if d]
    by_label = {e.label: e for e in matrix.entries}
    return max([(1 if d == (entry.grow or {}).get("from") else 0) + _stage(matrix, by_label[d]) for d in deps],
               default=0)


def _check_fit_budgets(matrix: Matrix) -> None:
    """The power-law interpolation needs each budget's compute: budgets given in FLOPs."""
    for bi, b in enumerate(matrix.budgets):
        if not (isinstance(b, dict) and "flops" in b):
            raise ConfigError(f"{matrix.source}: lr_sweep.budgets: a power-law fit over budgets needs every budget "
                              f"in flops (budgets[{bi}] is {b!r}); or sweep every budget (budgets: all)")


def _int_list(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"{where} must be a non-empty list of integers")
    return value


def _check_matching(matching: str, cfg: TrainConfig, where: str) -> None:
    kind = {"iso_flop": "flops", "iso_tokens": "tokens"}.get(matching)
    if kind and getattr(cfg.budget, kind) is None:
        raise ConfigError(f"{where}: matching {matching} needs budgets in {kind}, got {cfg.budget.label()}")


def _check_iso_params(cells: list[Cell], source: str) -> None:
    counts = {}
    for c in cells:
        cfg = registry.get_config(c.config.model, c.config.preset, **c.config.model_overrides)
        counts[c.label] = cfg.num_params(non_embedding=True)
    lo, hi = min(counts.values()), max(counts.values())
    if hi > lo * (1 + ISO_PARAMS_TOLERANCE):
        listing = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
        raise ConfigError(f"{source}: matching iso_params needs non-embedding parameters within "
                          f"{ISO_PARAMS_TOLERANCE:.0%} of each other ({listing})")


def _resolve(settings: dict[str, Any], where: str) -> TrainConfig:
    try:
        cfg = from_dict(TrainConfig, settings).validate()
        registry.get_config(cfg.model, cfg.preset, **cfg.model_overrides)
    except (ConfigError, registry.UnknownModelError) as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # a model config rejecting a field value
        raise ConfigError(f"{where}: model_overrides: {e}") from None
    return cfg


def cell_status(root: Path, cell: Cell) -> str:
    """complete | partial (a checkpoint to resume from) | new."""
    directory = store.cell_dir(root, cell.matrix, cell.cell_id)
    try:
        record = store.read_record(directory)
    except store.RecordError:
        from .train.checkpoint import has_checkpoint
        if has_checkpoint(directory):
            return "partial"  # the checkpoint holds the run's state and final measurements: rebuilt by a rerun
        raise
    if record and record.get("config_hash") != cell.config_hash:
        raise ConfigError(f"{directory}: holds a cell trained with a different config; use another --out "
                          f"or --force to retrain it")
    if record and record.get("status") == "complete":
        return "complete"
    from .train.checkpoint import has_checkpoint
    return "partial" if has_checkpoint(directory) else "new"


def _sweep_curves(matrix: Matrix, root: Path) -> dict[tuple[str, int], dict[float, dict[str, Any]]]:
    """(label, budget index) -> {lr: {"val_loss": mean over the sweep seeds, "seeds": n, "diverged": n}} from
    the complete or failed sweep cells on disk. A failed sweep run counts as diverged (infinite loss): a rate
    too high to train is an observation about that rate."""
    raw: dict[tuple[str, int], dict[float, list[float]]] = {}
    for cell in matrix.sweep_cells:
        rec = store.read_record(store.cell_dir(root, matrix.name, cell.cell_id)) or {}
        if rec.get("config_hash") != cell.config_hash:
            continue
        if rec.get("status") == "complete" and rec.get("val_loss") is not None and math.isfinite(rec["val_loss"]):
            loss = float(rec["val_loss"])
        elif rec.get("status") in ("complete", "failed", "diverged"):
            loss = math.inf
        else:
            continue
        raw.setdefault((cell.label, cell.budget_index), {}).setdefault(cell.config.optim.lr, []).append(loss)
    return {key: {lr: {"val_loss": sum(v) / len(v), "seeds": len(v), "diverged": sum(not math.isfinite(x) for x in v)}
                  for lr, v in sorted(points.items())} for key, points in raw.items()}


def _budget_compute(matrix: Matrix, bi: int) -> float:
    return float(matrix.budgets[bi]["flops"])


def choose_lrs(matrix: Matrix, root: Path) -> dict[str, dict[str, Any]]:
    """Each tuned entry's peak LR at each budget, written to <root>/<matrix>/lr_choice.json with every sweep
    point: ``{label: {str(budget index): {lr, val_loss, status, source, curve, ...}}}``. ``source`` is
    ``sweep`` (the best swept rate; ``status`` interior, at_bound, or extending while the sweep runs) or
    ``power_law`` (a·C^b fitted to the swept budgets' optima; the fit and its residuals are kept)."""
    curves = _sweep_curves(matrix, root)
    spec = matrix.sweep
    choice: dict[str, dict[str, Any]] = {}
    for entry in (e for e in matrix.entries if e.tuned and not e.frontier):
        per_budget: dict[str, Any] = {}
        for bi in spec.swept(len(matrix.budgets)):
            curve = curves.get((entry.label, bi))
            if not curve:
                continue
            kept = {"source": "sweep", "budget": _budget_label(matrix, bi),
                    "curve": {f"{lr:.6g}": p for lr, p in curve.items()}}
            try:
                per_budget[str(bi)] = {**_sweep.choose({lr: p["val_loss"] for lr, p in curve.items()}, spec), **kept}
            except ValueError as e:
                per_budget[str(bi)] = {"lr": None, "status": "failed", "error": str(e), **kept}
        if spec.budgets is not None and matrix.frontier is None:
            points = [(_budget_compute(matrix, bi), per_budget[str(bi)]["lr"]) for bi in spec.budgets
                      if per_budget.get(str(bi), {}).get("lr")]
            if len(points) >= 2:
                fit = _sweep.fit_power_law(points)
                for bi in range(len(matrix.budgets)):
                    if bi not in spec.budgets:
                        lr, clipped = _sweep.predict(fit, _budget_compute(matrix, bi), spec.bounds)
                        per_budget[str(bi)] = {"lr": lr, "status": "at_bound" if clipped else "interpolated",
                                               "source": "power_law", "budget": _budget_label(matrix, bi),
                                               "fit": fit}
        choice[entry.label] = per_budget
    if matrix.frontier is not None:
        _lr_surface(matrix, choice)
        # several runners (harness run --only) may share one matrix: each merges the (label, budget) picks
        # of its own entries, never an empty or stale one over another runner's
        archs = {e.label for e in matrix.entries if e.frontier and e.arch is None}

        def merge_picks(old):
            # an architecture taken out of the matrix leaves no picks behind
            new = {k: dict(v) for k, v in old.items() if v and k.split("@")[0] in archs}
            for label, per_budget in choice.items():
                if per_budget:
                    new.setdefault(label, {}).update(per_budget)
            return new
        return store.update_json_locked(Path(root) / matrix.name / LR_CHOICE, merge_picks)
    store.write_json_atomic(Path(root) / matrix.name / LR_CHOICE, choice)
    return choice


def _lr_surface(matrix: Matrix, choice: dict[str, dict[str, Any]]) -> None:
    """Frontier matrices: every (rung, budget) not swept takes lr*(N, C) = a·N^b·C^c fitted per architecture
    to the swept optima of all its rungs (a rung first trained at an unswept budget has no sweep of its own)."""
    spec = matrix.sweep
    swept = set(spec.swept(len(matrix.budgets)))
    by_arch: dict[str, list] = {}
    for e in matrix.entries:
        if e.tuned and e.rung is not None:
            by_arch.setdefault(e.arch, []).append(e)
    for arch, entries in by_arch.items():
        optima = {e.label: [(_budget_compute(matrix, int(k)), p["lr"]) for k, p in choice.get(e.label, {}).items()
                            if p.get("source") == "sweep" and p.get("lr") and p.get("status") != "extending"]
                  for e in entries}
        points = [(e.rung["params"], c, lr) for e in entries for c, lr in optima[e.label]]
        if not points:
            continue
        surface = _sweep.fit_lr_surface(points)
        for e in entries:
            per_budget = choice.setdefault(e.label, {})
            # a rung swept at two or more budgets extrapolates its own optima in C; one swept at fewer takes
            # the architecture's surface over (N, C)
            own = optima[e.label]
            rung_fit = _sweep.fit_power_law(own) if len({c for c, _ in own}) >= 2 else None
            for bi in range(len(matrix.budgets)):
                if bi in swept:
                    continue
                compute = _budget_compute(matrix, bi)
                if rung_fit is not None:
                    lr, clipped = _sweep.predict(rung_fit, compute, spec.bounds)
                    source, fit = "power_law", rung_fit
                else:
                    lr, clipped = _sweep.predict_surface(surface, e.rung["params"], compute, spec.bounds)
                    source, fit = "lr_surface", surface
                per_budget[str(bi)] = {"lr": lr, "status": "at_bound" if clipped else "interpolated",
                                       "source": source, "budget": _budget_label(matrix, bi), "fit": fit}


def _budget_label(matrix: Matrix, bi: int) -> str:
    b = matrix.budgets[bi]
    return BudgetConfig(**b).label() if isinstance(b, dict) else str(b)


def extend_sweep(matrix: Matrix, choice: dict[str, dict[str, Any]], where=None) -> list[Cell]:
    """The next round of a self-extending sweep: for every (entry, budget) whose best rate is at an end of
    what has run, one more point beyond it (every sweep seed); ``where(label, budget_index)`` restricts it.
    Returns the new cells (also added to matrix)."""
    new = []
    have = {(c.label, c.budget_index, round(math.log(c.config.optim.lr), 9)) for c in matrix.sweep_cells}
    for entry in (e for e in matrix.entries if e.tuned and not e.frontier):
        for key, pick in choice.get(entry.label, {}).items():
            nxt = pick.get("next")
            if pick.get("source") != "sweep" or nxt is None:
                continue
            bi = int(key)
            if where is not None and not where(entry.label, bi):
                continue
            if (entry.label, bi, round(math.log(nxt), 9)) in have:
                continue
            for seed in matrix.sweep.seeds:
                new.append(matrix.add_cell(matrix.make_cell(entry, "sweep", bi, seed, nxt)))
    return new


LR_NOISE = 1e-9  # relative: a rate refitted from the same sweep points differs from the first fit only by rounding


def apply_lr_choice(matrix: Matrix, choice: dict[str, dict[str, Any]], cells: list[Cell] | None = None,
                    root: Path | None = None) -> None:
    """Set each main cell's peak LR from its (label, budget) pick. With ``root``, a pick that a trained cell of
    the same (label, budget) already used up to rounding (a refit of the same sweep points, LR_NOISE) keeps
    that cell's exact rate: the decision stands and its finished cells stay valid; a real change does not."""
    main = matrix.main_cells if cells is None else [c for c in cells if c.phase == "main"]
    used: dict[tuple[str, int], float] = {}
    if root is not None:
        for cell in main:
            if cell.lr_from_sweep and (cell.label, cell.budget_index) not in used:
                rec = store.read_record(store.cell_dir(root, matrix.name, cell.cell_id)) or {}
                if rec.get("lr_from_sweep") and rec.get("lr"):
                    used[(cell.label, cell.budget_index)] = float(rec["lr"])
    for cell in main:
        if cell.lr_from_sweep:
            lr = _peak_lr(matrix, choice, cell.label, cell.budget_index)
            prior = used.get((cell.label, cell.budget_index))
            if prior is not None and abs(prior - lr) <= LR_NOISE * lr:
                lr = prior
            cell.config = copy.deepcopy(cell.config)
            cell.config.optim.lr = lr


def _peak_lr(matrix: Matrix, choice: dict[str, dict[str, Any]], label: str, bi: int) -> float:
    """The peak LR of entry ``label`` at budget ``bi``: its sweep's pick when tuned, else that of the entry it
    takes its LR from (lr_from), else its own optim.lr."""
    entry = next(e for e in matrix.entries if e.label == label)
    if entry.tuned:
        pick = choice.get(label, {}).get(str(bi)) or {}
        if not pick.get("lr"):
            raise ConfigError(f"no usable sweep result for {label} at budget {bi}: cannot choose its learning "
                              f"rate ({pick.get('error', 'no completed sweep cell')})")
        return float(pick["lr"])
    if entry.lr_from is not None:
        source = next(e for e in matrix.entries if e.label == entry.lr_from)
        return _peak_lr(matrix, choice, source.label, 0 if source.own_budget else bi)
    return next(c for c in matrix.main_cells if c.label == label).config.optim.lr


MAX_SWEEP_ROUNDS = 50  # a bound on extension rounds (the bounds in the matrix end it long before)


def run_matrix(matrix: Matrix, root: str | Path = store.DEFAULT_ROOT, force: bool = False,
               log=print, nproc: int = 1, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Train every cell not already complete; returns the records (complete, resumed, or failed).
    With an lr_sweep the sweep cells train first, in rounds that extend the grid wherever its best point is at
    an end, and each (entry, budget) gets its own chosen rate. ``nproc`` > 1 trains each cell data-parallel
    under torchrun."""
    root = Path(root)
    if matrix.frontier is not None:
        return _frontier.run_frontier(matrix, root, force, log, nproc, _run_cells, choose_lrs, only,
                                      _train_tokens(matrix))
    if only:
        raise ConfigError(f"--only: {matrix.name} is not a frontier matrix (its cells run in one order)")
    # a growth matrix trains in stages: bases (and the entries whose LR others take) before what depends on them
    stages: dict[int, list[str]] = {}
    for entry in matrix.entries:
        stages.setdefault(_stage(matrix, entry), []).append(entry.label)
    records = []
    for stage in sorted(stages):
        labels = set(stages[stage])
        tag = f"stage {stage} " if len(stages) > 1 else ""
        records += _run_stage(matrix, [c for c in matrix.sweep_cells if c.label in labels],
                              [c for c in matrix.main_cells if c.label in labels], root, force, log, nproc, tag)
    return records


def _run_stage(matrix: Matrix, sweep: list[Cell], main: list[Cell], root: Path, force: bool, log, nproc: int,
               tag: str) -> list[dict[str, Any]]:
    records, choice, labels = [], {}, {c.label for c in sweep}
    if matrix.sweep is not None and any(c.lr_from_sweep for c in main):
        todo, forced = sweep, force
        for round_ in range(MAX_SWEEP_ROUNDS):
            if todo:
                records += _run_cells(matrix, todo, root, forced, log, nproc,
                                      f"{tag}lr sweep" + (f" +{round_}" if round_ else ""))
            forced = False  # --force retrains what exists, not the points added after it
            choice = choose_lrs(matrix, root)
            todo = extend_sweep(matrix, choice, lambda label, bi: label in labels)
            if not todo:
                break
        for label, per_budget in choice.items():
            if label not in labels:
                continue
            for key, c in sorted(per_budget.items(), key=lambda kv: int(kv[0])):
                if c.get("lr"):
                    log(f"    {label} @ {c.get('budget', key)}: peak lr {c['lr']:.4g}"
                        + (f" (val loss {c['val_loss']:.4f})" if c.get("val_loss") is not None else "")
                        + {"at_bound": "  [at the sweep's bound]", "interpolated": "  [power law]"}.get(c["status"], ""))
    if any(c.lr_from_sweep for c in main):
        apply_lr_choice(matrix, choice, main, root=root)
    records += _run_cells(matrix, main, root, force, log, nproc, f"{tag}main")
    return records


def _train_tokens(matrix: Matrix) -> float | None:
    """Tokens in the train split the matrix reads (the frontier's epoch limit), or None without a limit."""
    if matrix.frontier is None or matrix.frontier.max_epochs is None:
        return None
    from .data import prepare_dataset
    cfg = _resolve(merge(matrix.defaults, {"model": matrix.entries[0].settings["model"]}), matrix.source)
    ds = prepare_dataset(cfg.data, progress=False)
    return float(ds.meta["train"]["n_tokens"])


GROWN_DIR = "grown_init"


def _growth_base(matrix: Matrix, cell: Cell) -> Cell | None:
    """The main cell a grown cell starts from: its base entry's cell of the same seed; a sweep cell (its own
    seeds) grows from the first evaluation seed's base, so every swept rate starts from one trained model."""
    seed = cell.config.seed if cell.phase == "main" else matrix.seeds[0]
    return next((c for c in matrix.main_cells if c.label == cell.grow["from"] and c.config.seed == seed), None)


def _prepare_growth(matrix: Matrix, cell: Cell, root: Path, directory: Path, status: str, log) -> dict[str, Any]:
    """Grow the base cell's final checkpoint (same seed) into <cell>/grown_init and start this cell from it:
    the data stream continues where the base stopped, and the base's FLOPs count towards this cell's
    cumulative compute."""
    from .grow import grow_checkpoint

    base = _growth_base(matrix, cell)
    if base is None:
        raise ConfigError(f"{cell.cell_id}: no base cell {cell.grow['from']!r} with seed {cell.config.seed}")
    base_dir = store.cell_dir(root, matrix.name, base.cell_id)
    base_rec = store.read_record(base_dir) or {}
    if base_rec.get("status") != "complete":
        raise ConfigError(f"{cell.cell_id}: its base cell {base.cell_id} is not complete")
    grown = directory / GROWN_DIR
    event_path = directory / "growth_event.json"
    if status == "new" or not event_path.exists():
        spec = {k: v for k, v in cell.grow.items() if k != "from"}
        event = grow_checkpoint(base_dir / "checkpoint", grown, to=dict(cell.config.model_overrides),
                                to_preset=cell.config.preset, seed=cell.config.seed, overwrite=True, **spec)
        event["loss_before"] = base_rec.get("val_loss")
        store.write_json_atomic(event_path, event)
        log(f"    grown from {base.cell_id}: {event['params_before']:,} -> {event['params_after']:,} params, "
            f"relative logit change {event['gap']['rel_logit_change']:.3g}")
    else:
        event = json.loads(event_path.read_text())
    cell.config = copy.deepcopy(cell.config)
    cell.config.init_from = str(grown)
    return event


def _wants_eval(cell: Cell, record: dict[str, Any]) -> bool:
    cfg = cell.config
    done = record.get("lm_eval") or {}
    return (record.get("status") == "complete" and bool(cfg.eval_tasks)
            and (done.get("tasks") != list(cfg.eval_tasks) or done.get("limit") != cfg.eval_limit))


def _evaluate_cell(cell: Cell, directory: Path, record: dict[str, Any], log) -> dict[str, Any]:
    """lm-eval on the cell's final checkpoint; lm-eval's own files go to <cell>/lm_eval/, the Table-1 row
    into the record. A failed evaluation is recorded, not fatal: the training result stands."""
    cfg = cell.config
    try:
        from .evaluate import evaluate_checkpoint
        out = evaluate_checkpoint(directory / "checkpoint", list(cfg.eval_tasks), limit=cfg.eval_limit,
                                  bootstrap_iters=cfg.eval_bootstrap_iters, output_path=str(directory / "lm_eval"),
                                  device="cuda" if cfg.device.startswith("cuda") else "cpu")
        result = {"tasks": list(cfg.eval_tasks), "limit": cfg.eval_limit, "table": out["table"],
                  "offline": out["offline"], "seconds": out["seconds"], "skipped": out.get("skipped")}
        log(f"    lm-eval {','.join(cfg.eval_tasks)}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in out["table"].items() if isinstance(v, (int, float)) and v == v))
    except Exception as e:  # noqa: BLE001 - recorded in the cell's record
        result = {"tasks": list(cfg.eval_tasks), "limit": cfg.eval_limit, "error": f"{type(e).__name__}: {e}"}
        log(f"    lm-eval failed: {result['error']}")
    record = {**record, "lm_eval": result}
    store.write_record(directory, record)
    return record


# how often a runner looks again at cells other runners hold (HARNESS_POLL_S: tests of many workers)
POLL_S = float(os.environ.get("HARNESS_POLL_S", "5"))


def _run_cells(matrix: Matrix, cells: list[Cell], root: Path, force: bool, log, nproc: int, phase: str):
    """Train (or skip, share, or wait for) every cell; returns their records in order. A cell another runner
    holds a live lease on is waited for (and taken over if its lease dies), so every runner returns with
    every cell settled and none trained twice (harness.lease)."""
    for cell in cells:  # check every cell before any trains
        if not force:
            cell_status(root, cell)
    # cells with identical training configs (the same rung listed in two tables) train once; the others share
    # the result, under their own labels
    canonical = {}
    for c in matrix.cells:
        canonical.setdefault(c.config_hash, c)
    records: dict[str, dict[str, Any]] = {}
    pending = list(enumerate(cells, 1))
    forced, seen_held, in_call = set(), set(), {c.cell_id for c in cells}
    waiting_logged = False
    while pending:
        held = []
        for i, cell in pending:
            tag = f"[{phase} {i}/{len(cells)}] {cell.cell_id}"
            record = _settle_cell(matrix, cell, canonical[cell.config_hash], root,
                                  force and cell.cell_id not in forced, log, nproc, tag, seen_held, in_call)
            forced.add(cell.cell_id)
            if record is None:
                seen_held.add(cell.cell_id)
                held.append((i, cell))
            else:
                records[cell.cell_id] = record
        if held:
            if not waiting_logged:
                log(f"    waiting for {len(held)} cell(s) held by other runners")
                waiting_logged = True
            time.sleep(POLL_S)
        pending = held
    return [records[c.cell_id] for c in cells]


def _final_record(root: Path, cell: Cell) -> dict[str, Any] | None:
    """The cell's record when it is a final result of this very config (complete, failed or diverged)."""
    try:
        rec = store.read_record(store.cell_dir(root, cell.matrix, cell.cell_id)) or {}
    except store.RecordError:
        return None
    if rec.get("config_hash") == cell.config_hash and rec.get("status") in ("complete", "failed", "diverged"):
        return rec
    return None


def _busy(root: Path, matrix: Matrix, other: Cell, in_call: set[str]) -> bool:
    """Whether ``other`` (a twin or a growth base) is still to be settled: held by a live runner, or pending in
    this very call."""
    from . import lease as _lease
    if _final_record(root, other) is not None:
        return False
    return other.cell_id in in_call or _lease.alive(_lease.read(store.cell_dir(root, matrix.name, other.cell_id)))


def _settle_cell(matrix: Matrix, cell: Cell, twin: Cell, root: Path, force: bool, log, nproc: int,
                 tag: str, seen_held: set[str] = frozenset(), in_call: set[str] = frozenset()) -> dict[str, Any] | None:
    """One cell's record: trained here, already complete, shared from its twin, settled by the runner that
    held it, or None while another runner holds it (or its twin or growth base is still to be settled)."""
    from . import lease as _lease
    directory = store.cell_dir(root, matrix.name, cell.cell_id)
    if cell.cell_id in seen_held and not force:
        final = _final_record(root, cell)
        if final is not None:  # the runner that held it settled it (even as failed): never trained twice
            return final
    status = "new" if force else cell_status(root, cell)
    if twin is not cell and status != "complete":
        if _busy(root, matrix, twin, in_call - {cell.cell_id}):
            return None  # its twin is training here or elsewhere: share its result once it is settled
        record = _share(matrix, twin, cell, root)
        log(f"{tag}: same config as {twin.cell_id}, "
            + ("shared" if record.get("status") == "complete" else "its twin did not complete"))
        return record
    if status == "complete":
        log(f"{tag}: complete, skipped")
        record = store.read_record(directory)
        if _wants_eval(cell, record):
            record = _evaluate_cell(cell, directory, record, log)
        return record
    if cell.grow is not None:
        base = _growth_base(matrix, cell)
        if base is not None and _busy(root, matrix, base, in_call - {cell.cell_id}):
            return None  # its base is training here or elsewhere: grow from it once it is complete
    held = _lease.claim(directory, pid_rule=nproc <= 1)
    if held is None:
        return None
    try:
        if not force and cell_status(root, cell) == "complete":  # finished by another runner meanwhile
            return store.read_record(directory)
        status = "new" if force else cell_status(root, cell)
        log(f"{tag}: {'resuming' if status == 'partial' else 'training'}")
        return _train_cell(matrix, cell, directory, root, status, force, log, nproc, held)
    except _lease.LeaseLost:
        log(f"{tag}: taken over by another runner (this one was presumed dead); waiting for its result")
        return None
    finally:
        held.release()


def _train_cell(matrix: Matrix, cell: Cell, directory: Path, root: Path, status: str, force: bool, log,
                nproc: int, held=None) -> dict[str, Any]:
    from .lease import LeaseLost
    from .train.launch import train_distributed
    from .train.loop import Diverged, train
    growth_event = None
    if cell.grow is not None:
        try:
            growth_event = _prepare_growth(matrix, cell, root, directory, status, log)
        except Exception as e:  # noqa: BLE001 - a failed growth is this cell's failure
            record = {**_identity(matrix, cell), "status": "failed", "error": f"{type(e).__name__}: {e}"}
            store.write_record(directory, record)
            log(f"    failed: {record['error']}")
            return record
    base = {**_identity(matrix, cell), "growth_event": growth_event, "git_revision": store.git_revision(),
            "versions": store.library_versions()}
    t0 = time.time()
    if force:
        # the old record must not outlive the run that replaces it: a kill mid-retrain leaves a partial cell,
        # never a "complete" record over a half-trained checkpoint
        (directory / store.RECORD).unlink(missing_ok=True)
    try:
        if nproc > 1:
            summary = train_distributed(cell.config, directory, nproc, resume=not force,
                                        log_path=directory / "torchrun.log")
        else:
            summary = train(cell.config, directory, resume=not force, guard=held.check if held else None)
        if held is not None:
            held.check()  # taken over while training: the new holder writes the record, not this runner
    except KeyboardInterrupt:
        store.write_record(directory, {**base, "status": "interrupted", "started_at": t0})
        raise
    except LeaseLost:
        raise  # another runner owns the cell now (harness.lease): nothing of this attempt is recorded
    except ConfigError:
        raise  # the request is wrong (e.g. a checkpoint of another config): one line, exit 2, nothing recorded
    except Diverged as e:  # a result, not a crash: recorded with its step; never joins a mean
        record = {**base, "status": "diverged", "diverged_at_step": e.step, "error": str(e), "started_at": t0}
        store.write_record(directory, record)
        log(f"    diverged: {e}")
        return record
    except Exception as e:  # one cell failing must not lose the others
        record = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=5), "started_at": t0}
        store.write_record(directory, record)
        log(f"    failed: {record['error']}")
        return record
    record = {**base, **summary, "status": "complete" if summary["complete"] else "partial",
              "started_at": t0, "finished_at": time.time()}
    store.write_record(directory, record)
    if _wants_eval(cell, record):
        record = _evaluate_cell(cell, directory, record, log)
    log(f"    val loss {record.get('val_loss', float('nan')):.4f}  bpb {record.get('val_bpb', float('nan')):.3f}  "
        f"{record['tokens']:.3g} tokens  {record['wall_time_s']:.0f}s")
    return record


def _identity(matrix: Matrix, cell: Cell) -> dict[str, Any]:
    """What a record says about which cell it is (as opposed to what training measured)."""
    return {"matrix": matrix.name, "matrix_source": matrix.source, "cell_id": cell.cell_id,
            "config_hash": cell.config_hash, "config": asdict(cell.config), "model": cell.config.model,
            "preset": cell.config.preset, "label": cell.label, "phase": cell.phase, "matching": cell.matching,
            "budget_index": cell.budget_index, "seed": cell.config.seed, "lr": cell.config.optim.lr,
            "lr_from_sweep": cell.lr_from_sweep, "entry_index": cell.entry_index, "compare_to": cell.compare_to,
            "waterfall": matrix.waterfall, "grow": cell.grow, "reference": cell.reference, "lr_from": cell.lr_from,
            "flops_of": cell.flops_of, "compare_frontier": matrix.compare_frontier,
            "budget": asdict(cell.config.budget), "budget_label": cell.config.budget.label(),
            "arch": cell.arch or cell.label, "rung": cell.rung}


def _share(matrix: Matrix, twin: Cell, cell: Cell, root: Path) -> dict[str, Any]:
    """``cell`` trains exactly what ``twin`` trained: its record is the twin's measurements under this cell's
    identity (``shared_with`` names the twin), its metrics a copy of the twin's; no second checkpoint."""
    src = store.cell_dir(root, matrix.name, twin.cell_id)
    rec = store.read_record(src) or {}
    directory = store.cell_dir(root, matrix.name, cell.cell_id)
    if rec.get("status") != "complete":
        return {**_identity(matrix, cell), "status": "failed", "shared_with": twin.cell_id,
                "error": f"its twin {twin.cell_id} is {rec.get('status', 'missing')}"}
    metrics = src / "metrics.jsonl"
    if metrics.is_file():
        store.write_text_atomic(directory / "metrics.jsonl", metrics.read_text())
    record = {**rec, **_identity(matrix, cell), "shared_with": twin.cell_id}
    store.write_record(directory, record)
    return record
