"""The typed view of a results store: every record and every metrics.jsonl read once, every row keyed by its
matrix entry label (two entries of one model/preset are two rows, never merged).

    store = load(root)            # a store root, a matrix directory or a cell directory
    store.runs                    # [Run], one per record
    store.frame()                 # pandas: one row per run
    store.curves()                # pandas: one row per validation point (label, seed, flops, val_loss, ...)
    store.lr_choice[matrix]       # the matrix's lr_choice.json, when it has a sweep
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import store as _store

LR_CHOICE = "lr_choice.json"
EARLIER_VERDICTS = "earlier_verdicts.json"


class StoreError(ValueError):
    """A record or metrics file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Run:
    """One cell's record, with the fields the tables use typed and everything else in ``raw``."""
    directory: str
    matrix: str
    cell_id: str
    label: str
    model: str
    preset: str
    phase: str                   # main | sweep
    status: str
    seed: int | None
    budget_index: int
    budget_label: str
    matching: str
    entry_index: int
    compare_to: str | None
    waterfall: bool
    reference: str | None        # a growth-cost reference: scratch | no_growth
    grow: dict | None
    lr: float | None
    lr_from_sweep: bool
    params: float | None
    non_embedding_params: float | None
    flops: float | None
    cumulative_flops: float | None
    flops_per_token: float | None
    tokens: float | None
    steps: int | None
    wall_time_s: float | None
    tokens_per_s: float | None
    final_train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    val_ppl: float | None
    val_tokens: int | None
    val_full: bool | None        # None: an older record that did not say (first batches only)
    val_sources: dict = field(default_factory=dict)   # {source: {loss, bpb, tokens}}
    device: str | None = None
    precision: str | None = None
    shared_with: str | None = None
    curve: tuple = ()            # validation points: ({step, flops, cumulative_flops, val_loss, ...}, ...)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def complete(self) -> bool:
        return self.status == "complete" and self.val_loss is not None and math.isfinite(self.val_loss)


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _read_curve(path: Path) -> tuple:
    if not path.is_file():
        return ()
    points = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except ValueError:
            raise StoreError(f"{path}:{n}: malformed JSON line") from None
        if "val_loss" in m:
            points.append(m)
    return tuple(points)


def start_loss(r: Run) -> float | None:
    """ln V of the vocabulary the tokenizer uses (not the padded embedding): a uniform guess's loss."""
    vocab = (r.raw.get("dataset") or {}).get("vocab_size") or (r.raw.get("model_config") or {}).get("vocab_size")
    return math.log(vocab) if vocab else None


def no_better_than_start(r: Run) -> bool:
    start = start_loss(r)
    return bool(r.complete and start is not None and r.val_loss >= start)


def run_from_record(directory: Path, rec: dict[str, Any]) -> Run:
    g = rec.get
    return Run(
        directory=str(directory), matrix=g("matrix") or "", cell_id=g("cell_id") or Path(directory).name,
        label=g("label") or f"{g('model')}/{g('preset')}", model=g("model") or "", preset=g("preset") or "",
        phase=g("phase", "main"), status=g("status") or "unknown", seed=g("seed"),
        budget_index=int(g("budget_index") or 0), budget_label=g("budget_label") or "", matching=g("matching") or "none",
        entry_index=int(g("entry_index") or 0), compare_to=g("compare_to"), waterfall=bool(g("waterfall")),
        reference="scratch" if g("reference") is True else (g("reference") or None), grow=g("grow"), lr=_num(g("lr")), lr_from_sweep=bool(g("lr_from_sweep")),
        params=_num(g("params")), non_embedding_params=_num(g("non_embedding_params")), flops=_num(g("flops")),
        cumulative_flops=_num(g("cumulative_flops", g("flops"))), flops_per_token=_num(g("flops_per_token")),
        tokens=_num(g("tokens")), steps=g("steps"), wall_time_s=_num(g("wall_time_s")),
        tokens_per_s=_num(g("tokens_per_s")), final_train_loss=_num(g("final_train_loss")),
        val_loss=_num(g("val_loss")), val_bpb=_num(g("val_bpb")), val_ppl=_num(g("val_ppl")),
        val_tokens=g("val_tokens"), val_full=g("val_full"), val_sources=g("val_sources") or {},
        device=g("device"), precision=g("precision"), shared_with=g("shared_with"),
        curve=_read_curve(Path(directory) / "metrics.jsonl"), raw=rec)


