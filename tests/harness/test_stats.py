"""harness.stats against numbers worked out by hand for small fixed inputs (not against the same scipy calls).

Closed forms used for the two-sided Student t p-value: df = 1 (Cauchy): p = 1 - (2/pi) * atan(|t|);
df = 2: p = 1 - |t| / sqrt(t^2 + 2). Quantiles are the table constants below.
"""
import dataclasses
import math

import pytest

from harness.stats import (ALPHA, NOT_DISTINGUISHABLE, Comparison, Paired, compare, correct_family, fmt_ci,
                           fmt_delta_ci, holm, mean_ci, paired, verdict, verdict_of, welch, welch_df, welch_diff_ci)

# 97.5% quantiles of Student's t (two-sided 95% intervals), standard table values
T975_DF1 = 12.706204736174705
T975_DF2 = 4.302652729749464
T975_DF3 = 3.182446305284263
T975_DF4 = 2.7764451051977987
NAN = float("nan")


def p_df1(t):
    return 1 - (2 / math.pi) * math.atan(abs(t))


def p_df2(t):
    return 1 - abs(t) / math.sqrt(t * t + 2)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- mean_ci, welch, welch_df, welch_diff_ci


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), df 2 -> half-width 4.3027 / sqrt(3)
    assert mean_ci([1.0, 2.0, 3.0]) == (approx(2.0), approx(T975_DF2 / math.sqrt(3)))
    assert mean_ci([1.0, NAN, 2.0, None, 3.0]) == (approx(2.0), approx(T975_DF2 / math.sqrt(3)))  # dropped
    mean, half = mean_ci([1.5])
    assert mean == 1.5 and math.isnan(half)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_welch_by_hand():
    # a = [1, 2, 3] (mean 2, var 1), b = [5, 5] (mean 5, var 0): se^2 = 1/3, t = -3 / sqrt(1/3) = -3 sqrt(3);
    # Satterthwaite df = (1/3)^2 / ((1/3)^2 / 2) = 2 (pooled would be df 3 with a different se)
    t, p = welch([1.0, 2.0, 3.0], [5.0, 5.0])
    assert t == approx(-3 * math.sqrt(3)) and p == approx(p_df2(3 * math.sqrt(3)))  # 1 - 3 sqrt3 / sqrt29
    # a = [0, 2] (mean 1, var 2), b = [5, 5]: se^2 = 2/2 = 1, t = -4, df = 1^2 / (1^2 / 1) = 1
    t, p = welch([0.0, 2.0], [5.0, 5.0])
    assert t == approx(-4.0) and p == approx(p_df1(4.0))
    assert welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    assert welch([1.0, 1.0], [2.0, 2.0]) == (-math.inf, 0.0)
    assert all(math.isnan(x) for x in welch([1.0], [2.0, 3.0]))


