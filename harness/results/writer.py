"""report.md, its plots and verdicts.json from a results store (``harness report``, and after every
``harness run``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import stats
from .. import store as _store
from . import frontier, growth, plots, tables
from .load import EARLIER_VERDICTS, Store, load

VERDICTS = "verdicts.json"


def _data_note(store: Store) -> list[str]:
    """What the validation split holds, per source, beside each source's share of the training bytes."""
    runs = store.main()
    if not runs:
        return []
    r = max(runs, key=lambda x: len(x.val_sources))
    train = ((r.raw.get("dataset") or {}).get("train") or {}).get("source_bytes") or {}
    if not r.val_sources:
        return []
    total = sum(train.values())
    parts = []
    for s, m in sorted(r.val_sources.items()):
        share = f"{train[s] / total:.0%} of training bytes, " if total and s in train else ""
        parts.append(f"{s}: {share}{m['tokens']:,} validation tokens scored")
    return ["Validation: the whole split at the end of every run (" + "; ".join(parts) + "); intermediate points "
            "of the curves use evenly spread subsets.", ""]


def _counts(values) -> str:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return "; ".join(f"{k} ({n})" if len(out) > 1 else k for k, n in sorted(out.items(), key=lambda kv: -kv[1]))


def provenance_section(store: Store, root: Path) -> list[str]:
    """Where the numbers come from: the code revisions that trained the records, the libraries and hardware
    they ran on, the commands that reproduce them, and the revision that wrote this report."""
    runs = store.runs
    env = [r.raw.get("environment") or {} for r in runs]
    hardware = [f"{e.get('gpu') or 'CPU'} x{r.raw.get('world_size') or 1}, {e.get('cpu_count', '?')} cores, "
                f"{e.get('torch_threads', '?')} torch threads, {e.get('platform', '?')}" for e, r in zip(env, runs)]
    libs = [", ".join(f"{k} {v}" for k, v in sorted((r.raw.get("versions") or {}).items())) or "not recorded"
            for r in runs]
    sources = {r.matrix: r.raw.get("matrix_source") for r in runs if r.matrix}
    short = lambda rev: (rev[:12] + ("-dirty" if rev.endswith("-dirty") else "")) if rev else "not recorded"
    out = ["## Provenance", "",
           f"- Report: `harness report {root}` at revision {short(_store.git_revision())}.",
           f"- Records trained at revision: {_counts(short(r.raw.get('git_revision')) for r in runs)}.",
           f"- Libraries: {_counts(libs)}; Python {_counts(e.get('python', '?') for e in env)}.",
           f"- Hardware: {_counts(hardware)}.",
           f"- Precision: {_counts(r.precision or '?' for r in runs)}."]
    for matrix, source in sorted(sources.items()):
        name = Path(source).stem if source else matrix
        out.append(f"- `{matrix}`: `harness run {name} --out {root.parent if root.name == matrix else root}` "
                   f"(matrix file {Path(source).name if source else 'unknown'}; complete cells are skipped, "
                   f"so this re-trains nothing that is already here).")
    return out + [""]


def legacy_verdicts(store: Store) -> list[dict[str, Any]]:
    """The verdicts the report printed before the paired/Holm protocol: Welch's t-test, uncorrected, for the
    same comparisons (matched compute against the tokenformer entry per budget; each rung against its vs)."""
    out = []
    for matrix in store.matrices:
        for rows in (tables.matched_compute_rows(store, matrix), tables.waterfall_rows(store, matrix)):
            for r in rows:
                if not r.ref_runs:
                    continue
                cand, ref = [x.val_loss for x in r.runs], [x.val_loss for x in r.ref_runs]
                verdict, p = stats.verdict(cand, ref)
                out.append({**r.key, "verdict": verdict, "p": p, "delta": sum(cand) / len(cand) - sum(ref) / len(ref),
                            "seeds": sorted(x.seed for x in r.runs), "method": "Welch, uncorrected"})
    return out