@dataclass
class Store:
    root: Path
    runs: list[Run]
    lr_choice: dict[str, dict]           # matrix -> lr_choice.json
    earlier: dict[str, dict]             # matrix -> earlier_verdicts.json

    def frame(self) -> pd.DataFrame:
        rows = []
        for r in self.runs:
            row = {k: v for k, v in asdict(r).items() if k not in ("curve", "raw", "val_sources", "grow")}
            for source, m in sorted(r.val_sources.items()):
                row[f"bpb:{source}"] = m.get("bpb")
                row[f"loss:{source}"] = m.get("loss")
            rows.append(row)
        return pd.DataFrame(rows)

    def curves(self) -> pd.DataFrame:
        rows = []
        for r in self.runs:
            for m in r.curve:
                rows.append({"matrix": r.matrix, "label": r.label, "phase": r.phase, "seed": r.seed,
                             "budget": r.budget_label, "budget_index": r.budget_index, "step": m.get("step"),
                             "flops": m.get("flops"), "cumulative_flops": m.get("cumulative_flops", m.get("flops")),
                             "val_loss": m.get("val_loss"), "grown_at": r.raw.get("flops_offset") if r.grow else None})
        return pd.DataFrame(rows)

    def main(self, matrix: str | None = None) -> list[Run]:
        """The usable evaluation runs: complete, and better than the uniform guess a model starts from (a run
        that ends at or above ln V learned nothing; it is listed under 'Flagged runs' instead)."""
        return [r for r in self.runs if r.phase == "main" and r.complete and not no_better_than_start(r)
                and (matrix is None or r.matrix == matrix)]

    @property
    def matrices(self) -> list[str]:
        return sorted({r.matrix for r in self.runs})


def load(root: str | Path) -> Store:
    """Read a store once. A record that is not valid JSON stops with one line naming the file."""
    root = Path(root)
    runs = []
    for path in sorted(root.rglob(_store.RECORD)):
        if any(p in ("checkpoint", "checkpoint.tmp", "checkpoint.old", "grown_init") for p in path.parts):
            continue
        rec = _read_json(path)
        if not isinstance(rec, dict):
            raise StoreError(f"{path}: not a JSON object")
        runs.append(run_from_record(path.parent, rec))
    side: dict[str, dict[str, dict]] = {LR_CHOICE: {}, EARLIER_VERDICTS: {}}
    for name in side:
        for path in sorted(root.rglob(name)):
            matrix = path.parent.name
            if matrix not in side[name]:
                side[name][matrix] = _read_json(path)
    choice = {m: _normalise_choice(c) for m, c in side[LR_CHOICE].items()}
    return Store(root, runs, choice, side[EARLIER_VERDICTS])


def _normalise_choice(choice: dict) -> dict:
    """lr_choice.json as {label: {budget index: pick}}; a store written before per-budget sweeps held one pick
    per label ({lr, val_loss, sweep, edge}), chosen at budget 0 and carried to every budget."""
    out = {}
    for label, value in choice.items():
        if isinstance(value, dict) and "lr" in value and "sweep" in value:
            curve = {lr: {"val_loss": v, "seeds": 1, "diverged": 0} for lr, v in value["sweep"].items()}
            out[label] = {"0": {"lr": value["lr"], "val_loss": value["val_loss"], "source": "sweep", "curve": curve,
                                "status": "edge (not extended)" if value.get("edge") else "interior",
                                "budget": "budget 0, carried to every budget"}}
        else:
            out[label] = value
    return out
