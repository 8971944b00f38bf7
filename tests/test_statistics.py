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
    assert st.summarize([]) == st.Summary(0, None, None, None, None)
    assert st.summarize([0.9]) == st.Summary(1, 0.9, None, None, None)
    flat = st.summarize([0.5, 0.5, 0.5])
    assert flat == st.Summary(3, 0.5, 0.0, 0.5, 0.5)  # zero spread: the interval collapses, no NaN
    assert st.summarize([0.5, float("nan"), float("inf"), 0.7]).n == 2


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


def test_zero_spread_differences_give_no_p_value_and_no_nan() -> None:
    # accuracies on a k/N grid: 95−90, 85−80, 75−70 are "the same" 5 points up to float rounding
    a = {0: 0.95 * 100, 1: 0.85 * 100, 2: 0.75 * 100}
    b = {0: 0.90 * 100, 1: 0.80 * 100, 2: 0.70 * 100}
    t = st.paired_test(a, b)
    assert t.zero_spread and t.p is None and t.t is None
    assert t.mean_diff == pytest.approx(5.0) and t.ci_low == t.ci_high == t.mean_diff
    assert t.note and "zero spread" in t.note
    same = st.paired_test({0: 100.0, 1: 100.0}, {0: 100.0, 1: 100.0})
    assert same.zero_spread and same.p is None and same.mean_diff == 0.0
    assert st.classify(t, None) == "constant" and st.classify(same, None) == "identical"
    values = [v for v in (t.mean_diff, t.ci_low, t.ci_high, same.mean_diff) if v is not None]
    assert all(math.isfinite(v) for v in values)


# ---------------------------------------------------------------------------------------------
# Holm


def holm_by_hand(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
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


# ---------------------------------------------------------------------------------------------
# verdict wording


def comparison(a: list[float], b: list[float], p_holm: float | None = None, batch: int = 2) -> st.Comparison:
    t = st.paired_test(dict(enumerate(a)), dict(enumerate(b)))
    return st.Comparison("gn(32)", "bn", batch, t, t.p if p_holm is None else p_holm)


def test_clear_win_is_claimed_with_interval_p_and_seeds() -> None:
    c = comparison([97.0, 96.2, 97.9], [81.3, 78.0, 84.1])
    assert c.claim == "better"
    t = c.test
    assert st.comparison_sentence(c) == (
        f"At batch 2, gn(32) beats bn by {t.mean_diff:.1f} points "
        f"(95% CI {t.ci_low:.1f} to {t.ci_high:.1f}, Holm-adjusted {st.format_p(t.p or 0)}, 3 seeds)"
    )


def test_clear_loss_is_worded_as_trails_with_a_positive_interval() -> None:
    c = comparison([81.3, 78.0, 84.1], [97.0, 96.2, 97.9])
    assert c.claim == "worse"
    sentence = st.comparison_sentence(c)
    assert sentence.startswith("At batch 2, gn(32) trails bn by 15.9 points (95% CI ")
    assert c.test.ci_high is not None and f"{-c.test.ci_high:.1f} to" in sentence


def test_non_significant_difference_is_indistinguishable() -> None:
    c = comparison([98.0, 97.5, 98.2], [97.6, 97.9, 97.8], batch=32)
    assert c.claim == "indistinguishable"
    sentence = st.comparison_sentence(c)
    assert sentence.startswith(
        f"bn and gn(32) are indistinguishable at batch 32 (Holm-adjusted {st.format_p(c.p_holm or 0)}"
    )
    assert "beats" not in sentence and "trails" not in sentence


def test_holm_adjustment_can_remove_a_claim() -> None:
    c = comparison([97.0, 96.2, 97.9], [81.3, 78.0, 84.1])
    assert c.test.p is not None and c.test.p < 0.05
    adjusted = st.Comparison(c.variant, c.baseline, c.batch_size, c.test, 0.07)
    assert adjusted.claim == "indistinguishable" and "indistinguishable" in st.comparison_sentence(adjusted)


def test_one_seed_is_not_enough_to_compare() -> None:
    c = comparison([97.0], [81.0])
    assert c.claim == "too_few"
    assert st.comparison_sentence(c) == (
        "Not enough seeds to compare gn(32) with bn at batch 2 (1 seed; observed difference +16.0 points, untested)"
    )


def test_zero_spread_wording_claims_nothing() -> None:
    constant = comparison([95.0, 85.0], [90.0, 80.0])
    assert "no test is possible" in st.comparison_sentence(constant)
    assert "beats" not in st.comparison_sentence(constant)
    identical = comparison([100.0, 100.0], [100.0, 100.0])
    assert st.comparison_sentence(identical) == (
        "bn and gn(32) are indistinguishable at batch 2: identical accuracy in all 2 seeds"
    )


def test_verdicts_mention_diverged_runs_and_partial_results() -> None:
    cells = [st.CellCount("bn", 2, 3, 1, 2), st.CellCount("gn(32)", 2, 3, 3, 0)]
    cmp = [comparison([97.0], [81.0])]
    out = st.verdicts([2], cells, cmp, [], ["bn", "gn(32)"], runs_finished=5, runs_total=6)
    assert out[0].startswith("Partial results (5 of 6 runs finished)")
    assert out[1].startswith("bn diverged in 2 of 3 seeds at batch 2")
    assert out[2].startswith("Not enough seeds to compare gn(32) with bn at batch 2 (1 seed")
    assert len(out) == 3


def test_p_value_formatting() -> None:
    assert [st.format_p(p) for p in (0.41, 0.0021, 0.0004, 0.05)] == ["p=0.41", "p=0.002", "p<0.001", "p=0.05"]


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
    s = st.Sensitivity("bn", best, 2, drops[0].test, drops[0].test.p)
    assert s.claim == "better"
    (sentence,) = st.sensitivity_sentences("bn", [s])
    assert sentence.startswith("bn loses 16.9 points going from batch 8 to batch 2 (95% CI ")


def test_flat_variant_shows_no_significant_drop() -> None:
    by_batch = {32: {0: 97.0, 1: 97.5, 2: 96.8}, 2: {0: 97.2, 1: 96.9, 2: 96.7}}
    best, drops = st.batch_drops(by_batch)
    assert best == 32
    items = [st.Sensitivity("gn(32)", 32, d.batch_size, d.test, d.test.p) for d in drops]
    assert st.sensitivity_sentences("gn(32)", items) == [
        "gn(32) shows no significant drop from its best batch size 32 to batch 2 (largest observed drop 0.2 points)"
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