def write_earlier_verdicts(root: str | Path, out: str | Path, description: str) -> Path:
    """Snapshot an (older) store's verdicts as its report printed them, for a later report to diff against."""
    verdicts = legacy_verdicts(load(root))
    if not verdicts:
        raise FileNotFoundError(f"{root}: no comparisons to snapshot")
    _store.write_json_atomic(Path(out), {"description": description, "verdicts": verdicts})
    return Path(out)


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """report.md (sections per matrix: waterfall, matched compute, growth cost, learning-rate sweeps, then
    zero-shot, every cell and the changed verdicts), its PNG plots and verdicts.json, in out_dir (default:
    root)."""
    root = Path(root)
    out_dir = Path(out_dir or root)
    store = load(root)
    if not store.runs:
        raise FileNotFoundError(f"{root}: no result records found")
    out_dir.mkdir(parents=True, exist_ok=True)
    many = len(store.matrices) > 1

    def plot_name(matrix: str, name: str) -> str:
        return f"{matrix}-{name}" if many else name

    lines = ["# Results", "", f"Generated by `harness report {root}` from {len(store.runs)} record(s) "
             f"({sum(r.phase == 'main' for r in store.runs)} evaluation runs, "
             f"{sum(r.phase == 'sweep' for r in store.runs)} sweep runs).", ""]
    lines += _data_note(store)
    lines += provenance_section(store, root)
    lines += tables.flagged_section(store)
    verdicts: list[dict[str, Any]] = []
    for matrix in store.matrices:
        section, rows = tables.waterfall_section(store, matrix)
        if rows:
            name = plot_name(matrix, plots.WATERFALL_PLOT)
            plots.waterfall(store.frame().query("phase == 'main' and waterfall and matrix == @matrix and status == 'complete'"),
                            out_dir / name)
            lines += section + [f"![validation loss per rung]({name})", ""]
        verdicts += tables.verdict_records(rows)
        section, result = frontier.section(store, matrix, out_dir, plot_name)
        if result is not None:
            lines += section
            frontier.write_headline(result, matrix, out_dir if not many else out_dir / matrix)
        section, rows = tables.matched_compute_section(store, matrix)
        if rows:
            lines += section
            if len({r.budget for r in rows}) > 1:
                name = plot_name(matrix, plots.FRONTIER_PLOT)
                df = store.frame().query("phase == 'main' and not waterfall and matrix == @matrix and status == 'complete'")
                plots.frontier(df, out_dir / name)
                lines += [f"![final loss per budget]({name})", ""]
        verdicts += tables.verdict_records(rows)
        section, rows = growth.section(store, matrix)
        if rows:
            name = plot_name(matrix, plots.GROWTH_PLOT)
            curves = store.curves()
            plots.growth(curves[(curves["matrix"] == matrix) & (curves["phase"] == "main")], out_dir / name)
            lines += section + [f"![validation loss against cumulative FLOPs]({name})", ""]
        verdicts += tables.verdict_records(rows)
        lines += tables.by_source_section(store, matrix)
        section = tables.sweep_section(store, matrix)
        if section:
            name = plot_name(matrix, plots.SWEEP_PLOT)
            if plots.lr_sweeps(store.lr_choice[matrix], out_dir / name):
                section += [f"![loss against peak learning rate]({name})", ""]
            lines += section
        lines += tables.changed_verdicts_section(store.earlier.get(matrix),
                                                 [v for v in verdicts if v["matrix"] == matrix])
    lines += tables.zero_shot_section(store)
    lines += tables.every_cell_section(store)
    if plots.loss_vs_flops(store, out_dir / plots.LOSS_PLOT):
        lines += [f"![validation loss against training FLOPs]({plots.LOSS_PLOT})", ""]
    lines += ["Columns: params count tied weights once; train FLOPs = steps x tokens/step x the model's "
              "flops_per_token (training, 3 x forward); bits/byte = validation loss (nats/token) x tokens/bytes of "
              "the validation split (of that source, for a per-source column) / ln 2.", ""]
    _store.write_json_atomic(out_dir / VERDICTS, verdicts)
    path = out_dir / "report.md"
    _store.write_text_atomic(path, "\n".join(lines))
    return path


__all__ = ["write_report", "write_earlier_verdicts", "legacy_verdicts", "EARLIER_VERDICTS"]
