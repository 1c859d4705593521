"""Learning-rate sweeps that cannot hand a baseline a bad learning rate.

A matrix's ``lr_sweep`` tunes the peak LR of every entry *at every budget* (the optimum moves with compute:
a rate carried from the smallest budget to a 9x larger one is a different, untuned baseline). The grid is
geometric; when the best point is at either end the sweep extends itself one point at a time in that direction
until the optimum is interior or a bound written in the matrix stops it, and such a cell is flagged. A matrix
may instead sweep two or more budgets and interpolate the rest with a fitted power law lr*(C) = a·C^b. Sweep
seeds are disjoint from evaluation seeds: a run that won the sweep is never also one of the seeds reported.

    lr_sweep:
      center: 5.0e-3          # a geometric grid around this rate (or values: [...], geometric)
      ratio: 2                # default 2
      points: 5               # default 5, at least 5
      bounds: [1.0e-4, 1.0e-1]   # required: extension stops here
      seeds: [1000]           # default [1000]; must not overlap the matrix's seeds
      budgets: all            # default; or >= 2 budget indices, the others get a·C^b from their optima
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .config import ConfigError

KEYS = ("center", "values", "ratio", "points", "bounds", "seeds", "budgets")
MIN_POINTS = 5
DEFAULT_RATIO = 2.0
DEFAULT_SEEDS = [1000]
REL_TOL = 1e-6  # two rates closer than this (relatively) are the same grid point


@dataclass
class SweepSpec:
    grid: list[float]            # the initial grid, ascending
    ratio: float
    bounds: tuple[float, float]
    seeds: list[int]
    budgets: list[int] | None    # None: every budget is swept

    def swept(self, n_budgets: int) -> list[int]:
        return list(range(n_budgets)) if self.budgets is None else list(self.budgets)


def _number(value, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def parse(raw: Any, n_budgets: int, eval_seeds: Sequence[int], where: str) -> SweepSpec:
    """Validate a matrix's ``lr_sweep`` (``where`` prefixes every message, which names the field)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: lr_sweep must be a mapping ({', '.join(KEYS)})")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        hint = " (the sweep runs at every budget; use budgets: [i, j] to fit a power law)" if "budget" in unknown else ""
        raise ConfigError(f"{where}: lr_sweep.{unknown[0]}: unknown key (valid: {', '.join(KEYS)}){hint}")
    if "bounds" not in raw:
        raise ConfigError(f"{where}: lr_sweep.bounds: required ([low, high]: where a self-extending sweep stops)")
    bounds = raw["bounds"]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(f"{where}: lr_sweep.bounds: expected [low, high], got {bounds!r}")
    lo, hi = (_number(b, f"{where}: lr_sweep.bounds") for b in bounds)
    if not lo < hi:
        raise ConfigError(f"{where}: lr_sweep.bounds: low {lo:g} must be below high {hi:g}")
    if "values" in raw and ("center" in raw or "points" in raw):
        raise ConfigError(f"{where}: lr_sweep.values: give either values or center (+ points), not both")
    if "values" in raw:
        values = raw["values"]
        if not isinstance(values, list):
            raise ConfigError(f"{where}: lr_sweep.values: expected a list of learning rates")
        grid = sorted(_number(v, f"{where}: lr_sweep.values") for v in values)
        if len(grid) < MIN_POINTS:
            raise ConfigError(f"{where}: lr_sweep.values: a grid needs at least {MIN_POINTS} points, got {len(grid)}")
        ratios = [b / a for a, b in zip(grid, grid[1:])]
        if min(ratios) <= 1 or max(ratios) / min(ratios) > 1 + 1e-3:
            raise ConfigError(f"{where}: lr_sweep.values: not a geometric grid (ratios "
                              + ", ".join(f"{r:.3g}" for r in ratios) + ")")
        ratio = float(raw.get("ratio", ratios[0]))
        if abs(ratio / ratios[0] - 1) > 1e-3:
            raise ConfigError(f"{where}: lr_sweep.ratio: {ratio:g} disagrees with the values' ratio {ratios[0]:.4g}")
    else:
        if "center" not in raw:
            raise ConfigError(f"{where}: lr_sweep.center: required (or give values)")
        center = _number(raw["center"], f"{where}: lr_sweep.center")
        ratio = _number(raw.get("ratio", DEFAULT_RATIO), f"{where}: lr_sweep.ratio")
        if ratio <= 1:
            raise ConfigError(f"{where}: lr_sweep.ratio: must be > 1, got {ratio:g}")
        points = raw.get("points", MIN_POINTS)
        if not isinstance(points, int) or isinstance(points, bool) or points < MIN_POINTS:
            raise ConfigError(f"{where}: lr_sweep.points: a grid needs at least {MIN_POINTS} points, got {points!r}")
        grid = [center * ratio ** (i - (points - 1) / 2) for i in range(points)]
    if grid[0] < lo * (1 - REL_TOL) or grid[-1] > hi * (1 + REL_TOL):
        raise ConfigError(f"{where}: lr_sweep.bounds: the grid {grid[0]:.3g}..{grid[-1]:.3g} is not inside "
                          f"[{lo:g}, {hi:g}]")
    seeds = raw.get("seeds", DEFAULT_SEEDS)
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: lr_sweep.seeds: expected a non-empty list of integers")
    shared = sorted(set(seeds) & set(eval_seeds))
    if shared:
        raise ConfigError(f"{where}: lr_sweep.seeds: seed {shared[0]} is also an evaluation seed; sweep seeds "
                          f"must be disjoint from seeds (a sweep winner must not count as an evaluation run)")
    budgets = raw.get("budgets", "all")
    if budgets == "all":
        budgets = None
    else:
        if (not isinstance(budgets, list) or len(budgets) < 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n_budgets for b in budgets)
                or len(set(budgets)) != len(budgets)):
            raise ConfigError(f"{where}: lr_sweep.budgets: 'all' or a list of at least 2 distinct budget indices "
                              f"(0..{n_budgets - 1}) for the power-law fit, got {budgets!r}")
        budgets = sorted(budgets)
        if len(budgets) == n_budgets:
            budgets = None
    return SweepSpec(grid, ratio, (lo, hi), list(seeds), budgets)


