"""The pure statistics module against scipy reference values, the verdict wording rules,
shape-keeping downsampling and aggregation across seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from app.services import statistics as st

# ---------------------------------------------------------------------------------------------
# summaries


def test_summary_matches_scipy_t_interval() -> None:
    values = [97.1, 96.4, 98.0, 95.9, 97.7]
    s = st.summarize(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert s.n == 5
    assert s.mean == pytest.approx(np.mean(values))
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert st.t_quantile(5) == pytest.approx(stats.t.ppf(0.975, 4))


def test_summary_small_and_degenerate_samples() -> None:
    empty, one = st.summarize([]), st.summarize([0.9])
    assert (empty.n, empty.mean, empty.ci_low, empty.ci_high) == (0, None, None, None) and empty.note
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.9, None, None, None)
    assert one.note and "at least 2" in one.note
    assert st.summarize([0.5, float("nan"), float("inf"), 0.7]).n == 2


def test_zero_spread_summary_has_no_interval_and_says_why() -> None:
    # two (or three) identical values: no "± 0.0" presented as certainty, and no NaN
    for values in ([0.5, 0.5, 0.5], [0.987, 0.987]):
        flat = st.summarize(values, bounds=(0.0, 1.0))
        assert (flat.n, flat.std, flat.ci_low, flat.ci_high, flat.half_width) == (len(values), 0.0, None, None, None)
        assert flat.mean == pytest.approx(values[0])
        assert flat.note and "spread is zero" in flat.note and "no interval" in flat.note


def test_accuracy_interval_is_clipped_to_the_possible_range() -> None:
    values = [0.995, 0.97, 1.0]  # the plain t-interval reaches above 1 (100% accuracy)
    raw = st.summarize(values)
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (raw.ci_low, raw.ci_high) == (pytest.approx(low), pytest.approx(high)) and high > 1 and not raw.clipped
    s = st.summarize(values, bounds=(0.0, 1.0))
    assert s.clipped and s.ci_high == 1.0 and s.ci_low == pytest.approx(low)
    assert s.half_width == pytest.approx(high - np.mean(values))  # "±" stays the t half-width
    assert s.note and "clipped" in s.note
    inside = st.summarize([0.90, 0.92, 0.91], bounds=(0.0, 1.0))
    assert not inside.clipped and inside.note is None and 0 < inside.ci_low < inside.ci_high < 1  # type: ignore[operator]
    bottom = st.summarize([0.0, 0.02, 0.001], bounds=(0.0, 1.0))
    assert bottom.clipped and bottom.ci_low == 0.0


# ---------------------------------------------------------------------------------------------
# paired t-test


def test_paired_test_matches_scipy_ttest_rel() -> None:
    gn = {0: 97.0, 1: 96.2, 2: 97.9, 3: 96.5}
    bn = {0: 81.3, 1: 78.0, 2: 84.1, 3: 80.2}
    t = st.paired_test(gn, bn)
    ref = stats.ttest_rel([gn[s] for s in range(4)], [bn[s] for s in range(4)])
    ci = ref.confidence_interval(0.95)
    assert t.n == 4 and t.seeds == (0, 1, 2, 3)
    assert t.mean_diff == pytest.approx(np.mean([gn[s] - bn[s] for s in range(4)]))
    assert t.t == pytest.approx(ref.statistic)
    assert t.p == pytest.approx(ref.pvalue)
    assert (t.ci_low, t.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert t.interval(0.99) == (
        pytest.approx(ref.confidence_interval(0.99).low),
        pytest.approx(ref.confidence_interval(0.99).high),
    )
    assert not t.zero_spread and t.note is None


def test_paired_test_non_significant_matches_scipy() -> None:
    a = {0: 98.0, 1: 97.5, 2: 98.2}
    b = {0: 97.6, 1: 97.9, 2: 97.8}
    t = st.paired_test(a, b)
    ref = stats.ttest_rel([98.0, 97.5, 98.2], [97.6, 97.9, 97.8])
    assert t.p == pytest.approx(ref.pvalue) and t.p > 0.05
    assert t.ci_low is not None and t.ci_high is not None and t.ci_low < 0 < t.ci_high


def test_pairs_only_seeds_both_finished() -> None:
    a = {0: 90.0, 1: 91.0, 2: 95.0, 5: 80.0}
    b = {2: 85.0, 0: 80.0, 1: 82.0, 3: 70.0, 4: float("nan")}
    t = st.paired_test(a, b)
    ref = stats.ttest_rel([90.0, 91.0, 95.0], [80.0, 82.0, 85.0])
    assert t.seeds == (0, 1, 2) and t.p == pytest.approx(ref.pvalue)


def test_one_pair_and_no_pair_have_no_test() -> None:
    one = st.paired_test({0: 90.0, 1: 91.0}, {0: 85.0})
    assert (one.n, one.mean_diff, one.p, one.ci_low, one.ci_high) == (1, 5.0, None, None, None)
    assert one.note and "2 seeds" in one.note
    none = st.paired_test({0: 90.0}, {1: 85.0})
    assert (none.n, none.mean_diff, none.p) == (0, None, None) and none.note


def test_zero_spread_differences_give_no_p_value_no_interval_and_no_nan() -> None:
    # accuracies on a k/N grid: 95−90, 85−80, 75−70 are "the same" 5 points up to float rounding
    a = {0: 0.95 * 100, 1: 0.85 * 100, 2: 0.75 * 100}
    b = {0: 0.90 * 100, 1: 0.80 * 100, 2: 0.70 * 100}
    t = st.paired_test(a, b)
    assert t.zero_spread and t.p is None and t.t is None
    assert t.mean_diff == pytest.approx(5.0) and t.ci_low is None and t.ci_high is None
    assert t.note and "spread is zero" in t.note and "no interval" in t.note
    same = st.paired_test({0: 100.0, 1: 100.0}, {0: 100.0, 1: 100.0})
    assert same.zero_spread and same.p is None and same.mean_diff == 0.0
    constant, identical = st.decide([t, same], margin=1.0)
    assert (constant.claim, identical.claim) == ("constant", "identical")
    assert constant.verdict == identical.verdict == "inconclusive"
    assert constant.family_size == 0 and constant.p_adjusted is None and constant.seeds_needed is None
    assert t.mean_diff is not None and math.isfinite(t.mean_diff)


# ---------------------------------------------------------------------------------------------
# Holm


def holm_by_hand(p: list[float], max_true: int | None = None) -> list[float]:
    """Holm's step-down; with `max_true`, Shaffer's multipliers min(max_true, m − k)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, min(m if max_true is None else max_true, m - k) * p[i]))
        adjusted[i] = running
    return adjusted


