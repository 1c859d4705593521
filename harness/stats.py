"""Seed statistics for the comparison tables: means with t-intervals, Welch and paired t-tests, Holm correction,
and verdicts that refuse to rank two models whose difference is not significant.

Why paired: a seed fixes the data order (and the initialisation stream) for every model trained with it, so runs
of two models on the same seed share much of their seed-to-seed noise. Seed is a blocking factor; testing the
per-seed differences removes that shared noise, which Welch's unpaired test leaves in both variances. Welch is
the fallback when fewer than two seeds are shared.

Why Holm: one report compares many candidates with the same reference, and each extra test is another chance of
a false "better". Holm-Bonferroni's step-down keeps the family-wise error at alpha for any dependence between the
tests, and is uniformly more powerful than plain Bonferroni.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy import stats

ALPHA = 0.05
NOT_DISTINGUISHABLE = "not distinguishable"
NAN = float("nan")


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, unbiased sample variance); needs len(xs) >= 2."""
    m = sum(xs) / len(xs)
    return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _t_quantile(confidence: float, df: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); half-width is nan with fewer than 2 values."""
    xs = _finite(values)
    if not xs:
        return NAN, NAN
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, NAN
    sem = stats.sem(xs)
    return mean, float(sem * _t_quantile(confidence, len(xs) - 1))


def _welch_se_df(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(standard error of mean(a) - mean(b), Welch-Satterthwaite df); needs >= 2 values a side. df is nan when
    both variances are 0 (the difference is then exact)."""
    ua, ub = _mean_var(a)[1] / len(a), _mean_var(b)[1] / len(b)  # squared standard errors of each mean
    if ua + ub == 0:
        return 0.0, NAN
    return math.sqrt(ua + ub), (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's unequal-variance t-test: (t, two-sided p). nan with fewer than 2 values on a side."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return NAN, NAN
    if max(a) == min(a) and max(b) == min(b):  # zero variance on both sides: equal means or a sure difference
        return (0.0, 1.0) if a[0] == b[0] else (math.copysign(math.inf, a[0] - b[0]), 0.0)
    se, df = _welch_se_df(a, b)
    t = (sum(a) / len(a) - sum(b) / len(b)) / se
    return t, float(2 * stats.t.sf(abs(t), df))


def welch_df(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch-Satterthwaite degrees of freedom of mean(a) - mean(b) over the finite values; nan with < 2 values on
    a side or both variances 0."""
    a, b = _finite(a), _finite(b)
    return _welch_se_df(a, b)[1] if len(a) >= 2 and len(b) >= 2 else NAN


def welch_diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi): Welch t-interval of the difference of means over the finite values. Bounds
    are nan with < 2 values on a side; with both variances 0 the difference is exact, so lo = hi = diff."""
    a, b = _finite(a), _finite(b)
    if not a or not b:
        return NAN, NAN, NAN
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return diff, NAN, NAN
    se, df = _welch_se_df(a, b)
    if se == 0:
        return diff, diff, diff
    half = se * _t_quantile(confidence, df)
    return diff, diff - half, diff + half


@dataclass(frozen=True)
class Paired:
    """Paired t-test of a - b over the seeds both sides have."""
    n: int
    seeds: tuple[int, ...]
    mean_diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Paired:
    """Paired t-test (df = n - 1) on the per-seed differences a[s] - b[s], over seeds present in both with
    finite values. n < 2: t, p and the interval are nan. Identical differences (sd 0): t = 0, p = 1 when they
    are 0, else t = +-inf, p = 0, and the interval collapses to the difference."""
    seeds = tuple(sorted(s for s in a.keys() & b.keys()
                         if a[s] is not None and b[s] is not None and math.isfinite(a[s]) and math.isfinite(b[s])))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n < 2:
        return Paired(n, seeds, diffs[0] if diffs else NAN, NAN, NAN, NAN, NAN)
    mean, var = _mean_var(diffs)
    if max(diffs) == min(diffs):  # exact test for sd 0 rather than 0/0 or a rounding-noise variance
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
        return Paired(n, seeds, mean, mean, mean, t, p)
    se = math.sqrt(var / n)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = se * _t_quantile(confidence, n - 1)
    return Paired(n, seeds, mean, mean - half, mean + half, t, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order. The k-th smallest of m p-values is multiplied by
    m - k + 1, then a running max keeps the adjusted values monotone in the raw ones, capped at 1. NaN entries
    (comparisons that could not be tested) stay NaN and are not counted in m."""
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(order)
    out = [NAN] * len(pvalues)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(pvalues[i])))
        out[i] = running
    return out


@dataclass(frozen=True)
class Comparison:
    """A candidate model against the reference, over seeds; differences are candidate - reference."""
    n_candidate: int
    n_reference: int
    delta: float            # mean loss difference over all finite values of each side
    delta_low: float        # Welch interval of delta
    delta_high: float
    welch_t: float
    welch_p: float
    paired: Paired          # loss, over shared seeds
    paired_bpb: Paired | None
    delta_bpb: float        # paired mean difference with >= 2 shared seeds, else Welch
    delta_bpb_low: float
    delta_bpb_high: float
    p: float                # the p the verdict uses: paired with >= 2 shared seeds, else Welch
    test: str               # "paired t" or "Welch"
    p_corrected: float = NAN  # filled in by correct_family


def compare(candidate: Mapping[int, float], reference: Mapping[int, float],
            candidate_bpb: Mapping[int, float] | None = None, reference_bpb: Mapping[int, float] | None = None,
            confidence: float = 0.95) -> Comparison:
    """Compare per-seed validation losses (and optionally bits per byte) of a candidate against the reference."""
    cand, ref = _finite(list(candidate.values())), _finite(list(reference.values()))
    delta, lo, hi = welch_diff_ci(cand, ref, confidence)
    wt, wp = welch(cand, ref)
    pl = paired(candidate, reference, confidence)
    use_paired = pl.n >= 2
    pb, bpb = None, (NAN, NAN, NAN)
    if candidate_bpb is not None and reference_bpb is not None:
        pb = paired(candidate_bpb, reference_bpb, confidence)
        bpb = ((pb.mean_diff, pb.ci_low, pb.ci_high) if pb.n >= 2 else
               welch_diff_ci(list(candidate_bpb.values()), list(reference_bpb.values()), confidence))
    return Comparison(len(cand), len(ref), delta, lo, hi, wt, wp, pl, pb, *bpb,
                      p=pl.p if use_paired else wp, test="paired t" if use_paired else "Welch")


def correct_family(comparisons: list[Comparison]) -> list[Comparison]:
    """Copies with p_corrected = Holm-adjusted p over the family (all comparisons in one report table)."""
    adjusted = holm([c.p for c in comparisons])
    return [dataclasses.replace(c, p_corrected=q) for c, q in zip(comparisons, adjusted)]


def verdict_of(comparison: Comparison, lower_is_better: bool = True, alpha: float = ALPHA) -> str:
    """'better' / 'worse' when the family-corrected p < alpha, else 'not distinguishable' (also when uncorrected:
    p_corrected nan). The direction is the sign of the difference the test was run on: the paired mean
    difference for the paired test (it can disagree with delta when some seeds are unshared), else delta."""
    c = comparison
    if math.isnan(c.p_corrected) or c.p_corrected >= alpha:
        return NOT_DISTINGUISHABLE
    diff = c.paired.mean_diff if c.test == "paired t" else c.delta
    if diff == 0 or math.isnan(diff):  # no direction to report
        return NOT_DISTINGUISHABLE
    return "better" if (diff < 0) == lower_is_better else "worse"


def verdict(candidate: Sequence[float], reference: Sequence[float], lower_is_better: bool = True,
            alpha: float = ALPHA) -> tuple[str, float]:
    """'better' / 'worse' than the reference when Welch's p < alpha, else 'not distinguishable' (also when
    there are too few seeds to test). Returns (verdict, p). Uncorrected, unpaired: see compare / verdict_of."""
    t, p = welch(candidate, reference)
    if not math.isfinite(p) or p >= alpha:
        return NOT_DISTINGUISHABLE, p
    candidate_lower = sum(candidate) / len(candidate) < sum(reference) / len(reference)
    return ("better" if candidate_lower == lower_is_better else "worse"), p


def fmt_ci(mean: float, half: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if not math.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_delta_ci(delta: float, lo: float, hi: float, digits: int = 4) -> str:
    """Signed difference with its interval, "+0.0123 [+0.0050, +0.0196]"; "-" for nan, no bracket without bounds."""
    if math.isnan(delta):
        return "-"
    if math.isnan(lo) or math.isnan(hi):
        return f"{delta:+.{digits}f}"
    return f"{delta:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
