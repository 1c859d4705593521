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
    lr_sweep:                     # optional: each model's peak LR chosen by a sweep at one budget (default the
      values: [1e-3, 3e-3, 1e-2]  # first, the smallest) and carried to every budget; a model entry that sets
      budget: 0                   # optim.lr itself is not swept
      seeds: [0]

Every cell is resolved and validated before the first one trains, so a bad matrix changes nothing on disk.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from models import registry

from . import store
from .config import ConfigError, TrainConfig, from_dict, load_yaml, merge

TOP_LEVEL = ("name", "description", "matching", "defaults", "models", "budgets", "seeds", "lr_sweep", "waterfall")
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
    reference: bool = False         # the from-scratch reference of a growth-cost table

    @property
    def config_hash(self) -> str:
        cfg = asdict(self.config)
        for volatile in ("progress", "device", "parallel", "eval_tasks", "eval_limit", "eval_bootstrap_iters",
                         "init_from"):
            # how to run and what to measure afterwards, not what to train (init_from follows from `grow`)
            cfg.pop(volatile, None)
        cfg["grow"] = self.grow
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Matrix:
    name: str
    description: str
    cells: list[Cell]
    source: str
    matching: str = "none"
    sweep_values: list[float] = field(default_factory=list)
    waterfall: bool = False

    @property
    def sweep_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.phase == "sweep"]

    @property
    def main_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.phase == "main"]


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
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (valid: {', '.join(TOP_LEVEL)})")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
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
    budgets = raw.get("budgets")
    if budgets is None:
        budgets = [defaults.get("budget")] if defaults.get("budget") else [None]
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError(f"{source}: budgets must be a non-empty list")
    seeds = _int_list(raw.get("seeds", [defaults.get("seed", 0)]), f"{source}: seeds")
    sweep = raw.get("lr_sweep")
    sweep_values, sweep_budget, sweep_seeds = [], 0, [0]
    if sweep is not None:
        if not isinstance(sweep, dict) or set(sweep) - {"values", "budget", "seeds"}:
            raise ConfigError(f"{source}: lr_sweep takes values, budget, seeds")
        sweep_values = sweep.get("values")
        if not isinstance(sweep_values, list) or len(sweep_values) < 2:
            raise ConfigError(f"{source}: lr_sweep.values must list at least two learning rates")
        try:
            sweep_values = [float(v) for v in sweep_values]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: lr_sweep.values must be numbers") from None
        if not all(v > 0 and math.isfinite(v) for v in sweep_values):
            raise ConfigError(f"{source}: lr_sweep.values must be > 0")
        sweep_budget = sweep.get("budget", 0)
        if not isinstance(sweep_budget, int) or not 0 <= sweep_budget < len(budgets):
            raise ConfigError(f"{source}: lr_sweep.budget must index budgets (0..{len(budgets) - 1})")
        sweep_seeds = _int_list(sweep.get("seeds", [0]), f"{source}: lr_sweep.seeds")

    cells, seen, labels = [], set(), []
    for mi, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{source}: models[{mi}] must be a mapping with a 'model' key")
        entry = dict(entry)
        label = entry.pop("label", None) or f"{entry['model']}/{entry.get('preset', defaults.get('preset', 'tiny'))}"
        if label in labels:
            raise ConfigError(f"{source}: models[{mi}]: two entries are both labelled {label!r}; add label: ...")
        entry_matching = entry.pop("matching", matching)
        if entry_matching not in MATCHING:
            raise ConfigError(f"{source}: models[{mi}].matching: {entry_matching!r} is not one of {', '.join(MATCHING)}")
        # compare_to: a label, or null for none; by default the previous entry
        compare_to = entry.pop("compare_to") if "compare_to" in entry else (labels[-1] if labels else None)
        if compare_to is not None and compare_to not in labels:
            raise ConfigError(f"{source}: models[{mi}].compare_to: {compare_to!r} is not the label of an earlier "
                              f"entry ({', '.join(labels) or 'none'})")
        grow = entry.pop("grow_from", None)
        reference = entry.pop("reference", False)
        if grow is not None:
            allowed = {"from", "method", "init", "optimizer", "schedule"}
            if not isinstance(grow, dict) or set(grow) - allowed or "from" not in grow or "method" not in grow:
                raise ConfigError(f"{source}: models[{mi}].grow_from needs from and method (and optionally init, "
                                  f"optimizer, schedule)")
            if grow["from"] not in labels:
                raise ConfigError(f"{source}: models[{mi}].grow_from.from: {grow['from']!r} is not the label of an "
                                  f"earlier entry ({', '.join(labels) or 'none'})")
            grow = {"optimizer": "fresh", "schedule": "restart", **grow}
        own_budget = "budget" in entry  # an entry with its own budget (a growth stage) ignores the budgets list
        labels.append(label)
        tuned = sweep is not None and "lr" not in (entry.get("optim") or {}) and grow is None

        def add(phase, bi, seed, lr=None):
            settings = merge(defaults, entry)
            if budgets[bi] is not None and not own_budget:
                settings["budget"] = budgets[bi]
            settings["seed"] = seed
            if lr is not None:
                settings = merge(settings, {"optim": {"lr": lr}})
            where = f"{source}: models[{mi}]" + (f" x budgets[{bi}]" if len(budgets) > 1 else "")
            cfg = _resolve(settings, where)
            _check_matching(entry_matching, cfg, where)
            tag = _slug(label.replace("/", "-"))
            cell_id = _slug(f"{tag}-{cfg.budget.label().replace('=', '')}-seed{seed}")
            if phase == "sweep":
                cell_id = _slug(f"sweep-{tag}-lr{lr:g}-seed{seed}")
            if cell_id in seen:
                raise ConfigError(f"{where}: two cells would share the id {cell_id}; give the entries labels")
            seen.add(cell_id)
            cells.append(Cell(name, cell_id, cfg, label, phase, entry_matching, bi, phase == "main" and tuned, mi,
                              compare_to, grow, bool(reference)))

        if tuned:
            for lr in sweep_values:
                for seed in sweep_seeds:
                    add("sweep", sweep_budget, seed, lr)
        for bi in range(1 if own_budget else len(budgets)):
            for seed in seeds:
                add("main", bi, seed)
    iso_params = [c for c in cells if c.matching == "iso_params"]
    if iso_params:
        _check_iso_params(iso_params, source)
    waterfall = raw.get("waterfall", False)
    if not isinstance(waterfall, bool):
        raise ConfigError(f"{source}: waterfall must be true or false")
    return Matrix(name, str(raw.get("description", "")), cells, source, matching, sweep_values, waterfall)


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
    record = store.read_record(directory)
    if record and record.get("config_hash") != cell.config_hash:
        raise ConfigError(f"{directory}: holds a cell trained with a different config; use another --out "
                          f"or --force to retrain it")
    if record and record.get("status") == "complete":
        return "complete"
    return "partial" if (directory / "checkpoint").exists() else "new"