def test_holm_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone 0.02, 0.03, 0.06, 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert st.holm([]) == []
    rng = np.random.default_rng(0)
    p = list(rng.uniform(0, 0.2, size=9))
    assert st.holm(p) == pytest.approx(holm_by_hand(p))


def test_holm_skips_untestable_comparisons() -> None:
    assert st.holm([None, 0.01, None, 0.04]) == [None, pytest.approx(0.02), None, pytest.approx(0.04)]


def test_holm_with_shaffers_constraint() -> None:
    # 4 hypotheses of which at most 2 can be true: multipliers 2, 2, 2, 1 instead of 4, 3, 2, 1
    # sorted 0.005, 0.01, 0.03, 0.04 → ×2, ×2, ×2, ×1 = 0.01, 0.02, 0.06, 0.04 → monotone 0.01, 0.02, 0.06, 0.06
    steps = st.holm_steps([0.01, 0.04, 0.03, 0.005], max_true=2)
    assert [s[1] for s in steps if s] == [2, 1, 2, 2]
    assert [s[0] for s in steps if s] == pytest.approx([0.02, 0.06, 0.06, 0.01])
    assert [s[0] for s in steps if s] == pytest.approx(holm_by_hand([0.01, 0.04, 0.03, 0.005], max_true=2))


# ---------------------------------------------------------------------------------------------
# TOST and power against statsmodels


def test_tost_matches_statsmodels_ttost_paired() -> None:
    from statsmodels.stats.weightstats import ttost_paired

    cases = [
        ([97.0, 96.2, 97.9, 97.4], [96.8, 96.5, 97.6, 97.9], 1.0),
        ([98.0, 97.5, 98.2], [97.6, 97.9, 97.8], 1.0),
        ([80.0, 82.0, 79.0, 81.5, 80.2], [79.1, 81.0, 79.4, 80.0, 80.1], 2.5),
        ([97.0, 96.2, 97.9], [81.3, 78.0, 84.1], 1.0),
    ]
    for a, b, margin in cases:
        t = st.paired_test(dict(enumerate(a)), dict(enumerate(b)))
        ref_p, _, _ = ttost_paired(np.array(a), np.array(b), -margin, margin)
        assert st.tost_p(t, margin) == pytest.approx(ref_p, rel=1e-9, abs=1e-12)
    assert st.tost_p(st.paired_test({0: 1.0}, {0: 2.0}), 1.0) is None


