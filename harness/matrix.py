"""Run matrices: models x presets x budgets x seeds, expanded into cells that train, skip or resume.

A matrix file (YAML):

    name: default                 # the store directory under the output root
    description: ...
    defaults: {...}               # TrainConfig fields shared by every cell (data, seq_len, batch_size, optim...)
    models:                       # one entry per model column; any TrainConfig field may be overridden here
      - {model: tokenformer, preset: tiny}
      - {model: mamba, preset: tiny, optim: {lr: 4e-3}}
    budgets: [{flops: 1e12}]      # optional; default: defaults.budget
    seeds: [0]                    # optional; default: [defaults.seed]

Every cell is resolved and validated before the first one trains, so a bad matrix changes nothing on disk.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from models import registry

from . import store
from .config import BudgetConfig, ConfigError, TrainConfig, from_dict, load_yaml, merge

TOP_LEVEL = ("name", "description", "defaults", "models", "budgets", "seeds")


@dataclass
class Cell:
    matrix: str
    cell_id: str
    config: TrainConfig

    @property
    def config_hash(self) -> str:
        cfg = asdict(self.config)
        for volatile in ("progress", "device", "parallel"):  # how to run, not what to run
            cfg.pop(volatile, None)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Matrix:
    name: str
    description: str
    cells: list[Cell]
    source: str


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
    seeds = raw.get("seeds", [defaults.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers")

    cells, seen = [], set()
    for bi, budget in enumerate(budgets):
        for mi, entry in enumerate(models):
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigError(f"{source}: models[{mi}] must be a mapping with a 'model' key")
            for seed in seeds:
                settings = merge(defaults, entry)
                if budget is not None:
                    settings["budget"] = budget
                settings["seed"] = seed
                where = f"{source}: models[{mi}]" + (f" x budgets[{bi}]" if len(budgets) > 1 else "")
                cfg = _resolve(settings, where)
                label = cfg.budget.label().replace("=", "")
                cell_id = _slug(f"{cfg.model}-{cfg.preset}-{label}-seed{seed}")
                if cell_id in seen:
                    cell_id = _slug(f"{cell_id}-{mi}")
                seen.add(cell_id)
                cells.append(Cell(name, cell_id, cfg))
    return Matrix(name, str(raw.get("description", "")), cells, source)


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


def run_matrix(matrix: Matrix, root: str | Path = store.DEFAULT_ROOT, force: bool = False,
               log=print, nproc: int = 1) -> list[dict[str, Any]]:
    """Train every cell not already complete; returns the records (complete, resumed, or failed).
    ``nproc`` > 1 trains each cell data-parallel under torchrun."""
    from .train.launch import train_distributed
    from .train.loop import train

    root = Path(root)
    statuses = {}
    for cell in matrix.cells:  # check every cell before any trains
        statuses[cell.cell_id] = "new" if force else cell_status(root, cell)
    records = []
    for i, cell in enumerate(matrix.cells, 1):
        directory = store.cell_dir(root, matrix.name, cell.cell_id)
        status = statuses[cell.cell_id]
        if status == "complete":
            log(f"[{i}/{len(matrix.cells)}] {cell.cell_id}: complete, skipped")
            records.append(store.read_record(directory))
            continue
        log(f"[{i}/{len(matrix.cells)}] {cell.cell_id}: {'resuming' if status == 'partial' else 'training'}")
        base = {"matrix": matrix.name, "matrix_source": matrix.source, "cell_id": cell.cell_id,
                "config_hash": cell.config_hash, "config": asdict(cell.config), "model": cell.config.model,
                "preset": cell.config.preset, "seed": cell.config.seed, "budget": asdict(cell.config.budget),
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
        records.append(record)
        log(f"    val loss {record.get('val_loss', float('nan')):.4f}  bpb {record.get('val_bpb', float('nan')):.3f}  "
            f"{record['tokens']:.3g} tokens  {record['wall_time_s']:.0f}s")
    return records