def choose_lrs(matrix: Matrix, root: Path) -> dict[str, dict[str, Any]]:
    """Each swept model's best peak LR: the lowest mean final validation loss over the sweep seeds.
    Written to <root>/<matrix>/lr_choice.json with every sweep point."""
    by_label: dict[str, dict[float, list[float]]] = {}
    for cell in matrix.sweep_cells:
        rec = store.read_record(store.cell_dir(root, matrix.name, cell.cell_id)) or {}
        if rec.get("status") != "complete" or rec.get("val_loss") is None:
            continue
        by_label.setdefault(cell.label, {}).setdefault(cell.config.optim.lr, []).append(rec["val_loss"])
    choice = {}
    for label, points in by_label.items():
        means = {lr: sum(v) / len(v) for lr, v in points.items()}
        best = min(means, key=means.get)
        choice[label] = {"lr": best, "val_loss": means[best], "sweep": {f"{lr:g}": m for lr, m in sorted(means.items())},
                         "edge": best in (min(means), max(means))}
    store.write_json_atomic(Path(root) / matrix.name / LR_CHOICE, choice)
    return choice


def apply_lr_choice(matrix: Matrix, choice: dict[str, dict[str, Any]]) -> None:
    for cell in matrix.main_cells:
        if cell.lr_from_sweep:
            if cell.label not in choice:
                raise ConfigError(f"no completed sweep cell for {cell.label}: cannot choose its learning rate")
            cell.config = copy.deepcopy(cell.config)
            cell.config.optim.lr = choice[cell.label]["lr"]