def same(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def choose(curve: dict[float, float], spec: SweepSpec) -> dict[str, Any]:
    """The best rate of one (entry, budget) from its sweep points ``{lr: mean final val loss}`` (inf for a
    diverged run) and what to do next: ``next`` is the rate to add (best at an end, bound not hit) or None.
    ``status``: interior | extending | at_bound (best at an end whose next point would cross the bound)."""
    finite = {lr: v for lr, v in curve.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("every sweep point diverged or failed")
    lrs = sorted(curve)
    best = min(finite, key=lambda lr: (finite[lr], lr))
    out: dict[str, Any] = {"lr": best, "val_loss": finite[best], "next": None, "status": "interior"}
    lo, hi = spec.bounds
    if len(lrs) >= 2 and best in (lrs[0], lrs[-1]):
        nxt = best * spec.ratio if best == lrs[-1] else best / spec.ratio
        if nxt < lo * (1 - REL_TOL) or nxt > hi * (1 + REL_TOL):
            out["status"] = "at_bound"
        else:
            out["status"], out["next"] = "extending", nxt
    return out


def fit_power_law(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Least-squares fit of log lr = log a + b·log C over ``(C, lr)`` points (at least 2): a, b and, per
    point, the fitted rate and the residual in log10."""
    if len(points) < 2:
        raise ValueError("a power-law fit needs at least two budgets")
    xs = [math.log(c) for c, _ in points]
    ys = [math.log(lr) for _, lr in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a power-law fit needs budgets of different compute")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = math.exp(my - b * mx)
    rows = [{"compute": c, "lr": lr, "fit": a * c ** b, "residual_log10": math.log10(lr / (a * c ** b))}
            for c, lr in points]
    return {"a": a, "b": b, "points": rows}


def predict(fit: dict[str, Any], compute: float, bounds: tuple[float, float]) -> tuple[float, bool]:
    """a·C^b, clipped to the bounds; (rate, whether it was clipped)."""
    lr = fit["a"] * compute ** fit["b"]
    clipped = min(max(lr, bounds[0]), bounds[1])
    return clipped, clipped != lr


def fit_lr_surface(points: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    """Least-squares fit of log lr = log a + b·log N + c·log C over ``(N, C, lr)`` sweep optima (one
    architecture, several sizes and budgets). A factor with one value among the points (or too few points to
    fit it) is left out, its exponent 0: with one point the fit is that point's rate."""
    import numpy as np
    n = np.log([p[0] for p in points])
    c = np.log([p[1] for p in points])
    y = np.log([p[2] for p in points])
    cols, names = [np.ones_like(y)], ["log_a"]
    for name, x in (("b_params", n), ("c_compute", c)):
        if np.ptp(x) > 1e-9 and len(points) > len(cols):
            cols.append(x)
            names.append(name)
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)
    fit = dict(zip(names, (float(v) for v in coef)))
    out = {"a": math.exp(fit["log_a"]), "b_params": fit.get("b_params", 0.0), "c_compute": fit.get("c_compute", 0.0)}
    out["points"] = [{"params": float(p[0]), "compute": float(p[1]), "lr": float(p[2]),
                      "fit": out["a"] * p[0] ** out["b_params"] * p[1] ** out["c_compute"]} for p in points]
    for row in out["points"]:
        row["residual_log10"] = math.log10(row["lr"] / row["fit"])
    return out


def predict_surface(fit: dict[str, Any], params: float, compute: float,
                    bounds: tuple[float, float]) -> tuple[float, bool]:
    """a·N^b·C^c, clipped to the bounds; (rate, whether it was clipped)."""
    lr = fit["a"] * params ** fit["b_params"] * compute ** fit["c_compute"]
    clipped = min(max(lr, bounds[0]), bounds[1])
    return clipped, clipped != lr
