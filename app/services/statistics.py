"""Pure statistics behind a job's results: no database, no HTTP, unit-tested against scipy.

Rules, in one place (the API's field descriptions repeat them):

* **Cell summary** — mean, sample standard deviation and a two-sided 95% Student-t interval,
  `mean ± t(0.975, n−1)·s/√n`, over the seeds that finished. One value: mean only. Zero spread:
  the interval collapses to the mean (that is what the formula gives with s = 0).
* **Diverged runs** have no final accuracy. They are counted per cell (`diverged`) and named in
  the verdicts as failures of their variant, but they are left out of every mean, interval and
  test: a number for them would be invented (0%? chance level?), and mixing it in would make the
  interval describe the invention rather than the training.
* **Paired comparison** — variant vs baseline at one batch size, paired by seed (same seed = same
  initial weights and data order): differences `d_s = variant_s − baseline_s` over seeds that
  finished in both; mean, 95% t-interval and the paired t-test (identical to
  `scipy.stats.ttest_rel`). Fewer than 2 pairs: no interval, no p-value, a note says why.
* **Zero spread of the differences** (every seed gave the same difference, which the discrete
  accuracy k/N makes likely near saturation): the t statistic is 0/0 or ±∞ and the test is
  degenerate. We report the difference with an interval collapsed onto it, **no p-value**, keep
  the comparison out of the Holm family, and claim nothing: "identical in every seed" when the
  difference is 0, otherwise "the same difference in every seed; no test possible". Claiming p=0
  from, say, two seeds that happen to land on the same accuracy grid step would overstate the
  evidence.
* **Holm correction** over every p-value of one family (all variant-vs-baseline comparisons of a
  job; separately, all batch-size drops of a job): sort ascending, `p_(i)·(m−i+1)`, running
  maximum, capped at 1.
* **A claim** ("beats", "trails", "loses … points") is made only when the Holm-adjusted p < 0.05
  AND the 95% interval excludes 0; otherwise the sentence says indistinguishable, or why no test
  was possible.
* **Batch-size sensitivity** — per variant, the best batch size is the one with the highest mean
  final accuracy (ties: the larger batch), among batch sizes with at least 2 finished seeds
  when there are any (one surviving seed is no reference to measure from). The drop to each smaller batch size is paired by seed
  (every cell trains the same seeds, so seed-to-seed variation cancels), with the same paired
  t machinery as the comparisons. Choosing the best batch from the same data makes drops slightly
  optimistic; the Holm correction and the interval rule keep the claims conservative.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
# Differences whose spread is below this (in the caller's units) count as zero spread: float
# rounding of k/N − j/N must not turn "the same difference every seed" into a huge t statistic.
ZERO_SPREAD = 1e-9

Claim = Literal["better", "worse", "indistinguishable", "identical", "constant", "too_few", "no_data"]


# ----------------------------------------------------------------------------------------------
# summaries and intervals


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and 95% t-interval of finite values."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value of Student's t with n−1 degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    vals = [float(v) for v in values if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = statistics.fmean(vals)
    if n == 1:
        return Summary(1, mean, None, None, None)
    sd = statistics.stdev(vals)
    half = t_quantile(n, confidence) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


# ----------------------------------------------------------------------------------------------
# paired t-test and Holm


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of `a − b` over the seeds both have."""

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
        return PairedTest(
            1,
            seeds,
            mean,
            None,
            None,
            None,
            None,
            None,
            False,
            "1 paired seed: an interval and a p-value need at least 2 seeds that finished in both",
        )
    sd = statistics.stdev(diffs)
    if sd <= ZERO_SPREAD * max(1.0, abs(mean)):
        what = "identical results" if abs(mean) <= ZERO_SPREAD else f"the same difference ({mean:+.2f} {unit})"
        return PairedTest(
            n,
            seeds,
            mean,
            0.0,
            mean,
            mean,
            None,
            None,
            True,
            f"every one of {n} seeds gave {what}: with zero spread the t-test is undefined, "
            "so there is no p-value, the interval collapses to the point, and no difference is claimed",
        )
    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = t_quantile(n, confidence) * se
    return PairedTest(n, seeds, mean, sd, mean - half, mean + half, t, p, False, None)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values; None entries are not tests and stay None."""
    tested = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i] or 0.0)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(tested):
        p = pvalues[i]
        assert p is not None
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def classify(test: PairedTest, p_adjusted: float | None, alpha: float = ALPHA) -> Claim:
    """What may be said about a paired difference (see the module docstring)."""
    if test.n == 0:
        return "no_data"
    if test.n < 2:
        return "too_few"
    if test.zero_spread:
        return "identical" if abs(test.mean_diff or 0.0) <= ZERO_SPREAD else "constant"
    assert test.ci_low is not None and test.ci_high is not None and test.mean_diff is not None
    excludes_zero = test.ci_low > 0 or test.ci_high < 0
    if p_adjusted is not None and p_adjusted < alpha and excludes_zero:
        return "better" if test.mean_diff > 0 else "worse"
    return "indistinguishable"


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


@dataclass(frozen=True)
class Comparison:
    variant: str
    baseline: str
    batch_size: int
    test: PairedTest
    p_holm: float | None

    @property
    def claim(self) -> Claim:
        return classify(self.test, self.p_holm)


@dataclass(frozen=True)
class Sensitivity:
    variant: str
    best_batch_size: int
    batch_size: int
    test: PairedTest
    p_holm: float | None

    @property
    def claim(self) -> Claim:
        return classify(self.test, self.p_holm)


def format_p(p: float) -> str:
    if p < 0.001:
        return "p<0.001"
    text = f"{p:.3f}" if p < 0.01 else f"{p:.2f}"
    if p < 0.05 <= float(text):  # never print a significant p as "0.05"
        text = f"{p:.4f}"
    return f"p={text}"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def comparison_sentence(c: Comparison) -> str:
    t, v, base, b = c.test, c.variant, c.baseline, c.batch_size
    claim = c.claim
    if claim == "no_data":
        return f"Cannot compare {v} with {base} at batch {b}: no seed has finished in both"
    if claim == "too_few":
        return (
            f"Not enough seeds to compare {v} with {base} at batch {b} ({_seeds(t.n)}; "
            f"observed difference {t.mean_diff:+.1f} points, untested)"
        )
    if claim == "identical":
        return f"{base} and {v} are indistinguishable at batch {b}: identical accuracy in all {_seeds(t.n)}"
    if claim == "constant":
        return (
            f"At batch {b}, {v} differs from {base} by exactly {t.mean_diff:+.1f} points in every one of "
            f"{_seeds(t.n)}; with zero spread across seeds no test is possible, so no difference is claimed"
        )
    assert t.mean_diff is not None and t.ci_low is not None and t.ci_high is not None and c.p_holm is not None
    p = f"Holm-adjusted {format_p(c.p_holm)}"
    if claim == "better":
        return (
            f"At batch {b}, {v} beats {base} by {t.mean_diff:.1f} points "
            f"(95% CI {t.ci_low:.1f} to {t.ci_high:.1f}, {p}, {_seeds(t.n)})"
        )
    if claim == "worse":
        return (
            f"At batch {b}, {v} trails {base} by {-t.mean_diff:.1f} points "
            f"(95% CI {-t.ci_high:.1f} to {-t.ci_low:.1f}, {p}, {_seeds(t.n)})"
        )
    return (
        f"{base} and {v} are indistinguishable at batch {b} ({p}; difference {t.mean_diff:+.1f} points, "
        f"95% CI {t.ci_low:.1f} to {t.ci_high:.1f}, {_seeds(t.n)})"
    )


def sensitivity_sentences(variant: str, items: Sequence[Sensitivity]) -> list[str]:
    if not items:
        return []
    best = items[0].best_batch_size
    out = []
    quiet: list[Sensitivity] = []
    few: list[Sensitivity] = []
    for s in items:
        t = s.test
        claim = s.claim
        if claim == "better" and s.p_holm is not None:
            assert t.mean_diff is not None and t.ci_low is not None and t.ci_high is not None
            out.append(
                f"{variant} loses {t.mean_diff:.1f} points going from batch {best} to batch {s.batch_size} "
                f"(95% CI {t.ci_low:.1f} to {t.ci_high:.1f}, Holm-adjusted {format_p(s.p_holm)}, {_seeds(t.n)})"
            )
        elif claim == "worse" and s.p_holm is not None:
            assert t.mean_diff is not None and t.ci_low is not None and t.ci_high is not None
            out.append(
                f"{variant} scores {-t.mean_diff:.1f} points higher at batch {s.batch_size} than at batch {best} "
                f"on the seeds both finished (95% CI {-t.ci_high:.1f} to {-t.ci_low:.1f}, "
                f"Holm-adjusted {format_p(s.p_holm)}, {_seeds(t.n)})"
            )
        elif claim in ("too_few", "no_data"):
            few.append(s)
        else:
            quiet.append(s)
    if quiet:
        largest = max((s.test.mean_diff or 0.0) for s in quiet)
        batches = ", ".join(str(s.batch_size) for s in quiet)
        out.append(
            f"{variant} shows no significant drop from its best batch size {best} to batch {batches} "
            f"(largest observed drop {largest:.1f} points)"
        )
    if few:
        n = max(s.test.n for s in few)
        batches = ", ".join(str(s.batch_size) for s in few)
        out.append(
            f"Not enough seeds to measure {variant}'s drop from batch {best} to batch {batches} ({_seeds(n)} paired)"
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
    """Plain sentences from the numbers; never claims what the adjusted test does not support."""
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