def run_matrix(matrix: Matrix, root: str | Path = store.DEFAULT_ROOT, force: bool = False,
               log=print, nproc: int = 1) -> list[dict[str, Any]]:
    """Train every cell not already complete; returns the records (complete, resumed, or failed).
    With an lr_sweep the sweep cells train first and the chosen rates go to the main cells.
    ``nproc`` > 1 trains each cell data-parallel under torchrun."""
    root = Path(root)
    records = []
    if matrix.sweep_cells:
        records += _run_cells(matrix, matrix.sweep_cells, root, force, log, nproc, "lr sweep")
        choice = choose_lrs(matrix, root)
        for label, c in choice.items():
            log(f"    {label}: peak lr {c['lr']:g} (val loss {c['val_loss']:.4f})"
                + ("  [best rate at the edge of the sweep]" if c["edge"] else ""))
        apply_lr_choice(matrix, choice)
    records += _run_cells(matrix, matrix.main_cells, root, force, log, nproc, "main")
    return records


GROWN_DIR = "grown_init"


def _prepare_growth(matrix: Matrix, cell: Cell, root: Path, directory: Path, status: str, log) -> dict[str, Any]:
    """Grow the base cell's final checkpoint (same seed) into <cell>/grown_init and start this cell from it:
    the data stream continues where the base stopped, and the base's FLOPs count towards this cell's
    cumulative compute."""
    from .grow import grow_checkpoint

    base = next((c for c in matrix.main_cells if c.label == cell.grow["from"] and c.config.seed == cell.config.seed),
                None)
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


def _run_cells(matrix: Matrix, cells: list[Cell], root: Path, force: bool, log, nproc: int, phase: str):
    from .train.launch import train_distributed
    from .train.loop import train

    statuses = {}
    for cell in cells:  # check every cell before any trains
        statuses[cell.cell_id] = "new" if force else cell_status(root, cell)
    records = []
    for i, cell in enumerate(cells, 1):
        directory = store.cell_dir(root, matrix.name, cell.cell_id)
        status = statuses[cell.cell_id]
        if status == "complete":
            log(f"[{phase} {i}/{len(cells)}] {cell.cell_id}: complete, skipped")
            record = store.read_record(directory)
            if _wants_eval(cell, record):
                record = _evaluate_cell(cell, directory, record, log)
            records.append(record)
            continue
        log(f"[{phase} {i}/{len(cells)}] {cell.cell_id}: {'resuming' if status == 'partial' else 'training'}")
        growth_event = None
        if cell.grow is not None:
            try:
                growth_event = _prepare_growth(matrix, cell, root, directory, status, log)
            except Exception as e:  # noqa: BLE001 - a failed growth is this cell's failure
                record = {"matrix": matrix.name, "cell_id": cell.cell_id, "label": cell.label, "phase": cell.phase,
                          "config_hash": cell.config_hash, "status": "failed", "error": f"{type(e).__name__}: {e}"}
                store.write_record(directory, record)
                log(f"    failed: {record['error']}")
                records.append(record)
                continue
        base = {"matrix": matrix.name, "matrix_source": matrix.source, "cell_id": cell.cell_id,
                "config_hash": cell.config_hash, "config": asdict(cell.config), "model": cell.config.model,
                "preset": cell.config.preset, "label": cell.label, "phase": cell.phase, "matching": cell.matching,
                "budget_index": cell.budget_index, "seed": cell.config.seed, "lr": cell.config.optim.lr,
                "lr_from_sweep": cell.lr_from_sweep, "entry_index": cell.entry_index, "compare_to": cell.compare_to,
                "waterfall": matrix.waterfall, "grow": cell.grow, "reference": cell.reference,
                "growth_event": growth_event, "budget": asdict(cell.config.budget),
                "budget_label": cell.config.budget.label(), "git_revision": store.git_revision(),
                "versions": store.library_versions()}
        t0 = time.time()
        try:
            if nproc > 1:
                summary = train_distributed(cell.config, directory, nproc, resume=not force,
                                            log_path=directory / "torchrun.log")
            else:
                summary = train(cell.config, directory, resume=not force)
        except KeyboardInterrupt:
            store.write_record(directory, {**base, "status": "interrupted", "started_at": t0})
            raise
        except Exception as e:  # one cell failing must not lose the others
            record = {**base, "status": "failed", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5), "started_at": t0}
            store.write_record(directory, record)
            log(f"    failed: {record['error']}")
            records.append(record)
            continue
        record = {**base, **summary, "status": "complete" if summary["complete"] else "partial",
                  "started_at": t0, "finished_at": time.time()}
        store.write_record(directory, record)
        if _wants_eval(cell, record):
            record = _evaluate_cell(cell, directory, record, log)
        records.append(record)
        log(f"    val loss {record.get('val_loss', float('nan')):.4f}  bpb {record.get('val_bpb', float('nan')):.3f}  "
            f"{record['tokens']:.3g} tokens  {record['wall_time_s']:.0f}s")
    return records
