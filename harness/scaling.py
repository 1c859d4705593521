"""Scaling-law fits of IsoFLOP profiles, with bootstrap uncertainty, and the compute multiplier.

* IsoFLOP minimum at one budget (Chinchilla's Approach 2, Hoffmann et al. 2203.15556 §3.2): a parabola in
  log N through the final losses of the sizes trained at that compute; its vertex is N_opt and L_opt when
  the parabola is convex and the vertex lies inside the sizes trained. The direct lower envelope (the best
  size trained) is reported beside it and used where the parabola is not usable.
* Over budgets: L*(C) = E + A·C^(-alpha) through the per-budget minima (least squares in loss), and power
  laws N*(C) = a·C^b and D*(C) = a'·C^b' through the optimal sizes and token counts.
* Uncertainty: a bootstrap that resamples evaluation seeds inside every (size, budget) -- the same resampled
  seed indices for every size of a budget, since seeds share the data order -- and, for the fits over
  budgets, resamples the budgets too. Intervals are percentile intervals of the replicates that fit.
* The compute multiplier of an architecture against a reference: at each measured budget C, the compute
  the architecture's fitted L*(C) needs to reach the reference's frontier loss there, divided by C (< 1: it
  needs less compute than the reference). And where the two fitted curves cross, if they do in range.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CI = 0.95
NO_FIT = object()  # a bootstrap replicate in which a fit needed for the statistic failed
ALPHA_MIN = 1e-4   # the fit's lower bound on alpha; a fit that ends there is flat


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """y = a·x^b by least squares in log-log; (a, b). The sweep's fitter (harness.sweep.fit_power_law)."""
    from .sweep import fit_power_law as fit
    f = fit(list(zip(xs, ys)))
    return f["a"], f["b"]


