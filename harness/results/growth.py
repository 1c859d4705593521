"""The growth-cost tables: is a growth chain worth its compute?

A *group* is every arm that ends at one target shape (a grown entry's model, preset and overrides), with its
references: ``scratch`` (the target shape from scratch, given the chain's total FLOPs) and ``no_growth`` (the
base shape trained for the whole budget). Each arm's *chain curve* is its base runs' validation points followed
by its own, against cumulative training FLOPs (the base run counted), seed by seed.

* **Final loss at equal total FLOPs**: against scratch and against no growth, paired by seed, Holm-corrected
  over every comparison of the matrix's growth tables (the protocol's statistics, ``tables.compare_family``).
* **FLOPs to a common target**: the group's target loss is the worst of every compared run's best point, so
  every arm and every seed reaches it; per seed, the cumulative FLOPs where the chain curve first reaches it
  (linear interpolation between the two evaluations around the crossing). The saving against scratch is
  1 - F_arm / F_scratch per seed (paired by seed), its mean with a 95% percentile bootstrap interval over seeds.
* **Against the frontier**: when the matrix names a compute-optimal frontier (``compare_frontier``: a frontier
  matrix trained on the same data, tokenizer and context), the fitted L*(C) = E + A·C^-α of the arm's own
  architecture at the chain's total compute: a chain is only worth it if it beats the best-sized model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import stats
from .load import Run, Store, load
from .tables import Row, finite_mean, compare_family, human, stat_columns

BOOTSTRAP = 10_000


def target_key(run: Run) -> str:
    overrides = {k: v for k, v in ((run.raw.get("config") or {}).get("model_overrides") or {}).items()
                 if k not in ("vocab_size", "max_seq_len")}
    return json.dumps([run.model, run.preset, overrides], sort_keys=True)


def chain_curve(run: Run, runs_by: dict[tuple[str, int], Run], seed: int | None = None) -> list[tuple[float, float]]:
    """[(cumulative FLOPs, val loss)] of ``run`` preceded by the runs it grew from (same seed; a sweep-grown run
    names its base's seed), in FLOPs order."""
    points = [(float(m.get("cumulative_flops", m.get("flops", 0.0))), float(m["val_loss"])) for m in run.curve
              if m.get("val_loss") is not None and math.isfinite(m["val_loss"])]
    if run.grow:
        base = runs_by.get((run.grow["from"], run.seed if seed is None else seed))
        if base is None:
            return []  # the chain is incomplete: no curve
        before = chain_curve(base, runs_by)
        if not before:
            return []
        # the grown run's first point is its starting loss just after growth (at the base's final compute)
        points = before + [p for p in points if p[0] >= before[-1][0]]
    return sorted(points, key=lambda p: p[0])


def flops_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Cumulative FLOPs where the curve first reaches ``target`` (linear between the evaluations around the
    crossing); None when it never does."""
    for i, (f, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return f
            f0, l0 = curve[i - 1]
            return f0 + (l0 - target) / (l0 - loss) * (f - f0)
    return None


def bootstrap_mean_ci(values: list[float], iters: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% percentile bootstrap interval (resampling the values)."""
    xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if len(xs) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(xs) == 1:
        return float(xs[0]), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, len(xs), size=(iters, len(xs)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(xs.mean()), float(lo), float(hi)


def variant(run: Run) -> str:
    """What a row trains, in the words of the papers (token growth: which of the three inits)."""
    if run.reference == "scratch":
        return "scratch at the target size"
    if run.reference == "no_growth":
        return "no growth: the base size for the whole budget"
    g = run.grow or {}
    name = {"tokens": {"zero": "paper (zero keys, √n changes)", "random": "official (random tokens)",
                       "preserving": "exact (zero keys, √n held)"}.get(g.get("init") or "random"),
            "gstack": "G_stack", "gstack_identity": "G_stack (identity copies)",
            "expand": "LLaMA Pro block expansion",
            "width": "HyperCloning width" + (f" (noise {g['noise']:.3g})" if g.get("noise") else " (pure clone)")
            }.get(g.get("method"), str(g.get("method")))
    if g.get("optimizer") == "staged" and g.get("schedule") == "continue":
        return f"Staged Training: {name}, Adam state scaled, one schedule"
    carried = "Adam state carried" if g.get("optimizer") in ("carry", "staged") else "fresh AdamW"
    sched = "one schedule" if g.get("schedule") == "continue" else "schedule restarted"
    return f"{name}; {carried}, {sched}"


def _frontier_fits(store: Store, runs: list[Run]) -> tuple[dict[str, Any] | None, str]:
    """The named frontier's L*(C) fits per architecture, when it was trained on this matrix's data, tokenizer,
    context and batch; else None and why."""
    name = next((r.raw.get("compare_frontier") for r in runs if r.raw.get("compare_frontier")), None)
    if not name:
        return None, ""
    from . import frontier
    root = Path(runs[0].directory).parent.parent
    fstore = store if any(r.matrix == name for r in store.runs) else (load(root / name) if (root / name).is_dir() else None)
    if fstore is None:
        return None, f"frontier {name}: not in this store"

    def setup(r: Run):
        c = r.raw.get("config") or {}
        data = {k: v for k, v in (c.get("data") or {}).items() if k != "cache_dir"}
        return json.dumps([data, c.get("seq_len"), c.get("batch_size")], sort_keys=True)
    frontier_runs = frontier.frontier_runs(fstore, name)
    if not frontier_runs:
        return None, f"frontier {name}: no runs"
    if {setup(r) for r in frontier_runs} != {setup(runs[0])}:
        return None, f"frontier {name}: trained on other data, tokenizer, context or batch (not comparable)"
    result = frontier.analyse(fstore, name, iters=50)
    if result is None:
        return None, f"frontier {name}: no usable IsoFLOP profile yet"
    budgets = sorted({c for a in result["archs"].values() for c in a["minima"]})
    return {"name": name, "fits": {a: v["fits"].get("loss") for a, v in result["archs"].items()},
            "range": (budgets[0], budgets[-1])}, ""


def section(store: Store, matrix: str) -> tuple[list[str], list[Row]]:
    from ..scaling import loss_at
    runs = store.main(matrix)
    if not any(r.grow for r in runs):
        return [], []
    runs_by = {(r.label, r.seed): r for r in runs}
    by_label: dict[str, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (r.entry_index, r.seed)):
        by_label.setdefault(r.label, []).append(r)
    groups: dict[str, list[str]] = {}
    for label, items in by_label.items():
        if items[0].grow:
            groups.setdefault(target_key(items[0]), []).append(label)
    fits, why = _frontier_fits(store, runs)
    rows: list[Row] = []
    plan = []
    for key, arms in groups.items():
        scratch = [lab for lab, items in by_label.items() if items[0].reference == "scratch"
                   and target_key(items[0]) == key]
        chains = set(arms)
        for lab in arms:  # the stages each arm grew from belong to its chain too
            g = by_label[lab][0].grow
            while g and g["from"] in by_label:
                chains.add(g["from"])
                g = by_label[g["from"]][0].grow
        no_growth = [lab for lab, items in by_label.items() if items[0].reference == "no_growth"
                     and items[0].raw.get("flops_of") in chains]
        compared = arms + scratch + no_growth
        curves = {lab: {r.seed: chain_curve(r, runs_by) for r in by_label[lab]} for lab in compared}
        bests = [min(loss for _, loss in c) for per in curves.values() for c in per.values() if c]
        target = max(bests) if bests else float("nan")
        hits = {lab: {s: flops_to(c, target) for s, c in per.items() if c} for lab, per in curves.items()}
        ref_s = [by_label[scratch[0]]] if scratch else []
        ref_n = [by_label[no_growth[0]]] if no_growth else []
        for lab in compared:
            items = by_label[lab]
            row_s = Row(matrix, "growth", lab, scratch[0] if scratch and lab not in scratch else None,
                        items[0].budget_label, items[0].matching, items, ref_s[0] if ref_s and lab not in scratch else [])
            row_n = (Row(matrix, "growth", lab, no_growth[0], items[0].budget_label, items[0].matching, items,
                         ref_n[0]) if ref_n and lab not in no_growth else None)
            rows += [row_s] + ([row_n] if row_n else [])
            plan.append((key, lab, row_s, row_n))
        plan.append((key, None, {"target": target, "scratch": scratch, "no_growth": no_growth, "hits": hits,
                                 "arms": arms}, None))
    compare_family(rows)

    lines = ["## Growth cost (base run counted)", "",
             "Each table is one target size: every growth arm ending at it, scratch at that size and the base size "
             "trained without growth, all given the same total training FLOPs (the base run counted). Final loss: "
             "against scratch and against no growth, paired by seed, p Holm-corrected over every comparison of "
             "this matrix's growth tables. FLOPs to target: per seed, where the chain's validation curve (base "
             "run included) first reaches the table's common target loss (the worst of every run's best point, so "
             "every arm and seed reaches it), interpolated between evaluations; saving = 1 - FLOPs ÷ scratch's, "
             "paired by seed, mean [95% bootstrap CI over seeds]. Gap: relative logit change on a fixed batch at "
             "growth, and validation loss just before → just after growth."
             + (f" Frontier: the fitted compute-optimal L*(C) of the arm's architecture from `{fits['name']}` at "
                f"the chain's total compute{' (extrapolated outside its budgets when marked)'}." if fits else "")
             + (f" ({why}.)" if why else ""), ""]
    for key, arms_info in _tables(plan):
        info, entries = arms_info
        first = by_label[info["arms"][0]][0]
        total = finite_mean([r.cumulative_flops for lab in info["arms"] for r in by_label[lab]])
        shape = ", ".join(f"{k} {v}" for k, v in json.loads(key)[2].items())
        fit = fits["fits"].get(first.model) if fits else None  # the frontier's entries are architectures
        head = ""
        if fits:  # one value per table (every arm has the table's total compute), so a heading, not a column
            lo, hi = fits["range"]
            head = (f", frontier L*(C) {float(loss_at(fit, total)):.4f}"
                    + ("" if lo <= total <= hi else " (extrapolated)") if fit else ", frontier: no fit")
        lines += [f"### {matrix}: {first.model}/{first.preset}" + (f" ({shape})" if shape else "")
                  + f" at {human(total)} FLOPs, target loss {info['target']:.4f}{head}", ""]
        table = []
        for lab, row_s, row_n in entries:
            items = by_label[lab]
            loss_m, loss_h = stats.mean_ci([r.val_loss for r in items])
            mine = info["hits"].get(lab, {})
            ref_hits = info["hits"].get(info["scratch"][0], {}) if info["scratch"] else {}
            savings = [1 - mine[s] / ref_hits[s] for s in mine if mine[s] and ref_hits.get(s)]
            sm, slo, shi = bootstrap_mean_ci(savings)
            reached = [h for h in mine.values() if h is not None]
            s_cols = stat_columns(row_s)
            n_cols = stat_columns(row_n) if row_n is not None else None
            events = [r.raw.get("growth_event") or {} for r in items]
            gaps = [e["gap"]["rel_logit_change"] for e in events if e.get("gap")]
            before = [e.get("loss_before") for e in events if e.get("loss_before") is not None]
            after = [r.raw.get("init_val_loss") for r in items if r.raw.get("init_val_loss") is not None]
            out = {"entry": lab, "variant": variant(items[0]), "seeds": len(items),
                   "final val loss": stats.fmt_ci(loss_m, loss_h),
                   "Δ vs scratch [95% CI]": s_cols["Δ loss [95% CI]"], "p Holm (scratch)": s_cols["p Holm"],
                   "Δ vs no growth [95% CI]": n_cols["Δ loss [95% CI]"] if n_cols else "-",
                   "p Holm (no growth)": n_cols["p Holm"] if n_cols else "-",
                   "FLOPs to target": (human(finite_mean(reached)) if reached else "not reached")
                   + (f" ({len(reached)}/{len(mine)})" if mine and len(reached) < len(mine) else ""),
                   "saving vs scratch [95% CI]": ("-" if lab in info["scratch"] or not math.isfinite(sm) else
                                                  f"{sm:+.1%}" + (f" [{slo:+.1%}, {shi:+.1%}]"
                                                                  if math.isfinite(slo) else ""))}
            if fits:  # at the row's own compute, which can differ from the table's by a step's rounding
                c = finite_mean([r.cumulative_flops for r in items])
                out["Δ vs frontier"] = f"{loss_m - float(loss_at(fit, c)):+.4f}" if fit else "no fit"
            out["growth gap"] = (f"{finite_mean(gaps):.3g}" + (f"; {finite_mean(before):.3f} → {finite_mean(after):.3f}"
                                                        if before and after else "")) if gaps else "-"
            table.append(out)
        lines += [pd.DataFrame(table).to_markdown(index=False), ""]
    return lines, rows


def _tables(plan):
    """The plan's (key, (group info, [(label, row vs scratch, row vs no growth)])) per target, in order."""
    out: dict[str, list] = {}
    infos = {}
    for key, lab, a, b in plan:
        if lab is None:
            infos[key] = a
        else:
            out.setdefault(key, []).append((lab, a, b))
    return [(key, (infos[key], entries)) for key, entries in out.items()]
