"""Seed statistics for the comparison tables: mean with a 95% t-interval, Welch's t-test, and a verdict that
refuses to rank two models whose difference is not significant."""
from __future__ import annotations

import math
from typing import Sequence

from scipy import stats

ALPHA = 0.05
NOT_DISTINGUISHABLE = "not distinguishable"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); half-width is nan with fewer than 2 values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan")
    sem = stats.sem(xs)
    return mean, float(sem * stats.t.ppf(0.5 + confidence / 2, len(xs) - 1))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's unequal-variance t-test: (t, two-sided p). nan with fewer than 2 values on a side."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    if max(a) == min(a) and max(b) == min(b):  # zero variance on both sides: equal means or a sure difference
        return (0.0, 1.0) if a[0] == b[0] else (math.copysign(math.inf, a[0] - b[0]), 0.0)
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def verdict(candidate: Sequence[float], reference: Sequence[float], lower_is_better: bool = True,
            alpha: float = ALPHA) -> tuple[str, float]:
    """'better' / 'worse' than the reference when Welch's p < alpha, else 'not distinguishable' (also when
    there are too few seeds to test). Returns (verdict, p)."""
    t, p = welch(candidate, reference)
    if not math.isfinite(p) or p >= alpha:
        return NOT_DISTINGUISHABLE, p
    candidate_lower = sum(candidate) / len(candidate) < sum(reference) / len(reference)
    return ("better" if candidate_lower == lower_is_better else "worse"), p


def fmt_ci(mean: float, half: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if not math.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