def test_welch_df_satterthwaite_by_hand():
    # a = [1, 2, 3]: var 1; b = [2, 4, 6]: deviations -2, 0, 2 -> var 8/2 = 4.
    # se^2 = 1/3 + 4/3 = 5/3; df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = (25/9) / (17/18) = 50/17
    ua, ub = 1 / 3, 4 / 3
    assert welch_df([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == approx((ua + ub) ** 2 / (ua ** 2 / 2 + ub ** 2 / 2))
    assert welch_df([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == approx(50 / 17)
    assert welch_df([1.0, 2.0, 3.0], [5.0, 5.0]) == approx(2.0)  # zero-variance side contributes nothing
    assert math.isnan(welch_df([1.0, 1.0], [2.0, 2.0])) and math.isnan(welch_df([1.0], [2.0, 3.0]))


def test_welch_diff_ci_by_hand():
    # [1,2,3] vs [5,5]: diff -3, se 1/sqrt(3), df 2
    h = T975_DF2 / math.sqrt(3)
    assert welch_diff_ci([1.0, 2.0, 3.0], [5.0, 5.0]) == (approx(-3.0), approx(-3.0 - h), approx(-3.0 + h))
    # [0,2] vs [5,5]: diff -4, se 1, df 1
    assert welch_diff_ci([0.0, 2.0], [5.0, 5.0]) == (approx(-4.0), approx(-4.0 - T975_DF1), approx(-4.0 + T975_DF1))
    # [1,2,3] vs [3,4,5]: equal variances 1, se^2 = 2/3, df = (2/3)^2 / (2 * (1/3)^2 / 2) = 4
    h = T975_DF4 * math.sqrt(2 / 3)
    assert welch_diff_ci([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) == (approx(-2.0), approx(-2.0 - h), approx(-2.0 + h))
    # 99% interval is wider than the 95% one
    _, lo99, hi99 = welch_diff_ci([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], confidence=0.99)
    assert hi99 - lo99 > 2 * h


def test_welch_diff_ci_degenerate():
    assert welch_diff_ci([1.0, 1.0], [3.0, 3.0]) == (-2.0, -2.0, -2.0)  # both variances 0: exact difference
    diff, lo, hi = welch_diff_ci([1.0], [2.0, 3.0])  # one seed on a side: difference but no interval
    assert diff == approx(-1.5) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in welch_diff_ci([], [2.0, 3.0]))


# ---------------------------------------------------------------- paired

A = {0: 1.0, 1: 2.0, 2: 4.0}
B = {0: 0.5, 1: 1.0, 2: 2.5}
# diffs 0.5, 1.0, 1.5: mean 1.0, sd sqrt((0.25 + 0 + 0.25) / 2) = 0.5, se = 0.5 / sqrt(3),
# t = 1.0 / (0.5 / sqrt(3)) = 2 sqrt(3) = 3.4641..., df 2: p = 1 - t / sqrt(t^2 + 2) = 1 - 2 sqrt3 / sqrt14
AB_T = 2 * math.sqrt(3)
AB_P = 1 - AB_T / math.sqrt(AB_T ** 2 + 2)
AB_HALF = T975_DF2 * 0.5 / math.sqrt(3)


def test_paired_by_hand():
    r = paired(A, B)
    assert (r.n, r.seeds) == (3, (0, 1, 2))
    assert r.mean_diff == approx(1.0) and r.t == approx(AB_T) and r.p == approx(AB_P)
    assert AB_P == approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
    assert (r.ci_low, r.ci_high) == (approx(1.0 - AB_HALF), approx(1.0 + AB_HALF))
    r = paired(B, A)  # antisymmetric
    assert r.mean_diff == approx(-1.0) and r.t == approx(-AB_T) and r.p == approx(AB_P)
    assert (r.ci_low, r.ci_high) == (approx(-1.0 - AB_HALF), approx(-1.0 + AB_HALF))


def test_paired_uses_only_shared_finite_seeds():
    a = {2: 4.0, 7: 100.0, 0: 1.0, 1: 2.0, 5: NAN}  # seed 7 only in a; seed 5 not finite
    b = {9: -3.0, 1: 1.0, 0: 0.5, 2: 2.5, 5: 1.0}
    r = paired(a, b)
    assert (r.n, r.seeds) == (3, (0, 1, 2))
    assert r.mean_diff == approx(1.0) and r.t == approx(AB_T) and r.p == approx(AB_P)


def test_paired_degenerate():
    r = paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # diffs 0.5, 0.5: sd 0, sure positive difference
    assert (r.t, r.p, r.mean_diff, r.ci_low, r.ci_high) == (math.inf, 0.0, 0.5, 0.5, 0.5)
    r = paired({0: 0.5, 1: 1.5}, {0: 1.0, 1: 2.0})
    assert (r.t, r.p, r.ci_low, r.ci_high) == (-math.inf, 0.0, -0.5, -0.5)
    r = paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})  # identical runs
    assert (r.t, r.p, r.mean_diff, r.ci_low, r.ci_high) == (0.0, 1.0, 0.0, 0.0, 0.0)
    r = paired({0: 1.0, 1: 2.0}, {1: 1.5, 3: 0.0})  # one shared seed: a difference, no test
    assert (r.n, r.seeds, r.mean_diff) == (1, (1,), 0.5)
    assert all(math.isnan(x) for x in (r.t, r.p, r.ci_low, r.ci_high))
    r = paired({0: 1.0}, {1: 1.0})
    assert r.n == 0 and r.seeds == () and math.isnan(r.mean_diff)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n = 3


# ---------------------------------------------------------------- holm


def test_holm_by_hand():
    # NaN is dropped, so m = 4. Sorted: 0.01, 0.03, 0.04, 0.20
    #   0.01 * 4 = 0.04
    #   0.03 * 3 = 0.09
    #   0.04 * 2 = 0.08 -> running max 0.09
    #   0.20 * 1 = 0.20
    out = holm([0.01, 0.04, 0.03, NAN, 0.20])
    assert out[:3] == [approx(0.04), approx(0.09), approx(0.09)] and math.isnan(out[3]) and out[4] == approx(0.20)
    # ties: 0.01 * 2 = 0.02, 0.01 * 1 = 0.01 -> running max 0.02
    assert holm([0.01, 0.01]) == [approx(0.02), approx(0.02)]
    assert holm([0.02]) == [0.02]  # a family of one is not corrected


def test_holm_cap_and_monotone():
    # sorted 0.02 * 3 = 0.06, 0.6 * 2 = 1.2 -> cap 1, 0.7 * 1 = 0.7 -> running max 1
    assert holm([0.6, 0.02, 0.7]) == [1.0, approx(0.06), 1.0]
    # sorted 0.02 * 3 = 0.06, 0.3 * 2 = 0.6, 0.9 * 1 = 0.9
    assert holm([0.3, 0.9, 0.02]) == [approx(0.6), approx(0.9), approx(0.06)]
    raw = [0.04, 0.001, 0.5, 0.012, 0.03, 0.011, 0.9]
    adj = holm(raw)
    by_raw = [q for _, q in sorted(zip(raw, adj))]
    assert by_raw == sorted(by_raw) and all(p <= q <= 1.0 for p, q in zip(raw, adj))
    assert holm([]) == [] and all(math.isnan(q) for q in holm([NAN, NAN]))


# ---------------------------------------------------------------- compare, correct_family, verdict_of

REF = {0: 3.0, 1: 3.5, 2: 4.0}
CAND = {0: 2.25, 1: 2.5, 2: 2.75}
# paired diffs -0.75, -1.0, -1.25: mean -1, sd 0.25, se 0.25 / sqrt(3), t = -4 sqrt(3), t^2 = 48, df 2:
# p = 1 - 4 sqrt3 / sqrt50 = 0.0202
CR_T = -4 * math.sqrt(3)
CR_P = 1 - 4 * math.sqrt(3) / math.sqrt(50)


def test_compare_prefers_paired_test():
    c = compare(CAND, REF, candidate_bpb=A, reference_bpb=B)
    assert (c.n_candidate, c.n_reference, c.test) == (3, 3, "paired t")
    assert c.paired.t == approx(CR_T) and c.p == approx(CR_P) and 0.02 < c.p < 0.021
    assert math.isnan(c.p_corrected)
    # Welch on the same values: var 0.0625 and 0.25, se^2 = 0.3125 / 3, t = -1 / sqrt(0.3125 / 3) = -sqrt(9.6);
    # df = 50/17 as in the Satterthwaite test above (variances in ratio 1:4), 2 < df < 3. |t| = 3.098 < 3.182
    # (the df-3 cutoff, and the cutoff only grows as df falls) so Welch alone would not be significant.
    assert c.delta == approx(-1.0) and c.welch_t == approx(-math.sqrt(9.6)) and c.welch_p > ALPHA
    se = math.sqrt(0.3125 / 3)
    assert T975_DF3 < (c.delta_high - c.delta) / se < T975_DF2 and c.delta_low == approx(2 * c.delta - c.delta_high)
    # bits per byte: 3 shared seeds -> the paired interval of A - B
    assert c.paired_bpb.n == 3 and c.delta_bpb == approx(1.0)
    assert (c.delta_bpb_low, c.delta_bpb_high) == (approx(1.0 - AB_HALF), approx(1.0 + AB_HALF))


def test_compare_falls_back_to_welch_without_shared_seeds():
    cand, ref = {0: 1.0, 1: 2.0, 2: 3.0}, {10: 5.0, 11: 5.0}
    h = T975_DF2 / math.sqrt(3)
    c = compare(cand, ref, candidate_bpb=cand, reference_bpb=ref)
    assert (c.test, c.paired.n, c.n_candidate, c.n_reference) == ("Welch", 0, 3, 2)
    assert c.p == approx(p_df2(3 * math.sqrt(3))) and c.welch_t == approx(-3 * math.sqrt(3))
    assert (c.delta, c.delta_low, c.delta_high) == (approx(-3.0), approx(-3.0 - h), approx(-3.0 + h))
    assert c.paired_bpb.n == 0 and (c.delta_bpb, c.delta_bpb_low, c.delta_bpb_high) == (
        approx(-3.0), approx(-3.0 - h), approx(-3.0 + h))
    # one shared seed is not enough to pair
    c1 = compare(cand, {2: 5.0, 11: 5.0})
    assert c1.test == "Welch" and c1.paired.n == 1 and c1.p == c1.welch_p
    assert c1.paired_bpb is None and all(math.isnan(x) for x in (c1.delta_bpb, c1.delta_bpb_low, c1.delta_bpb_high))


def test_verdict_of_needs_correction_and_direction():
    c = compare(CAND, REF)
    assert verdict_of(c) == NOT_DISTINGUISHABLE  # p = 0.02, but not family-corrected yet
    (alone,) = correct_family([c])
    assert alone.p_corrected == approx(CR_P) and c is not alone and math.isnan(c.p_corrected)
    assert verdict_of(alone) == "better" and verdict_of(alone, lower_is_better=False) == "worse"
    assert verdict_of(alone, alpha=0.01) == NOT_DISTINGUISHABLE
    (rev,) = correct_family([compare(REF, CAND)])
    assert verdict_of(rev) == "worse"
    (welch_c,) = correct_family([compare({0: 1.0, 1: 2.0, 2: 3.0}, {10: 5.0, 11: 5.0})])  # Welch p = 0.035
    assert verdict_of(welch_c) == "better"


def test_verdict_flips_in_a_family_of_five():
    c = compare(CAND, REF)  # uncorrected p = 0.0202
    family = [c] + [dataclasses.replace(c, p=p) for p in (0.3, 0.4, 0.5, 0.6)]
    out = correct_family(family)
    # sorted: 0.0202 * 5 = 0.101, 0.3 * 4 = 1.2 -> 1, then the running max keeps 1
    assert [x.p_corrected for x in out] == [approx(5 * CR_P), 1.0, 1.0, 1.0, 1.0]
    assert [x.p for x in out] == [x.p for x in family]  # order and raw p kept
    assert verdict_of(out[0]) == NOT_DISTINGUISHABLE


def test_untestable_comparison_does_not_count_toward_family():
    c = compare(CAND, REF)
    untestable = compare({0: 1.0}, {1: 2.0})  # one seed a side: p nan
    assert math.isnan(untestable.p)
    out = correct_family([c, untestable])
    assert out[0].p_corrected == approx(CR_P) and math.isnan(out[1].p_corrected)
    assert verdict_of(out[0]) == "better" and verdict_of(out[1]) == NOT_DISTINGUISHABLE


def test_verdict_direction_follows_the_tested_difference():
    # seed 3 exists only for the candidate and is far worse: delta over all seeds is positive, but the paired
    # test (seeds 0-2) is what was significant, and there the candidate is lower
    cand = {**CAND, 3: 10.0}
    (c,) = correct_family([compare(cand, REF)])
    assert c.delta == approx((2.25 + 2.5 + 2.75 + 10.0) / 4 - 3.5) and c.delta > 0
    assert c.test == "paired t" and c.paired.mean_diff == approx(-1.0) and verdict_of(c) == "better"


def test_comparison_defaults():
    p = Paired(0, (), NAN, NAN, NAN, NAN, NAN)
    c = Comparison(0, 0, NAN, NAN, NAN, NAN, NAN, p, None, NAN, NAN, NAN, NAN, "Welch")
    assert math.isnan(c.p_corrected) and verdict_of(c) == NOT_DISTINGUISHABLE
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.p = 0.0


# ---------------------------------------------------------------- legacy verdict, formatting


def test_verdict_welch_uncorrected():
    v, p = verdict([1.0, 2.0, 3.0], [5.0, 5.0])  # p = 1 - 3 sqrt3 / sqrt29 = 0.035
    assert v == "better" and p == approx(p_df2(3 * math.sqrt(3)))
    assert verdict([5.0, 5.0], [1.0, 2.0, 3.0])[0] == "worse"
    assert verdict([1.0, 2.0, 3.0], [5.0, 5.0], lower_is_better=False)[0] == "worse"
    v, p = verdict([0.0, 2.0], [5.0, 5.0])  # df 1, t = -4: p = 1 - (2/pi) atan 4 = 0.156
    assert v == NOT_DISTINGUISHABLE and p == approx(p_df1(4.0))
    assert verdict([2.3], [2.4])[0] == NOT_DISTINGUISHABLE  # one seed: cannot rank
    assert verdict([1.0, 1.0], [1.0, 1.0]) == (NOT_DISTINGUISHABLE, 1.0)


def test_formatting():
    assert fmt_ci(2.0, 0.5) == "2.0000 ± 0.5000" and fmt_ci(2.0, NAN, 2) == "2.00" and fmt_ci(NAN, 1.0) == "-"
    assert fmt_delta_ci(0.0123, 0.005, 0.0196) == "+0.0123 [+0.0050, +0.0196]"
    assert fmt_delta_ci(-1.0, -1.5, -0.5, digits=2) == "-1.00 [-1.50, -0.50]"
    assert fmt_delta_ci(-0.25, -0.75, 0.25, digits=2) == "-0.25 [-0.75, +0.25]"
    assert fmt_delta_ci(0.0123, NAN, NAN) == "+0.0123"
    assert fmt_delta_ci(NAN, 0.0, 1.0) == "-"
