"""Pure statistics behind a job's results: no database, no HTTP, unit-tested against scipy and statsmodels.

Rules, in one place (the API's field descriptions and the "how to read this" text repeat them):

* **Cell summary** — mean, sample standard deviation and a two-sided 95% Student-t interval,
  `mean ± t(0.975, n−1)·s/√n`, over the seeds that finished. "±" everywhere (CLI, report, JSON
  docs) means this half-width. Accuracy (and any other bounded metric) has its interval **clipped
  to the possible range** [0, 1] and flagged: the true mean lies in that range, so clipping never
  removes it and the coverage stays 95%. One value: mean only. **Zero spread** (every seed gave
  the same value): no interval — a t-interval of width 0 would read as certainty from, say, two
  seeds that landed on the same accuracy grid step; the reason is given instead.
* **Diverged runs** have no final accuracy. They are counted per cell (`diverged`) and named in
  the verdicts as failures of their variant, but they are left out of every mean, interval and
  test: a number for them would be invented (0%? chance level?).
* **Paired comparison** — variant vs baseline at one batch size, paired by seed (same seed = same
  initial weights and data order): differences `d_s = variant_s − baseline_s` over seeds that
  finished in both; mean, t-interval and the paired t-test (identical to `scipy.stats.ttest_rel`).
  Fewer than 2 pairs, or zero spread of the differences: no test, no interval, a note says why.
* **Three verdicts, never two.** Every comparison (and every batch-size drop) ends in exactly one:
  - *different* — the paired t-test of "no difference" is rejected after adjustment;
  - *equivalent within ±δ* — the two one-sided paired tests (TOST) of "|difference| ≥ δ" are
    rejected after adjustment (δ = the job's `equivalence_margin`, default 1 accuracy point);
    when both are rejected the verdict is *equivalent* (the difference is real but smaller than δ);
  - *inconclusive* — neither, or no test was possible; with a variance estimate, the sentence
    gives the minimum detectable difference at the current seeds and the seeds needed to detect δ.
* **One family, one adjustment.** The difference and equivalence tests of all comparisons of a job
  form one family (the batch-size drops another), adjusted by Holm's step-down with Shaffer's
  logical constraint: for one comparison "difference = 0" and "|difference| ≥ δ" cannot both be
  true, so at most m of the 2m hypotheses are true and the multiplier at step i is
  min(m, 2m − i + 1). The first step is the Bonferroni m, as in plain Holm over the m difference
  tests; the chance of any false claim of either kind, anywhere in the job, stays ≤ 5%.
* **Intervals agree with the adjustment.** The sentence shows the interval the verdict rests on, at
  the adjusted level: *different* — the two-sided interval at 1 − α/k (k = the test's Holm
  multiplier), which then excludes 0; *equivalent* — the TOST interval at 1 − 2α/k, which then
  lies inside ±δ; *inconclusive* — the simultaneous (Bonferroni) interval at 1 − α/m, which then
  includes 0 and reaches beyond ±δ. The unadjusted 95% interval stays in the JSON, labelled so.
* **Power** (inconclusive comparisons with a variance estimate): paired t, two-sided, α/m (the
  strictest step, so the numbers hold at any step), power 0.8, the observed standard deviation of
  the differences; the same computation as `statsmodels.stats.power.TTestPower`.
* **Batch-size sensitivity** — per variant, the best batch size is the one with the highest mean
  final accuracy (ties: the larger batch), among batch sizes with at least 2 finished seeds
  when there are any. The drop to each smaller batch size is paired by seed with the same
  machinery. Choosing the best batch from the same data makes drops slightly optimistic.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
# The seed search for "seeds needed" stops here; beyond it the answer is "more than MAX_SEEDS".
MAX_SEEDS = 1000
# Spreads below this (relative to max(1, |mean|)) count as zero: float rounding of k/N − j/N
# must not turn "the same difference every seed" into a huge t statistic.
ZERO_SPREAD = 1e-9

Verdict = Literal["different", "equivalent", "inconclusive"]
# The verdict's finer reason: `better`/`worse` are *different* by sign, the last four *inconclusive* with no test.
Claim = Literal["better", "worse", "equivalent", "inconclusive", "identical", "constant", "too_few", "no_data"]
VERDICT_OF: dict[str, Verdict] = {"better": "different", "worse": "different", "equivalent": "equivalent"}


def _zero(sd: float, mean: float) -> bool:
    return sd <= ZERO_SPREAD * max(1.0, abs(mean))


# ----------------------------------------------------------------------------------------------
# summaries and intervals


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and 95% t-interval of finite values; `note` says why there is no interval
    or that it was clipped to the metric's range."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    half_width: float | None = None
    clipped: bool = False
    note: str | None = None


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value of Student's t with n−1 degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def summarize(
    values: Sequence[float], confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None
) -> Summary:
    """`bounds`: the metric's possible range (accuracy: (0, 1)); the interval is clipped to it."""
    vals = [float(v) for v in values if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return Summary(0, None, None, None, None, note="no finished value")
    mean = statistics.fmean(vals)
    if n == 1:
        return Summary(1, mean, None, None, None, note="1 value: an interval needs at least 2")
    sd = statistics.stdev(vals)
    if _zero(sd, mean):
        return Summary(
            n,
            mean,
            0.0,
            None,
            None,
            note=f"all {n} values are equal: the spread is zero, so no interval can be formed "
            "(this is not certainty; more seeds would show the spread)",
        )
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    clipped = False
    note = None
    if bounds is not None and (low < bounds[0] or high > bounds[1]):
        low, high, clipped = max(low, bounds[0]), min(high, bounds[1]), True
        note = (
            f"interval clipped to the possible range {bounds[0]:g}..{bounds[1]:g} "
            f"(the t-interval mean ± {half:.4g} does not know the bound; the true mean is inside it, "
            "so coverage is unchanged)"
        )
    return Summary(n, mean, sd, low, high, half, clipped, note)


# ----------------------------------------------------------------------------------------------
# paired t-test, TOST and the family adjustment


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of `a − b` over the seeds both have (unadjusted 95% interval)."""

    n: int
    seeds: tuple[int, ...]
    mean_diff: float | None
    std_diff: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None
    p: float | None
    zero_spread: bool
    note: str | None

    @property
    def testable(self) -> bool:
        return self.p is not None

    def interval(self, confidence: float) -> tuple[float, float]:
        """Two-sided t-interval of the mean difference at `confidence` (testable tests only)."""
        assert self.mean_diff is not None and self.std_diff is not None and self.n >= 2
        half = t_quantile(self.n, confidence) * self.std_diff / math.sqrt(self.n)
        return self.mean_diff - half, self.mean_diff + half


def paired_test(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE, unit: str = "points"
) -> PairedTest:
    """Paired t-test of a − b by seed; the same numbers as `scipy.stats.ttest_rel(a, b)`."""
    seeds = tuple(sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s])))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    if n == 0:
        return PairedTest(0, seeds, None, None, None, None, None, None, False, "no seed finished in both")
    mean = statistics.fmean(diffs)
    if n == 1:
        note = "1 paired seed: an interval and a p-value need at least 2 seeds that finished in both"
        return PairedTest(1, seeds, mean, None, None, None, None, None, False, note)
    sd = statistics.stdev(diffs)
    if _zero(sd, mean):
        what = "identical results" if abs(mean) <= ZERO_SPREAD else f"the same difference ({mean:+.2f} {unit})"
        note = (
            f"every one of {n} seeds gave {what}: the spread is zero, so no test and no interval can be formed "
            "and nothing is claimed"
        )
        return PairedTest(n, seeds, mean, 0.0, None, None, None, None, True, note)
    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = t_quantile(n, confidence) * se
    return PairedTest(n, seeds, mean, sd, mean - half, mean + half, t, p, False, None)


def tost_p(test: PairedTest, margin: float) -> float | None:
    """p-value of the two one-sided paired tests of |mean difference| ≥ margin (the larger of the two
    one-sided p-values); as `statsmodels.stats.weightstats.ttost_paired(a, b, -margin, margin)`."""
    if not test.testable:
        return None
    assert test.mean_diff is not None and test.std_diff is not None
    se = test.std_diff / math.sqrt(test.n)
    df = test.n - 1
    p_low = float(stats.t.sf((test.mean_diff + margin) / se, df))  # H0: diff ≤ −margin
    p_high = float(stats.t.cdf((test.mean_diff - margin) / se, df))  # H0: diff ≥ +margin
    return max(p_low, p_high)


def holm_steps(pvalues: Sequence[float | None], max_true: int | None = None) -> list[tuple[float, int] | None]:
    """Holm's step-down: per p-value, (adjusted p, multiplier at its step); None entries are not tests.

    The multiplier at step i (1-based) of M tests is M − i + 1; with `max_true` (Shaffer's logical
    constraint: at most that many null hypotheses can be true together) it is min(max_true, M − i + 1).
    Adjusted p-values are the running maximum of multiplier·p, capped at 1.
    """
    tested = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i] or 0.0)
    m = len(tested)
    cap = m if max_true is None else min(max_true, m)
    out: list[tuple[float, int] | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(tested):
        p = pvalues[i]
        assert p is not None
        k = min(cap, m - rank)
        running = max(running, min(1.0, k * p))
        out[i] = (running, k)
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values; None entries are not tests and stay None."""
    return [None if s is None else s[0] for s in holm_steps(pvalues)]


# ----------------------------------------------------------------------------------------------
# power of the paired t-test


def paired_power(diff: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test to detect a true mean difference `diff` with n pairs of
    standard deviation `sd`; as `statsmodels.stats.power.TTestPower().power(diff / sd, n, alpha)`."""
    df = n - 1
    nc = abs(diff) / sd * math.sqrt(n)
    crit = float(stats.t.isf(alpha / 2, df))
    # P(T > crit) + P(T < −crit) for T ~ nct(df, nc); the second written as P(T' > crit), T' ~ nct(df, −nc),
    # because scipy's nct.cdf returns NaN far in the tail where the value is ~0.
    near = float(stats.nct.sf(crit, df, nc))
    if math.isnan(near):
        near = 1.0 - float(stats.nct.cdf(crit, df, nc))
    far = float(stats.nct.sf(crit, df, -nc))
    return near + (0.0 if math.isnan(far) else far)


def min_detectable(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest true difference the paired t-test detects with probability `power` (n ≥ 2, sd > 0)."""
    high = sd
    while paired_power(high, sd, n, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, high, xtol=1e-10 * sd))


def seeds_needed(diff: float, sd: float, alpha: float, power: float = POWER) -> int | None:
    """Fewest seeds (pairs) for the paired t-test to detect `diff` with probability `power`; None when
    more than MAX_SEEDS would be needed. Power grows with n, so a bisection finds the first n."""
    if paired_power(diff, sd, MAX_SEEDS, alpha) < power:
        return None
    low, high = 1, MAX_SEEDS  # power(low) < target (n = 1 has no test), power(high) ≥ target
    while high - low > 1:
        mid = (low + high) // 2
        if mid >= 2 and paired_power(diff, sd, mid, alpha) >= power:
            high = mid
        else:
            low = mid
    return high


# ----------------------------------------------------------------------------------------------
# decisions: one family of paired tests → one verdict each


@dataclass(frozen=True)
class Decision:
    """The verdict on one paired test of a family and the numbers that justify it."""

    claim: Claim
    margin: float
    p_adjusted: float | None  # the difference test, adjusted in the family
    p_equivalence: float | None  # TOST, unadjusted
    p_equivalence_adjusted: float | None
    ci_level: float | None  # confidence of the interval below: the one the verdict rests on
    ci_low: float | None
    ci_high: float | None
    family_size: int  # m: testable comparisons in the family
    alpha_adjusted: float | None  # α/m, the level the power numbers use
    min_detectable: float | None  # inconclusive only: at the current seeds, power 0.8
    seeds_needed: int | None  # inconclusive only: to detect `margin`; None = more than MAX_SEEDS or no estimate
    clipped: bool = False  # the interval was cut to the possible range of the difference
    limit: float | None = None  # the largest possible |difference| (100 for accuracy points)

    @property
    def verdict(self) -> Verdict:
        return VERDICT_OF.get(self.claim, "inconclusive")


def _untestable(test: PairedTest) -> Claim:
    if test.n == 0:
        return "no_data"
    if test.n < 2:
        return "too_few"
    return "identical" if abs(test.mean_diff or 0.0) <= ZERO_SPREAD else "constant"


def decide(
    tests: Sequence[PairedTest], margin: float, alpha: float = ALPHA, limit: float | None = None
) -> list[Decision]:
    """A verdict for every test of one family (see the module docstring for the rules). `limit`: the
    largest possible |difference| (100 for accuracy points); intervals are clipped to ±limit, which
    changes neither "includes 0" nor "inside ±margin"."""
    equivalence = [tost_p(t, margin) for t in tests]
    m = sum(t.testable for t in tests)
    steps = holm_steps([t.p for t in tests] + equivalence, max_true=m)
    out = []
    for i, t in enumerate(tests):
        if not t.testable:
            out.append(Decision(_untestable(t), margin, None, None, None, None, None, None, m, None, None, None))
            continue
        diff_step, eq_step = steps[i], steps[len(tests) + i]
        assert diff_step is not None and eq_step is not None and t.mean_diff is not None and t.std_diff is not None
        (p_adj, k_diff), (p_eq_adj, k_eq) = diff_step, eq_step
        mdd = seeds = None
        if p_eq_adj < alpha:  # the TOST interval at 1 − 2α/k lies inside ±margin
            claim: Claim = "equivalent"
            level = 1 - 2 * alpha / k_eq
        elif p_adj < alpha:  # the interval at 1 − α/k excludes 0
            claim = "better" if t.mean_diff > 0 else "worse"
            level = 1 - alpha / k_diff
        else:  # the simultaneous interval at 1 − α/m includes 0 and reaches beyond ±margin
            claim = "inconclusive"
            level = 1 - alpha / m
            mdd = min_detectable(t.std_diff, t.n, alpha / m)
            seeds = seeds_needed(margin, t.std_diff, alpha / m)
        low, high = t.interval(level)
        clipped = limit is not None and (low < -limit or high > limit)
        if limit is not None:
            low, high = max(low, -limit), min(high, limit)
        out.append(
            Decision(
                claim,
                margin,
                p_adj,
                equivalence[i],
                p_eq_adj,
                level,
                low,
                high,
                m,
                alpha / m,
                mdd,
                seeds,
                clipped,
                limit,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# batch-size sensitivity


@dataclass(frozen=True)
class Drop:
    """Accuracy lost going from the best batch size to a smaller one: best − smaller, by seed."""

    batch_size: int
    test: PairedTest


def best_batch_size(by_batch: Mapping[int, Mapping[int, float]]) -> int | None:
    """Batch size with the highest mean over its finished seeds (ties: the larger batch), among the
    batch sizes with at least 2 finished seeds when there are any: a cell where one seed survived
    (the others diverged) must not become the reference every drop is measured from."""
    means = {b: statistics.fmean(v.values()) for b, v in by_batch.items() if v}
    pool = {b: m for b, m in means.items() if len(by_batch[b]) >= 2} or means
    if not pool:
        return None
    return max(pool, key=lambda b: (pool[b], b))


def batch_drops(by_batch: Mapping[int, Mapping[int, float]]) -> tuple[int | None, list[Drop]]:
    """`by_batch[b][seed] = accuracy`; the best batch and a paired drop for every smaller batch size."""
    best = best_batch_size(by_batch)
    if best is None:
        return None, []
    drops = [Drop(b, paired_test(by_batch[best], by_batch[b])) for b in sorted(by_batch, reverse=True) if b < best]
    return best, drops


# ----------------------------------------------------------------------------------------------
# curves: shape-keeping downsampling and aggregation across seeds


def downsample_indices(values: Sequence[float], max_points: int) -> list[int]:
    """Indices of at most `max_points` values that keep the shape of the series.

    Keeps the first and the last point; splits the interior into equal buckets and keeps each
    bucket's minimum and maximum (in step order), so every peak, dip and the global extremes
    survive. Returns exactly `max_points` indices when the series is longer. `max_points <= 0`
    (or a short series) keeps everything. With `max_points == 1`, only the last point.
    """
    n = len(values)
    if max_points <= 0 or n <= max_points:
        return list(range(n))
    if max_points == 1:
        return [n - 1]
    if max_points == 2:
        return [0, n - 1]
    slots = max_points - 2
    m = n - 2  # interior points, > slots
    buckets = (slots + 1) // 2  # every bucket holds >= 2 points because m >= slots + 1 >= 2 * buckets
    edges = [1 + round(j * m / buckets) for j in range(buckets + 1)]
    gmin = min(range(n), key=lambda i: values[i])
    gmax = max(range(n), key=lambda i: values[i])
    single = None  # with an odd number of slots one bucket keeps a single point
    if slots % 2:

        def extremes_in(j: int) -> int:
            return sum(edges[j] <= g < edges[j + 1] for g in {gmin, gmax})

        single = min(range(buckets), key=lambda j: (extremes_in(j), j))
    keep = {0, n - 1}
    for j in range(buckets):
        idx = range(edges[j], edges[j + 1])
        lo = min(idx, key=lambda i: values[i])
        hi = max(idx, key=lambda i: values[i])
        if j == single:
            inside = [g for g in (gmin, gmax) if g in idx]
            if len(inside) == 1:
                keep.add(inside[0])
            else:  # none (or both, only with one bucket): the point furthest from the end-to-end line
                ref = (values[0] + values[-1]) / 2
                keep.add(max(idx, key=lambda i: abs(values[i] - ref)))
        elif lo == hi:  # a flat bucket: its ends
            keep.update((idx[0], idx[-1]))
        else:
            keep.update((lo, hi))
    return sorted(keep)


@dataclass(frozen=True)
class AggregatePoint:
    """One step of a metric across the seeds of a cell."""

    step: int
    epoch: float
    n: int
    mean: float
    std: float | None
    min: float
    max: float


def aggregate(series: Sequence[Sequence[tuple[int, float, float]]]) -> list[AggregatePoint]:
    """Per step, over the series that have a finite value there: mean, sample std, min, max.

    Each series is `(step, epoch, value)` in step order; seeds of one cell share their steps
    (same budget and batch size), so aligning on the step aligns epochs too.
    """
    at: dict[int, list[float]] = {}
    epoch_of: dict[int, float] = {}
    for s in series:
        for step, epoch, value in s:
            if math.isfinite(value):
                at.setdefault(step, []).append(value)
                epoch_of.setdefault(step, epoch)
    out = []
    for step in sorted(at):
        vals = at[step]
        out.append(
            AggregatePoint(
                step=step,
                epoch=epoch_of[step],
                n=len(vals),
                mean=statistics.fmean(vals),
                std=statistics.stdev(vals) if len(vals) > 1 else None,
                min=min(vals),
                max=max(vals),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# verdicts


@dataclass(frozen=True)
class CellCount:
    variant: str
    batch_size: int
    n_total: int
    finished: int
    diverged: int


class _Decided:
    """A paired test with its decision; `claim` is the decision's."""

    test: PairedTest
    decision: Decision

    @property
    def claim(self) -> Claim:
        return self.decision.claim


@dataclass(frozen=True)
class Comparison(_Decided):
    """`variant` against `baseline` at one batch size."""

    variant: str
    baseline: str
    batch_size: int
    test: PairedTest
    decision: Decision


@dataclass(frozen=True)
class Sensitivity(_Decided):
    """`variant` at `batch_size` against the same variant at its best batch size (the drop)."""

    variant: str
    best_batch_size: int
    batch_size: int
    test: PairedTest
    decision: Decision


def format_p(p: float) -> str:
    if p < 0.001:
        return "p<0.001"
    text = f"{p:.3f}" if p < 0.01 else f"{p:.2f}"
    if p < 0.05 <= float(text):  # never print a significant p as "0.05"
        text = f"{p:.4f}"
    return f"p={text}"


def format_level(level: float) -> str:
    """A confidence level as people write it: 0.95 → "95%", 0.98333 → "98.3%"."""
    return f"{100 * level:.1f}".removesuffix(".0") + "%"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _points(x: float) -> str:
    return f"{x:.1f} point" if round(x, 1) == 1 else f"{x:.1f} points"


def _a_difference(x: float) -> str:
    return f"a {x:.1f}-point difference"


def _ci(d: Decision, sign: float = 1.0) -> str:
    """The interval the verdict rests on, with its adjusted level ("sign" −1 flips it for "trails")."""
    assert d.ci_low is not None and d.ci_high is not None and d.ci_level is not None
    low, high = sorted((sign * d.ci_low, sign * d.ci_high))
    clipped = " (clipped to the possible range)" if d.clipped else ""
    return f"adjusted {format_level(d.ci_level)} CI {low:.1f} to {high:.1f}{clipped}"


def power_text(d: Decision, n: int) -> str:
    """What more seeds would buy, for an inconclusive verdict with a variance estimate ('' without one)."""
    if d.min_detectable is None:
        return ""
    if d.limit is not None and d.min_detectable > d.limit:
        text = f"with {_seeds(n)} and this spread not even a {d.limit:g}-point difference is detectable (80% power)"
    else:
        text = f"with {_seeds(n)} the smallest difference detectable (80% power) is {_points(d.min_detectable)}"
    if d.seeds_needed is None:
        return f"{text}; more than {MAX_SEEDS} seeds would be needed to detect {_a_difference(d.margin)}"
    if d.seeds_needed <= n:
        return f"{text}; the current seeds already give 80% power for {_a_difference(d.margin)}, yet neither verdict was reached"
    return f"{text}; ~{d.seeds_needed} seeds would be needed to detect {_a_difference(d.margin)}"


def _untested_reason(claim: Claim, t: PairedTest, unit_what: str) -> str:
    if claim == "no_data":
        return "no seed has finished in both"
    if claim == "too_few":
        return f"not enough seeds (1 seed finished in both; observed difference {t.mean_diff:+.1f} points, untested)"
    if claim == "identical":
        return (
            f"identical {unit_what} in all {_seeds(t.n)}; the spread is zero, so no test or interval can be formed "
            "(more seeds would show the spread)"
        )
    return (
        f"the difference is exactly {t.mean_diff:+.1f} points in every one of {_seeds(t.n)}; the spread is zero, "
        "so no test or interval can be formed and nothing is claimed"
    )


def comparison_sentence(c: Comparison) -> str:
    t, d, v, base, b = c.test, c.decision, c.variant, c.baseline, c.batch_size
    claim = c.claim
    if not t.testable:
        return f"At batch {b}, {v} vs {base} is inconclusive: {_untested_reason(claim, t, 'accuracy')}"
    assert t.mean_diff is not None and d.p_adjusted is not None and d.p_equivalence_adjusted is not None
    p_diff = f"Holm-adjusted {format_p(d.p_adjusted)}"
    p_eq = f"equivalence test (TOST) Holm-adjusted {format_p(d.p_equivalence_adjusted)}"
    margin = f"±{d.margin:.1f}"
    if claim == "better":
        return f"At batch {b}, {v} beats {base} by {_points(t.mean_diff)} ({_ci(d)}, {p_diff}, {_seeds(t.n)})"
    if claim == "worse":
        return f"At batch {b}, {v} trails {base} by {_points(-t.mean_diff)} ({_ci(d, -1)}, {p_diff}, {_seeds(t.n)})"
    if claim == "equivalent":
        real = f"; the difference itself is real ({p_diff}) but smaller than {margin}" if d.p_adjusted < ALPHA else ""
        return (
            f"At batch {b}, {v} and {base} are equivalent within {margin} points: difference {t.mean_diff:+.1f} points, "
            f"{_ci(d)} lies inside {margin} ({p_eq}, {_seeds(t.n)}){real}"
        )
    power = power_text(d, t.n)
    return (
        f"At batch {b}, {v} vs {base} is inconclusive: difference {t.mean_diff:+.1f} points, {_ci(d)} includes 0 "
        f"and reaches beyond {margin} ({p_diff}; {p_eq}; {_seeds(t.n)})" + (f"; {power}" if power else "")
    )


def sensitivity_sentences(variant: str, items: Sequence[Sensitivity]) -> list[str]:
    if not items:
        return []
    best = items[0].best_batch_size
    out = []
    held: list[Sensitivity] = []
    open_: list[Sensitivity] = []
    for s in items:
        t, d = s.test, s.decision
        if s.claim == "better":
            assert t.mean_diff is not None and d.p_adjusted is not None
            out.append(
                f"{variant} loses {_points(t.mean_diff)} going from batch {best} to batch {s.batch_size} "
                f"({_ci(d)}, Holm-adjusted {format_p(d.p_adjusted)}, {_seeds(t.n)})"
            )
        elif s.claim == "worse":
            assert t.mean_diff is not None and d.p_adjusted is not None
            out.append(
                f"{variant} scores {_points(-t.mean_diff)} higher at batch {s.batch_size} than at batch {best} "
                f"on the seeds both finished ({_ci(d, -1)}, Holm-adjusted {format_p(d.p_adjusted)}, {_seeds(t.n)})"
            )
        elif s.claim == "equivalent":
            held.append(s)
        else:
            open_.append(s)
    if held:
        margin = held[0].decision.margin
        worst = max(held, key=lambda s: s.decision.p_equivalence_adjusted or 0.0).decision
        assert worst.p_equivalence_adjusted is not None
        out.append(
            f"{variant} keeps its accuracy within ±{margin:.1f} points from its best batch size {best} down to batch "
            f"{', '.join(str(s.batch_size) for s in held)} (equivalence tests, Holm-adjusted "
            f"{format_p(worst.p_equivalence_adjusted)} or lower)"
        )
    tested = [s for s in open_ if s.test.testable]
    if tested:
        largest = max((s.test.mean_diff or 0.0) for s in tested)
        powers = [p for s in tested if (p := power_text(s.decision, s.test.n))]
        out.append(
            f"{variant}'s drop from its best batch size {best} to batch {', '.join(str(s.batch_size) for s in tested)} "
            f"is inconclusive: neither a drop nor equivalence within ±{tested[0].decision.margin:.1f} points is "
            f"shown (largest observed drop {largest:.1f} points)"
            + (f"; {powers[0]}" if len(tested) == 1 and powers else "")
        )
    untested = [s for s in open_ if not s.test.testable]
    if untested:
        n = max(s.test.n for s in untested)
        batches = ", ".join(str(s.batch_size) for s in untested)
        why = "zero spread across seeds" if any(s.test.zero_spread for s in untested) else "not enough seeds"
        out.append(
            f"{variant}'s drop from batch {best} to batch {batches} is inconclusive: {why} "
            f"({_seeds(n)} paired), so no test is possible"
        )
    return out


def verdicts(
    batch_sizes: Sequence[int],
    cells: Sequence[CellCount],
    comparisons: Sequence[Comparison],
    sensitivity: Sequence[Sensitivity],
    variants: Sequence[str],
    runs_finished: int | None = None,
    runs_total: int | None = None,
) -> list[str]:
    """Plain sentences from the numbers; never claims what the adjusted tests do not support."""
    out: list[str] = []
    if runs_total is not None and runs_finished is not None and runs_finished < runs_total:
        out.append(f"Partial results ({runs_finished} of {runs_total} runs finished): these statements can change")
    for b in batch_sizes:
        for c in cells:
            if c.batch_size == b and c.diverged:
                out.append(
                    f"{c.variant} diverged in {c.diverged} of {c.n_total} seeds at batch {b} "
                    "(a failure of the variant; left out of its mean)"
                )
        for cmp in comparisons:
            if cmp.batch_size == b:
                out.append(comparison_sentence(cmp))
    for v in variants:
        out.extend(sensitivity_sentences(v, [s for s in sensitivity if s.variant == v]))
    return out


def how_to_read(margin: float, comparisons: int, drops: int, alpha: float = ALPHA) -> list[str]:
    """The short "how to read this" text the CLI and the report show under the verdicts."""
    family = f"{comparisons} comparison{'s' if comparisons != 1 else ''} with a test"
    if drops:
        family += f" (and, separately, its {drops} batch-size drop{'s' if drops != 1 else ''})"
    return [
        "± after a mean is the half-width of its 95% interval over seeds (Student t). Accuracy intervals are "
        "clipped to 0–100%; a cell whose seeds all gave the same value has no interval (zero spread is not "
        "certainty: more seeds would show the spread).",
        f"Every comparison ends in one of three verdicts: different (the paired t-test by seed is significant), "
        f"equivalent within ±{margin:.1f} points (two one-sided tests, TOST: the difference is shown to be smaller "
        "than the margin), or inconclusive (neither; the sentence says how many seeds would be needed).",
        f"p-values are Holm-adjusted over the job's {family}, difference and equivalence tests together, so the "
        f"chance of any false claim stays under {100 * alpha:g}%. The interval in each sentence is at the matching "
        "adjusted level (e.g. 97.5% instead of 95%): it excludes 0 when a difference is claimed, lies inside the "
        "margin when equivalence is, and does neither when the verdict is inconclusive. The JSON also keeps the "
        "unadjusted 95% interval (`ci95_*`).",
        "Differences are in accuracy points (percentage points), paired by seed: the same seed gives the same "
        "initial weights and data order in every cell.",
    ]
