import math

import pytest
from scipy import stats as sps

from harness.stats import NOT_DISTINGUISHABLE, mean_ci, verdict, welch

A = [2.31, 2.35, 2.29, 2.33]
B = [2.41, 2.44, 2.39]


def test_mean_ci_against_scipy():
    mean, half = mean_ci(A)
    lo, hi = sps.t.interval(0.95, len(A) - 1, loc=sps.tmean(A), scale=sps.sem(A))
    assert mean == pytest.approx(sum(A) / 4) and mean - half == pytest.approx(lo) and mean + half == pytest.approx(hi)
    assert math.isnan(mean_ci([1.0])[1])


def test_welch_against_scipy():
    t, p = welch(A, B)
    ref = sps.ttest_ind(A, B, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # hand-checked fixed numbers: Welch-Satterthwaite, not the pooled test
    assert p != pytest.approx(sps.ttest_ind(A, B, equal_var=True).pvalue)


def test_verdicts():
    assert verdict(A, B)[0] == "better" and verdict(B, A)[0] == "worse"
    noisy_a, noisy_b = [2.30, 2.45, 2.38], [2.33, 2.41, 2.36]
    v, p = verdict(noisy_a, noisy_b)
    assert v == NOT_DISTINGUISHABLE and p >= 0.05
    assert verdict([2.3], [2.4])[0] == NOT_DISTINGUISHABLE  # one seed: cannot rank
    assert verdict([1.0, 1.0], [1.0, 1.0])[0] == NOT_DISTINGUISHABLE