def test_power_matches_statsmodels_ttest_power() -> None:
    from statsmodels.stats.power import TTestPower

    ref = TTestPower()
    for n in (2, 3, 5, 10, 40):
        for effect in (0.25, 0.5, 1.0, 2.0):
            for alpha in (0.05, 0.05 / 6):
                assert st.paired_power(effect * 3.0, 3.0, n, alpha) == pytest.approx(ref.power(effect, n, alpha))
    # far in the tail statsmodels (scipy's nct.cdf) gives NaN; ours stays a number
    assert st.paired_power(8.0, 1.0, 2, 0.05) == pytest.approx(0.6253, abs=1e-3)


def test_seeds_needed_and_minimum_detectable_difference_match_statsmodels() -> None:
    from statsmodels.stats.power import TTestPower

    ref = TTestPower()
    for sd, delta, alpha in ((2.0, 1.0, 0.025), (1.0, 1.0, 0.05), (0.8, 1.0, 0.05 / 3), (5.0, 1.0, 0.05)):
        n = st.seeds_needed(delta, sd, alpha)
        assert n == math.ceil(ref.solve_power(delta / sd, nobs=None, alpha=alpha, power=0.8))
        assert st.paired_power(delta, sd, n, alpha) >= 0.8 > st.paired_power(delta, sd, n - 1, alpha)
    assert st.seeds_needed(1.0, 40.0, 0.05) is None  # more than MAX_SEEDS
    for sd, n, alpha in ((2.0, 5, 0.025), (1.0, 3, 0.05), (5.0, 3, 0.0125), (1.0, 2, 0.05 / 6)):
        mdd = st.min_detectable(sd, n, alpha)
        assert ref.power(mdd / sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert st.min_detectable(2.0, 5, 0.025) == pytest.approx(2 * ref.solve_power(None, nobs=5, alpha=0.025, power=0.8))


# ---------------------------------------------------------------------------------------------
# three verdicts


def family(*pairs: tuple[list[float], list[float]], margin: float = 1.0) -> list[st.Comparison]:
    tests = [st.paired_test(dict(enumerate(a)), dict(enumerate(b))) for a, b in pairs]
    decisions = st.decide(tests, margin, limit=100.0)
    return [
        st.Comparison("gn(32)", "bn", 2 ** (i + 1), t, d) for i, (t, d) in enumerate(zip(tests, decisions, strict=True))
    ]


WIN = ([97.0, 96.2, 97.9], [81.3, 78.0, 84.1])
SAME = ([97.5, 97.6, 97.55, 97.4], [97.45, 97.6, 97.5, 97.5])
NOISY = ([98.0, 96.9, 98.6], [97.6, 97.9, 97.8])


def test_three_outcomes_and_their_reference_values() -> None:
    win, same, noisy = family(WIN, SAME, NOISY)
    assert (win.decision.verdict, same.decision.verdict, noisy.decision.verdict) == (
        "different",
        "equivalent",
        "inconclusive",
    )
    assert (win.claim, same.claim, noisy.claim) == ("better", "equivalent", "inconclusive")
    p = [c.test.p for c in (win, same, noisy)]
    p_eq = [st.tost_p(c.test, 1.0) for c in (win, same, noisy)]
    adjusted = holm_by_hand([*p, *p_eq], max_true=3)  # type: ignore[list-item]
    for i, c in enumerate((win, same, noisy)):
        assert c.decision.family_size == 3
        assert c.decision.p_adjusted == pytest.approx(adjusted[i])
        assert c.decision.p_equivalence_adjusted == pytest.approx(adjusted[3 + i])
    # the interval agrees with the verdict: excludes 0 / inside ±δ / includes 0 and reaches beyond ±δ
    d = win.decision
    assert d.ci_low is not None and d.ci_low > 0 and d.ci_level is not None and d.ci_level > 0.95
    assert d.min_detectable is None and d.seeds_needed is None
    d = same.decision
    assert d.ci_low is not None and d.ci_high is not None and -1.0 < d.ci_low < d.ci_high < 1.0
    d = noisy.decision
    assert d.ci_level == pytest.approx(1 - 0.05 / 3)
    assert d.ci_low is not None and d.ci_high is not None and d.ci_low < 0 < d.ci_high
    assert d.ci_low < -1.0 or d.ci_high > 1.0
    low, high = noisy.test.interval(1 - 0.05 / 3)
    assert (d.ci_low, d.ci_high) == (pytest.approx(low), pytest.approx(high))
    # power at α/m from the observed paired spread
    sd = noisy.test.std_diff
    assert sd is not None and d.alpha_adjusted == pytest.approx(0.05 / 3)
    assert d.min_detectable == pytest.approx(st.min_detectable(sd, 3, 0.05 / 3))
    assert d.seeds_needed == st.seeds_needed(1.0, sd, 0.05 / 3)


def test_verdict_intervals_always_agree_with_the_verdict() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(2, 7))
        pairs = []
        for _ in range(int(rng.integers(1, 5))):
            shift, noise = rng.choice([0.0, 0.3, 2.0, 8.0]), rng.choice([0.1, 0.5, 3.0])
            base = 90 + rng.normal(0, 1, n)
            pairs.append((list(base + shift + rng.normal(0, noise, n)), list(base)))
        for c in family(*pairs, margin=1.0):
            d = c.decision
            assert d.ci_low is not None and d.ci_high is not None
            if d.verdict == "different":
                assert d.ci_low > 0 or d.ci_high < 0
            elif d.verdict == "equivalent":
                assert d.ci_low > -1.0 and d.ci_high < 1.0
            else:
                assert d.ci_low <= 0 <= d.ci_high and (d.ci_low <= -1.0 or d.ci_high >= 1.0)
                assert d.min_detectable is not None


