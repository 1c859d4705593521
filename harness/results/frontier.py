"""The compute-optimal frontier section of a report: IsoFLOP minima, fitted scaling laws, the compute
multiplier against the reference architecture, and their plots. Every number comes from harness.scaling
applied to the records of a frontier matrix (cells that carry a ladder ``rung``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import scaling
from .load import Run, Store
from .tables import human

FIT_PLOT = "frontier_fit.png"
PROFILES_PLOT = "isoflop_profiles.png"
HEADLINE = "headline.md"
BOOTSTRAP_ITERS = 1000


def frontier_runs(store: Store, matrix: str) -> list[Run]:
    return [r for r in store.main(matrix) if r.raw.get("rung")]


def _plan(runs: list[Run]) -> dict[str, Any]:
    path = Path(runs[0].directory).parent / "frontier.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def profiles(runs: list[Run], plans: dict[str, Any] | None = None) -> tuple[list[scaling.Profiles], dict[str, Any]]:
    """One Profiles per architecture from the complete runs; a (size, budget) enters only with every seed the
    matrix trained there complete (its seeds then line up with every other size's), and, when ``plans``
    (frontier.json) is given, only budgets whose plan is final (a budget still running may not have its
    edge sizes yet). Returns the profiles and what was left out."""
    by: dict[tuple, dict[int, float]] = {}
    tokens: dict[tuple, list[float]] = {}
    final = None
    if plans is not None:
        final = {(a, float(p["budget"]["flops"])) for a, per in plans.items() for p in per.values()}
    pending = set()
    for r in runs:
        key = (r.raw.get("arch") or r.model, float(r.raw["budget"]["flops"]))
        if final is not None and key not in final:
            pending.add(key)
            continue
        key = (r.raw.get("arch") or r.model, float(r.raw["budget"]["flops"]), float(r.raw["rung"]["params"]))
        by.setdefault(key, {})[r.seed] = r.val_loss
        tokens.setdefault(key, []).append(r.tokens)
    n_seeds = max((len(v) for v in by.values()), default=0)
    out: dict[str, scaling.Profiles] = {}
    left_out = []
    for (arch, c, n), per_seed in sorted(by.items()):
        if len(per_seed) < n_seeds:
            left_out.append({"arch": arch, "compute": c, "params": n, "seeds": len(per_seed)})
            continue
        p = out.setdefault(arch, scaling.Profiles(arch, {}, {}))
        p.losses.setdefault(c, {})[n] = np.array([per_seed[s] for s in sorted(per_seed)], float)
        p.tokens.setdefault(c, {})[n] = float(np.mean(tokens[(arch, c, n)]))
    return list(out.values()), {"left_out": left_out, "seeds": n_seeds, "pending": sorted(pending)}


def analyse(store: Store, matrix: str, iters: int = BOOTSTRAP_ITERS) -> dict[str, Any] | None:
    runs = frontier_runs(store, matrix)
    if not runs:
        return None
    plan = _plan(runs)
    profs, info = profiles(runs, plan.get("plans", {}))
    reference = (plan.get("spec") or {}).get("reference")
    usable = [p for p in profs if p.budgets]
    if not usable:
        return None
    result = scaling.analyse(usable, reference if reference in {p.arch for p in usable} else None, iters=iters)
    result.update(info)
    result["plan"] = plan
    result["profiles"] = usable
    result["runs"] = runs
    # what the matrix still owes: every (entry, budget) without a final plan, and entries with no run at all
    budgets = [float(b["flops"]) for b in (plan.get("spec") or {}).get("budgets", [])]
    final = {(a, float(p["budget"]["flops"])) for a, per in plan.get("plans", {}).items() for p in per.values()}
    archs = sorted({r.raw.get("arch") or r.model for r in store.runs if r.matrix == matrix and r.raw.get("rung")}
                   | set((plan.get("spec") or {}).get("entries", [])))
    result["unfinished"] = [(a, c) for a in archs for c in budgets if (a, c) not in final]
    return result


def _ci(ci, fmt="{:.3g}") -> str:
    if not ci:
        return "n/a"
    return "[" + ", ".join("∞" if not math.isfinite(v) else fmt.format(v) for v in ci) + "]"


def _mult(value) -> str:
    if value is None:
        return "n/a"
    return "never (below its fitted E)" if not math.isfinite(value) else f"{value:.2f}×"


def headline(result: dict[str, Any], matrix: str) -> list[str]:
    """The compute-multiplier table: what README and the report lead with."""
    ref = result["reference"]
    if ref is None:
        wanted = (result["plan"].get("spec") or {}).get("reference")
        return [f"**Compute multiplier** ({matrix}): not available yet — the reference architecture "
                f"{wanted or '(none named)'} has no finished IsoFLOP profile in this store.", ""]
    archs = [a for a in result["archs"] if a != ref]
    budgets = sorted(c for c, m in result["archs"][ref]["minima"].items() if m["usable"])
    if not budgets:
        return [f"**Compute multiplier against {ref}** ({matrix}): not available yet — no budget has an "
                f"interior {ref} minimum.", ""]
    lo, hi = result["cross_range"]
    rows = []
    for a in archs:
        info = result["archs"][a]
        row = {"architecture": a}
        for c in budgets:
            m = info.get("multiplier", {}).get(c)
            row[f"C = {c:.2g}"] = ("n/a" if m is None or m["multiplier"] is None else
                                   f"{_mult(m['multiplier'])} {_ci(m['ci'], '{:.3g}')}")
        cross = info.get("crossing") or {}
        share = (f"; {cross['share_crossing']:.0%} of {cross['replicates']} replicates cross"
                 if cross.get("share_crossing") is not None else "")
        if not cross.get("fitted"):
            row["fitted curves cross"] = "n/a (no L*(C) fit for both)"
        elif cross.get("compute"):
            row["fitted curves cross"] = (f"at {cross['compute']:.2g} FLOPs {_ci(cross.get('ci'))}"
                                          + (" (extrapolated past the budgets)" if cross.get("extrapolated") else "")
                                          + share)
        else:
            row["fitted curves cross"] = f"no crossing in {lo:.2g}–{hi:.2g}{share}"
        rows.append(row)
    return [f"**Compute multiplier against {ref}** ({matrix}): the training compute each architecture, at its "
            f"compute-optimal size, needs to reach {ref}'s compute-optimal loss at each measured budget, as a "
            f"multiple of that budget (< 1×: less compute than {ref}). From each architecture's fitted "
            f"L*(C) = E + A·C^-α; 95% bootstrap interval over evaluation seeds and budgets "
            f"({result['iters']} replicates).", "", pd.DataFrame(rows).to_markdown(index=False), ""]


def section(store: Store, matrix: str, out_dir: Path, plot_name) -> tuple[list[str], dict[str, Any] | None]:
    result = analyse(store, matrix)
    if result is None:
        return [], None
    plan = result["plan"].get("plans", {})
    lines = ["## Compute-optimal frontier", "",
             "Each architecture at the sizes of its own ladder (`harness models --ladder NAME`) nearest its "
             "predicted compute-optimal size at every budget, more sizes added past an edge minimum "
             "(harness.frontier); N = parameters (tied embeddings once), D = training tokens.", ""]
    if result.get("unfinished"):
        lines += [f"**This matrix is not complete** ({len(result['unfinished'])} (architecture, budget) profiles "
                  "still to finish, listed below the fits): every number here is provisional.", ""]
    lines += headline(result, matrix)
    # per-budget minima
    rows = []
    for a, info in result["archs"].items():
        for c, m in sorted(info["minima"].items()):
            bi = next((k for k, v in plan.get(a, {}).items() if float(v["budget"]["flops"]) == c), None)
            p = plan.get(a, {}).get(bi, {}) if bi is not None else {}
            sizes = sorted(next(pr for pr in result["profiles"] if pr.arch == a).losses[c])
            rows.append({"architecture": a, "budget": f"{c:.2g}", "sizes": ", ".join(human(n) for n in sizes),
                         "profile": p.get("status", "-"), "best size (envelope)":
                         f"{human(m['env_n'])}: {m['env_loss']:.4f}",
                         "N_opt [95% CI]": _n_opt(m, sizes),
                         "L_opt [95% CI]": f"{m['l_opt']:.4f} {_ci(m['l_ci'], '{:.4f}')}",
                         "method": m["method"] + ("" if m["usable"] else " (not fitted)"),
                         "D_opt": human(m["d_opt"]),
                         "tokens/param": f"{m['d_opt'] / m['n_opt']:.3g}"})
    lines += ["### IsoFLOP minima", "",
              "Per budget: a parabola in log N through every seed's final loss at the best size and its two "
              "neighbours (Chinchilla's Approach 2, fitted locally: a profile spanning many sizes is not a parabola); "
              "'envelope' where the best size is at an end of the profile (it then stands in). Intervals: bootstrap over the evaluation seeds (with 3 seeds close to "
              "their range). 'profile': interior = the lowest mean loss is not at an end of the sizes trained; "
              "ladder_end / epoch_limit = it is, and no further size exists or fits in one epoch. A minimum whose "
              "best size is at an end, or with fewer than 3 sizes, bounds the optimum rather than locating it: it is "
              "left out of the fits below and of the compute multiplier ('not fitted').", "",
              pd.DataFrame(rows).to_markdown(index=False), ""]
    # fits
    rows = []
    for a, info in result["archs"].items():
        f = info["fits"]
        lf = f.get("loss")
        rows.append({"architecture": a,
                     "E [95% CI]": f"{lf['E']:.3f} {_ci(lf['E_ci'], '{:.3f}')}" if lf else "n/a",
                     "A": f"{lf['A']:.3g}" if lf else "n/a",
                     "α [95% CI]": f"{lf['alpha']:.3f} {_ci(lf['alpha_ci'], '{:.3f}')}" if lf else "n/a",
                     "N* ∝ C^b [95% CI]": f"{f['n']['b']:.3f} {_ci(f['n']['b_ci'], '{:.3f}')}" if "n" in f else "n/a",
                     "D* ∝ C^b [95% CI]": f"{f['d']['b']:.3f} {_ci(f['d']['b_ci'], '{:.3f}')}" if "d" in f else "n/a",
                     "replicates that fit": lf["replicates"] if lf else 0})
    lines += ["### Fitted scaling laws", "",
              "L*(C) = E + A·C^-α through the per-budget minima (least squares in loss; E bounded by the lowest "
              "loss), N*(C) and D*(C) power laws through the optimal sizes and token counts. Intervals: bootstrap "
              "over evaluation seeds *and* budgets (a replicate with fewer than three distinct budgets cannot fit "
              "L*(C) and is dropped; the count is shown). Chinchilla's exponents for reference: N* ∝ C^0.50, "
              "D* ∝ C^0.50 (Approach 2).", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    unfinished = result.get("unfinished") or []
    if unfinished:
        lines += ["**Incomplete matrix.** Not finished yet (left out of every fit and of the multiplier until "
                  "their budget's plan is final): " + ", ".join(f"{a} @ {c:.2g}" for a, c in unfinished) + ".", ""]
    left = result["left_out"]
    if left:
        lines += [f"Left out of the fits: {len(left)} (size, budget) profile point(s) without all "
                  f"{result['seeds']} seeds complete.", ""]
    max_epochs = max((r.raw.get("epochs") or _epochs(r) or 0) for r in result["runs"])
    lines += [f"Largest fraction of the training split any run read: {max_epochs:.2f} epochs. N counts every "
              "parameter once (tied embeddings included: their rows are also the output head, whose FLOPs C "
              "counts), all rows of the model's vocabulary, whether or not the tokenizer uses them.", ""]
    name = plot_name(matrix, FIT_PLOT)
    fit_plot(result, out_dir / name)
    lines += [f"![loss against compute, fitted frontiers]({name})", ""]
    name = plot_name(matrix, PROFILES_PLOT)
    profiles_plot(result, out_dir / name)
    lines += [f"![IsoFLOP profiles]({name})", ""]
    return lines, result


def _n_opt(m: dict[str, Any], sizes: list[float]) -> str:
    if m["method"] == "envelope" and m["edge"]:
        side = "≤" if m["env_n"] == sizes[0] else "≥"
        return f"{side} {human(m['env_n'])} (best size at an end)"
    return f"{human(m['n_opt'])} {_ci(m['n_ci'], '{:.3g}')}"


def _epochs(r: Run) -> float | None:
    train = ((r.raw.get("dataset") or {}).get("train") or {}).get("n_tokens")
    return r.tokens / train if train and r.tokens else None


def _plt():
    from .plots import pyplot  # lazily: matplotlib only when a plot is drawn
    return pyplot()


def fit_plot(result: dict[str, Any], path: Path) -> None:
    """Loss against training FLOPs: every run a faint point, each budget's minimum a marker, the fitted L*(C)
    with its 95% bootstrap band."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(result["archs"], sns.color_palette(n_colors=len(result["archs"]))))
    for r in result["runs"]:
        a = r.raw.get("arch") or r.model
        if a in colours:
            ax.scatter(r.flops, r.val_loss, s=8, alpha=0.2, color=colours[a], linewidths=0)
    for a, info in result["archs"].items():
        cs = sorted(info["minima"])
        ax.scatter(cs, [info["minima"][c]["l_opt"] for c in cs], s=40, color=colours[a], marker="D",
                   edgecolors="black", linewidths=0.5, zorder=3, label=f"{a}: IsoFLOP minima")
        lf = info["fits"].get("loss")
        if lf:
            grid = np.geomspace(cs[0], cs[-1], 60)
            ax.plot(grid, scaling.loss_at(lf, grid), color=colours[a],
                    label=f"{a}: {lf['E']:.2f} + {lf['A']:.3g}·C^-{lf['alpha']:.3f}")
            band = lf.get("band") or {}
            if band.get("lo"):
                ax.fill_between(band["compute"], band["lo"], band["hi"], color=colours[a], alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Compute-optimal frontiers (band: 95% bootstrap over seeds and budgets)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profiles_plot(result: dict[str, Any], path: Path) -> None:
    """IsoFLOP profiles as small multiples: one panel per budget, loss against parameters per architecture
    (every seed a faint point, the mean a marker, the parabola where it is used)."""
    plt, sns = _plt()
    budgets = sorted({c for p in result["profiles"] for c in p.budgets})
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.6 * len(budgets), 3.6), squeeze=False)
    colours = dict(zip(result["archs"], sns.color_palette(n_colors=len(result["archs"]))))
    for ax, c in zip(axes[0], budgets):
        for p in result["profiles"]:
            if c not in p.losses:
                continue
            ns = sorted(p.losses[c])
            for n in ns:
                ax.scatter([n] * len(p.losses[c][n]), p.losses[c][n], s=6, alpha=0.3, color=colours[p.arch])
            ax.plot(ns, [p.losses[c][n].mean() for n in ns], "o", color=colours[p.arch], ms=4, label=p.arch)
            m = result["archs"][p.arch]["minima"].get(c)
            if m and m["method"] == "parabola":  # drawn over the three sizes it was fitted to
                i = ns.index(m["env_n"])
                grid = np.linspace(np.log(ns[i - 1]), np.log(ns[i + 1]), 50)
                ax.plot(np.exp(grid), np.polyval(m["coef"], grid), color=colours[p.arch], lw=1)
                ax.axvline(m["n_opt"], color=colours[p.arch], lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"C = {c:.2g} FLOPs", fontsize=9)
        ax.set_xlabel("parameters")
    axes[0][0].set_ylabel("final validation loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_headline(result: dict[str, Any], matrix: str, out_dir: Path) -> Path:
    from .. import store as _store
    path = out_dir / HEADLINE
    _store.write_text_atomic(path, "\n".join(headline(result, matrix)))
    return path


def check_readme(readme: Path, matrix: str) -> None:
    """Raise (one line naming the file) unless README has the block update_readme replaces."""
    start, end = f"<!-- frontier:{matrix} -->", f"<!-- /frontier:{matrix} -->"
    if not readme.is_file():
        raise ValueError(f"{readme}: no such file")
    body = readme.read_text()
    if start not in body or end not in body:
        raise ValueError(f"{readme}: no {start} ... {end} block to update")


def update_readme(readme: Path, matrix: str, text: str) -> None:
    """Replace the block between ``<!-- frontier:MATRIX -->`` and ``<!-- /frontier:MATRIX -->`` in README."""
    from .. import store as _store
    start, end = f"<!-- frontier:{matrix} -->", f"<!-- /frontier:{matrix} -->"
    body = readme.read_text()
    if start not in body or end not in body:
        raise ValueError(f"{readme}: no {start} ... {end} block to update")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    _store.write_text_atomic(readme, f"{head}{start}\n{text.strip()}\n{end}{tail}")