def isoflop_minimum(ns: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """The minimum of one IsoFLOP profile from ``(N, loss)`` points (several per N allowed: seeds): the vertex
    of the parabola in log N through the best size and its two neighbours, or the best size itself where it is
    at an end of the profile ("envelope", "edge": the optimum lies outside the sizes trained).

    Returns n_opt, l_opt, method ("parabola" or "envelope"), interior (the vertex inside the sizes trained),
    and the envelope's n / loss (the best size's mean)."""
    ns, losses = np.asarray(ns, float), np.asarray(losses, float)
    sizes = np.unique(ns)
    means = np.array([losses[ns == n].mean() for n in sizes])
    best = int(np.argmin(means))
    out = {"env_n": float(sizes[best]), "env_loss": float(means[best]), "sizes": len(sizes),
           "edge": best in (0, len(sizes) - 1)}
    if len(sizes) >= 3 and not out["edge"]:
        # the parabola through the best size and its two neighbours only: a profile over a wide range of sizes
        # is not a parabola in log N, and one fitted to all of it can put its vertex above the best loss measured
        near = np.isin(ns, sizes[best - 1:best + 2])
        x = np.log(ns[near])
        c2, c1, c0 = np.polyfit(x, losses[near], 2)
        if c2 > 0:
            xv = -c1 / (2 * c2)
            inside = bool(np.log(sizes[best - 1]) <= xv <= np.log(sizes[best + 1]))
            if inside:
                return {**out, "n_opt": float(math.exp(xv)), "l_opt": float(c0 + c1 * xv + c2 * xv * xv),
                        "method": "parabola", "interior": True, "coef": [float(c2), float(c1), float(c0)]}
    return {**out, "n_opt": out["env_n"], "l_opt": out["env_loss"], "method": "envelope", "interior": False}


def _loss_curve(c, E, A, alpha):
    return E + A * np.power(c, -alpha)


def fit_loss_curve(compute: Sequence[float], loss: Sequence[float],
                   start: dict[str, float] | None = None) -> dict[str, float]:
    """L*(C) = E + A·C^(-alpha) through per-budget minima (at least 3 budgets), least squares in loss.

    The fit works in C / C_0 (C_0 the smallest budget) so A is O(loss); alpha in (0, 3], E in [0, min loss).
    Raises ValueError when it does not converge."""
    from scipy.optimize import curve_fit
    c = np.asarray(compute, float)
    y = np.asarray(loss, float)
    if len(np.unique(c)) < 3:
        raise ValueError("L*(C) = E + A·C^-alpha needs at least three budgets")
    c0 = float(c.min())
    x = c / c0
    lo = float(y.min())
    best = None
    fracs = (0.0, 0.5, 0.9) if start is None else (0.5,)
    starts = [(e_frac * lo, max(y.max() - e_frac * lo, 1e-6), alpha0)
              for alpha0 in (0.05, 0.2, 0.5) for e_frac in fracs]
    if start is not None:  # a bootstrap replicate also starts from the point estimate; the lowest SSE wins
        starts.insert(0, (min(start["E"], 0.999 * lo), start["A"] / c0 ** start["alpha"], start["alpha"]))
    # several starts: the loss surface in alpha is flat-bottomed
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, _ = curve_fit(_loss_curve, x, y, p0=p0, bounds=([0, 0, ALPHA_MIN], [lo, np.inf, 3.0]),
                                 maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((_loss_curve(x, *p) - y) ** 2))
        if best is None or sse < best[1]:
            best = (p, sse)
    if best is None:
        raise ValueError("the fit of E + A·C^-alpha did not converge")
    E, A, alpha = (float(v) for v in best[0])
    if A <= 0 or alpha <= ALPHA_MIN * 1.001:
        # loss not falling with compute over these budgets: no curve to invert (a multiplier would be noise)
        raise ValueError("L*(C) is flat over these budgets (alpha at its lower bound)")
    return {"E": E, "A": A * c0 ** alpha, "alpha": alpha, "sse": best[1]}


def loss_at(fit: dict[str, float], compute: float | np.ndarray) -> float | np.ndarray:
    return fit["E"] + fit["A"] * np.power(compute, -fit["alpha"])


def compute_for_loss(fit: dict[str, float], loss: float) -> float:
    """The compute at which the fitted curve reaches ``loss``; inf when the curve never gets there (loss at
    or below its asymptote E)."""
    if loss <= fit["E"]:
        return math.inf
    log_c = -math.log((loss - fit["E"]) / fit["A"]) / fit["alpha"]  # in logs: a flat fit overflows a power
    return math.inf if log_c > 700 else math.exp(max(log_c, -700.0))


def crossing(fit_a: dict[str, float], fit_b: dict[str, float], lo: float, hi: float) -> float | None:
    """A compute in [lo, hi] where the two fitted curves cross (the first, scanning up), or None."""
    from scipy.optimize import brentq
    grid = np.geomspace(lo, hi, 400)
    diff = loss_at(fit_a, grid) - loss_at(fit_b, grid)
    sign = np.sign(diff)
    idx = np.nonzero(sign[:-1] * sign[1:] < 0)[0]
    if not len(idx):
        return None
    i = int(idx[0])
    return float(brentq(lambda c: float(loss_at(fit_a, c) - loss_at(fit_b, c)), grid[i], grid[i + 1]))


# ------------------------------------------------------------------------------------- profiles and bootstrap
@dataclass
class Profiles:
    """One architecture's final losses: ``losses[budget][size]`` is the per-seed array (seed order shared by
    every size of a budget); ``tokens[budget][size]`` the tokens each run read."""
    arch: str
    losses: dict[float, dict[float, np.ndarray]]
    tokens: dict[float, dict[float, float]]

    @property
    def budgets(self) -> list[float]:
        return sorted(self.losses)


def _minima(p: Profiles, seed_index: dict[float, np.ndarray] | None = None) -> dict[float, dict[str, Any]]:
    out = {}
    for c in p.budgets:
        ns, ls = [], []
        for n, arr in p.losses[c].items():
            vals = arr if seed_index is None else arr[seed_index[c] % len(arr)]
            ns += [n] * len(vals)
            ls += list(vals)
        if ns:
            m = isoflop_minimum(ns, ls)
            m["d_opt"] = _tokens_at(p, c, m["n_opt"])
            out[c] = m
    return out


def _tokens_at(p: Profiles, c: float, n: float) -> float:
    """Tokens at size n and compute c, interpolated log-log between the sizes trained (C/FLOPs-per-token)."""
    sizes = sorted(p.tokens[c])
    if len(sizes) == 1:
        return p.tokens[c][sizes[0]]
    return float(np.exp(np.interp(np.log(n), np.log(sizes), np.log([p.tokens[c][s] for s in sizes]),
                                  left=None, right=None)) if sizes[0] <= n <= sizes[-1] else
                 np.exp(np.polyval(np.polyfit(np.log(sizes), np.log([p.tokens[c][s] for s in sizes]), 1),
                                   np.log(n))))


def usable(m: dict[str, Any]) -> bool:
    """A minimum the fits over budgets may use: at least three sizes, and not the best size at an end of the
    profile (then the true optimum lies outside the sizes trained and L_opt is only a bound)."""
    return m["sizes"] >= 3 and not (m["method"] == "envelope" and m["edge"])


def fit_frontier(p: Profiles, seed_index=None, budgets: Sequence[float] | None = None,
                 start: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-budget minima and the fits over budgets through the usable ones (each fit None when it cannot be
    made)."""
    minima = _minima(p, seed_index)
    cs = list(budgets) if budgets is not None else sorted(minima)
    out: dict[str, Any] = {"minima": minima, "loss_fit": None, "n_fit": None, "d_fit": None}
    cs_ok = [c for c in cs if c in minima and usable(minima[c])]
    try:
        out["loss_fit"] = fit_loss_curve(cs_ok, [minima[c]["l_opt"] for c in cs_ok], start)
    except ValueError:
        pass
    try:
        out["n_fit"] = fit_power_law(cs_ok, [minima[c]["n_opt"] for c in cs_ok])
        out["d_fit"] = fit_power_law(cs_ok, [minima[c]["d_opt"] for c in cs_ok])
    except ValueError:
        pass
    return out


def _resample(profiles: Sequence[Profiles], rng: np.random.Generator, over_budgets: bool):
    """One bootstrap draw: one vector of seed indices shared by every budget, size and architecture (seed s
    is the same data order and initialisation seed everywhere, so the seed is the unit resampled) and, with
    ``over_budgets``, a resampled list of budgets."""
    budgets = sorted(set().union(*(p.budgets for p in profiles)))
    n = max(len(a) for p in profiles for c in budgets for a in p.losses.get(c, {}).values())
    draw_seeds = rng.integers(0, n, n)
    seeds = {c: draw_seeds for c in budgets}
    draw = list(rng.choice(budgets, len(budgets), replace=True)) if over_budgets else budgets
    return seeds, draw


def _interval(values: Sequence[float]) -> tuple[float, float] | None:
    """Percentile interval of the replicates (None and NaN dropped; +inf kept: "never reaches" is a result,
    and dropping it would narrow the interval). None with fewer than 10 replicates."""
    v = np.sort(np.asarray([x for x in values if x is not None and not np.isnan(x)], float))
    if len(v) < 10:
        return None
    lo = v[int(math.floor((1 - CI) / 2 * (len(v) - 1)))]
    hi = v[int(math.ceil((1 - (1 - CI) / 2) * (len(v) - 1)))]
    return float(lo), float(hi)


def analyse(profiles: Sequence[Profiles], reference: str | None, iters: int = 1000, seed: int = 0,
            cross_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Everything the frontier report prints, with bootstrap intervals.

    Per architecture: the per-budget minima (point estimates, and CIs of L_opt / N_opt over seeds), the
    L*(C), N*(C) and D*(C) fits with CIs over seeds and budgets. Against ``reference``: the compute
    multiplier at every measured budget and the crossing compute."""
    rng = np.random.default_rng(seed)
    by = {p.arch: p for p in profiles}
    point = {a: fit_frontier(p) for a, p in by.items()}
    budgets = sorted(set().union(*(p.budgets for p in profiles)))
    lo, hi = cross_range or (budgets[0] / 10, budgets[-1] * 100)
    draws_seed = {a: [] for a in by}        # seeds only: per-budget minima
    draws_all = {a: [] for a in by}         # seeds and budgets: the fits
    mult_draws: dict[str, list] = {a: [] for a in by if a != reference}
    cross_draws: dict[str, list] = {a: [] for a in by if a != reference}
    for _ in range(iters):
        seeds, _same = _resample(profiles, rng, over_budgets=False)
        for a, p in by.items():
            draws_seed[a].append(_minima(p, seeds))
        seeds2, draw = _resample(profiles, rng, over_budgets=True)
        fits = {a: fit_frontier(p, seeds2, draw, point[a]["loss_fit"]) for a, p in by.items()}
        for a in by:
            draws_all[a].append(fits[a])
        if reference in by:
            ref_min = _minima(by[reference], seeds2)
            for a in mult_draws:
                lf = fits[a]["loss_fit"]
                mult_draws[a].append(None if lf is None else
                                     {c: compute_for_loss(lf, m["l_opt"]) / c for c, m in ref_min.items()
                                      if usable(m)})
                rf = fits[reference]["loss_fit"]
                # NO_FIT: this replicate cannot say whether the curves cross (either fit failed)
                cross_draws[a].append(NO_FIT if lf is None or rf is None else crossing(lf, rf, lo, hi))
    out: dict[str, Any] = {"archs": {}, "reference": reference, "iters": iters, "cross_range": [lo, hi]}
    for a, p in by.items():
        pt = point[a]
        minima = {}
        for c, m in pt["minima"].items():
            l_ci = _interval([d[c]["l_opt"] for d in draws_seed[a] if c in d])
            n_ci = _interval([d[c]["n_opt"] for d in draws_seed[a] if c in d])
            minima[c] = {**m, "l_ci": l_ci, "n_ci": n_ci,
                         "usable": usable(m)}
        fits = {}
        lf = pt["loss_fit"]
        if lf is not None:
            ok = [d["loss_fit"] for d in draws_all[a] if d["loss_fit"] is not None]
            fits["loss"] = {**lf, "alpha_ci": _interval([f["alpha"] for f in ok]),
                            "E_ci": _interval([f["E"] for f in ok]), "replicates": len(ok),
                            "band": _band(ok, lo_c=budgets[0], hi_c=budgets[-1])}
        for key in ("n_fit", "d_fit"):
            if pt[key] is not None:
                ok = [d[key] for d in draws_all[a] if d[key] is not None]
                fits[key[0]] = {"a": pt[key][0], "b": pt[key][1], "b_ci": _interval([f[1] for f in ok])}
        out["archs"][a] = {"minima": minima, "fits": fits}
    if reference in by:
        ref_pt = point[reference]
        for a in mult_draws:
            lf = point[a]["loss_fit"]
            rows = {}
            for c, m in ref_pt["minima"].items():
                if not usable(m):
                    continue  # the reference's own optimum at this budget is not measured: nothing to reach
                est = compute_for_loss(lf, m["l_opt"]) / c if lf is not None else None
                reps = [d[c] for d in mult_draws[a] if d is not None and c in d]
                rows[c] = {"multiplier": est, "target_loss": m["l_opt"], "ci": _interval(reps),
                           "replicates": len(reps)}
            rf = ref_pt["loss_fit"]
            cross = crossing(lf, rf, lo, hi) if lf is not None and rf is not None else None
            found = [x for x in cross_draws[a] if x is not NO_FIT]
            out["archs"][a]["multiplier"] = rows
            out["archs"][a]["crossing"] = {
                "compute": cross, "fitted": lf is not None and rf is not None,
                "extrapolated": cross is not None and not budgets[0] <= cross <= budgets[-1],
                "ci": _interval([x for x in found if x is not None]), "replicates": len(found),
                "share_crossing": (sum(x is not None for x in found) / len(found)) if found else None}
    return out


def _band(fits: list[dict[str, float]], lo_c: float, hi_c: float, points: int = 40) -> dict[str, list[float]]:
    """Pointwise 95% band of the fitted L*(C) over the replicates, on a log grid of the measured range."""
    grid = np.geomspace(lo_c, hi_c, points)
    if len(fits) < 10:
        return {"compute": list(map(float, grid)), "lo": [], "hi": []}
    ys = np.stack([loss_at(f, grid) for f in fits])
    return {"compute": list(map(float, grid)), "lo": list(map(float, np.quantile(ys, (1 - CI) / 2, 0))),
            "hi": list(map(float, np.quantile(ys, 1 - (1 - CI) / 2, 0)))}