def test_clear_win_is_claimed_with_an_adjusted_interval_p_and_seeds() -> None:
    (c,) = family(WIN)
    d = c.decision
    assert c.claim == "better" and d.ci_level == pytest.approx(0.95)  # one comparison: no adjustment needed
    t = c.test
    assert st.comparison_sentence(c) == (
        f"At batch 2, gn(32) beats bn by {t.mean_diff:.1f} points "
        f"(adjusted 95% CI {d.ci_low:.1f} to {d.ci_high:.1f}, Holm-adjusted {st.format_p(d.p_adjusted or 0)}, 3 seeds)"
    )


def test_clear_loss_is_worded_as_trails_with_a_positive_interval() -> None:
    (c,) = family(WIN[::-1])
    assert c.claim == "worse"
    sentence = st.comparison_sentence(c)
    assert sentence.startswith("At batch 2, gn(32) trails bn by 15.9 points (adjusted 95% CI ")
    assert c.decision.ci_high is not None and f"CI {-c.decision.ci_high:.1f} to" in sentence


def test_equivalent_sentence_names_the_margin_and_the_tost() -> None:
    (c,) = family(SAME)
    sentence = st.comparison_sentence(c)
    assert sentence.startswith("At batch 2, gn(32) and bn are equivalent within ±1.0 points: difference +0.0 points, ")
    assert "lies inside ±1.0" in sentence and "equivalence test (TOST) Holm-adjusted p" in sentence
    assert "real" not in sentence
    # a real but small difference is still equivalent, and the sentence says both
    (small,) = family(([97.8, 97.9, 98.1, 97.7], [97.5, 97.6, 97.7, 97.45]))
    assert small.claim == "equivalent" and small.decision.p_adjusted is not None and small.decision.p_adjusted < 0.05
    assert "the difference itself is real" in st.comparison_sentence(small)


def test_inconclusive_sentence_gives_the_reason_and_the_seeds_needed() -> None:
    (c,) = family(NOISY)
    d = c.decision
    sentence = st.comparison_sentence(c)
    assert sentence.startswith("At batch 2, gn(32) vs bn is inconclusive: difference +0.1 points, adjusted 95% CI ")
    assert "includes 0 and reaches beyond ±1.0" in sentence
    assert f"the smallest difference detectable (80% power) is {d.min_detectable:.1f} points" in sentence
    assert f"~{d.seeds_needed} seeds would be needed to detect a 1.0-point difference" in sentence
    assert "indistinguishable" not in sentence and "beats" not in sentence and "trails" not in sentence


def test_wide_interval_with_two_seeds_is_inconclusive_not_a_claim() -> None:
    (c,) = family(([60.0, 90.0], [55.0, 40.0]))  # the "-26.8 to 36.8, 2 seeds" kind of evidence
    assert c.decision.verdict == "inconclusive"
    sentence = st.comparison_sentence(c)
    assert "inconclusive" in sentence and "clipped to the possible range" in sentence
    assert c.decision.ci_low == -100.0 or c.decision.ci_high == 100.0
    assert "not even a 100-point difference is detectable" in sentence  # never "1468.6 points"
    assert "more than 1000 seeds would be needed to detect a 1.0-point difference" in sentence


def test_holm_adjustment_can_remove_a_claim() -> None:
    (alone,) = family(WIN)
    assert alone.claim == "better"
    crowd = family(WIN, *[NOISY] * 9)  # 10 comparisons: 10 × p = 0.064
    assert crowd[0].test.p == alone.test.p and crowd[0].claim == "inconclusive"
    assert "inconclusive" in st.comparison_sentence(crowd[0])


def test_one_seed_is_not_enough_to_compare() -> None:
    (c,) = family(([97.0], [81.0]))
    assert c.claim == "too_few" and c.decision.verdict == "inconclusive"
    assert st.comparison_sentence(c) == (
        "At batch 2, gn(32) vs bn is inconclusive: not enough seeds (1 seed finished in both; "
        "observed difference +16.0 points, untested)"
    )


def test_zero_spread_wording_claims_nothing() -> None:
    (constant,) = family(([95.0, 85.0], [90.0, 80.0]))
    sentence = st.comparison_sentence(constant)
    assert "no test or interval can be formed" in sentence and "inconclusive" in sentence
    assert "beats" not in sentence
    (identical,) = family(([100.0, 100.0], [100.0, 100.0]))
    assert st.comparison_sentence(identical) == (
        "At batch 2, gn(32) vs bn is inconclusive: identical accuracy in all 2 seeds; the spread is zero, "
        "so no test or interval can be formed (more seeds would show the spread)"
    )


def test_verdicts_mention_diverged_runs_and_partial_results() -> None:
    cells = [st.CellCount("bn", 2, 3, 1, 2), st.CellCount("gn(32)", 2, 3, 3, 0)]
    cmp = family(([97.0], [81.0]))
    out = st.verdicts([2], cells, cmp, [], ["bn", "gn(32)"], runs_finished=5, runs_total=6)
    assert out[0].startswith("Partial results (5 of 6 runs finished)")
    assert out[1].startswith("bn diverged in 2 of 3 seeds at batch 2")
    assert out[2].startswith("At batch 2, gn(32) vs bn is inconclusive: not enough seeds (1 seed")
    assert len(out) == 3


def test_no_sentence_says_indistinguishable() -> None:
    comparisons = family(WIN, SAME, NOISY, ([97.0], [81.0]), ([95.0, 85.0], [90.0, 80.0]))
    text = " ".join(st.comparison_sentence(c) for c in comparisons) + " ".join(st.how_to_read(1.0, 3, 0))
    assert "indistinguishable" not in text


def test_p_value_and_level_formatting() -> None:
    assert [st.format_p(p) for p in (0.41, 0.0021, 0.0004, 0.05)] == ["p=0.41", "p=0.002", "p<0.001", "p=0.05"]
    assert [st.format_level(x) for x in (0.95, 0.975, 1 - 0.05 / 6, 0.9)] == ["95%", "97.5%", "99.2%", "90%"]


# ---------------------------------------------------------------------------------------------
# batch-size sensitivity


def test_batch_drops_pair_by_seed_from_the_best_batch() -> None:
    by_batch = {
        32: {0: 97.0, 1: 97.4, 2: 96.9},
        8: {0: 98.0, 1: 97.9, 2: 98.3},
        2: {0: 81.0, 1: 78.5, 2: 84.0},
    }
    best, drops = st.batch_drops(by_batch)
    assert best == 8 and [d.batch_size for d in drops] == [2]  # only batch sizes below the best
    ref = stats.ttest_rel([98.0, 97.9, 98.3], [81.0, 78.5, 84.0])
    assert drops[0].test.p == pytest.approx(ref.pvalue) and drops[0].test.mean_diff == pytest.approx(
        np.mean([17.0, 19.4, 14.3])
    )
    (decision,) = st.decide([drops[0].test], 1.0)
    s = st.Sensitivity("bn", best, 2, drops[0].test, decision)
    assert s.claim == "better" and decision.verdict == "different"
    (sentence,) = st.sensitivity_sentences("bn", [s])
    assert sentence.startswith("bn loses 16.9 points going from batch 8 to batch 2 (adjusted 95% CI ")


def test_flat_variant_keeps_its_accuracy_or_is_inconclusive() -> None:
    by_batch = {32: {0: 97.0, 1: 97.5, 2: 96.8}, 2: {0: 97.2, 1: 96.9, 2: 96.7}}
    best, drops = st.batch_drops(by_batch)
    assert best == 32
    decisions = st.decide([d.test for d in drops], 1.0)
    items = [st.Sensitivity("gn(32)", 32, d.batch_size, d.test, dd) for d, dd in zip(drops, decisions, strict=True)]
    assert st.sensitivity_sentences("gn(32)", items) == [
        "gn(32) keeps its accuracy within ±1.0 points from its best batch size 32 down to batch 2 "
        "(equivalence tests, Holm-adjusted p=0.04 or lower)"
    ]
    # with a narrower margin the same evidence shows neither
    decisions = st.decide([d.test for d in drops], 0.3)
    items = [st.Sensitivity("gn(32)", 32, d.batch_size, d.test, dd) for d, dd in zip(drops, decisions, strict=True)]
    assert st.sensitivity_sentences("gn(32)", items) == [
        "gn(32)'s drop from its best batch size 32 to batch 2 is inconclusive: neither a drop nor equivalence "
        "within ±0.3 points is shown (largest observed drop 0.2 points); with 3 seeds the smallest difference "
        "detectable (80% power) is 1.3 points; ~17 seeds would be needed to detect a 0.3-point difference"
    ]
    assert st.best_batch_size({4: {0: 90.0}, 16: {0: 90.0}}) == 16  # ties: the larger batch
    assert st.batch_drops({}) == (None, [])
    # one surviving seed (the others diverged) is not the reference while better-sampled cells exist
    assert st.best_batch_size({32: {2: 99.0}, 8: {0: 97.9, 1: 97.5, 2: 98.2}, 2: {0: 80.0, 1: 78.0}}) == 8


# ---------------------------------------------------------------------------------------------
# downsampling


def test_downsample_keeps_first_last_and_extremes() -> None:
    values = [0.0] * 1000
    values[137] = 50.0  # a spike
    values[802] = -20.0  # a dip
    values[999] = 1.0
    idx = st.downsample_indices(values, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
    assert 137 in idx and 802 in idx
    assert idx == sorted(set(idx))


@pytest.mark.parametrize("max_points", [3, 4, 5, 6, 7, 11, 50, 99])
def test_downsample_respects_max_points_on_random_series(max_points: int) -> None:
    rng = np.random.default_rng(max_points)
    for n in (max_points + 1, max_points + 2, 3 * max_points, 1000):
        values = list(np.cumsum(rng.normal(size=n)))
        idx = st.downsample_indices(values, max_points)
        assert len(idx) == max_points and idx == sorted(set(idx))
        assert idx[0] == 0 and idx[-1] == n - 1
        kept = [values[i] for i in idx]
        if max_points >= 4:
            assert min(kept) == min(values) and max(kept) == max(values)
        else:  # one interior slot: at least the extreme further from the end points
            assert min(kept) == min(values) or max(kept) == max(values)


def test_downsample_edge_cases() -> None:
    assert st.downsample_indices([1.0, 2.0, 3.0], 5) == [0, 1, 2]
    assert st.downsample_indices([1.0, 2.0, 3.0], 0) == [0, 1, 2]  # 0 = full resolution
    assert st.downsample_indices([1.0, 2.0, 3.0], 1) == [2]
    assert st.downsample_indices([1.0, 2.0, 3.0], 2) == [0, 2]
    assert len(st.downsample_indices([5.0] * 100, 7)) == 7  # flat series still fill the budget
    assert st.downsample_indices([], 10) == []


# ---------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_across_seeds() -> None:
    a = [(10, 1.0, 0.80), (20, 2.0, 0.90), (30, 3.0, 0.95)]
    b = [(10, 1.0, 0.70), (20, 2.0, 0.88), (30, 3.0, 0.97)]
    c = [(10, 1.0, 0.75), (20, 2.0, float("nan"))]  # diverged after epoch 1
    agg = st.aggregate([a, b, c])
    assert [p.step for p in agg] == [10, 20, 30] and [p.epoch for p in agg] == [1.0, 2.0, 3.0]
    assert [p.n for p in agg] == [3, 2, 2]
    first = agg[0]
    assert first.mean == pytest.approx(0.75) and first.std == pytest.approx(np.std([0.8, 0.7, 0.75], ddof=1))
    assert (first.min, first.max) == (0.70, 0.80)
    assert agg[2].mean == pytest.approx(0.96) and agg[2].std == pytest.approx(np.std([0.95, 0.97], ddof=1))
    single = st.aggregate([a])
    assert single[0].std is None and single[0].n == 1
    assert st.aggregate([]) == []
