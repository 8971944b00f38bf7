"""Results of a job: per-run finals, per-cell summaries, comparisons, verdicts, and curves.

Accuracies in `runs`, `cells` and the curves are fractions 0..1, as training reports them;
differences in `comparisons` and `sensitivity` are in accuracy **points** (percentage points,
0..100 scale), as people talk about them ("6.1 points better"). One vocabulary everywhere: "±"
is the half-width of a 95% interval; every comparison ends in one of three verdicts, `different`,
`equivalent` (within ±`equivalence_margin_points`) or `inconclusive` (see `how_to_read`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import JobId
from app.schemas.runs import MetricPointOut, RunKey, StepsTaken, WallTime

VerdictOut = Literal["different", "equivalent", "inconclusive"]
VERDICT_DESCRIPTION = (
    "One of three: `different` (the paired t-test of no difference is significant after the Holm adjustment), "
    "`equivalent` (the two one-sided tests show |difference| < the equivalence margin after the same adjustment; "
    "also when the difference is real but smaller than the margin), `inconclusive` (neither, or no test was "
    "possible: see `outcome` and `note`)."
)


class RunResult(RunKey):
    status: str = Field(description="Run status.")
    val_acc: float | None = Field(description="Final validation accuracy, 0..1.")
    val_loss: float | None = Field(description="Final validation cross-entropy.")
    train_loss: float | None = Field(description="Mean training loss over the last epoch.")
    best_val_acc: float | None = Field(
        None, description="Highest per-epoch validation accuracy recorded so far, 0..1 (null before the first epoch)."
    )
    best_val_loss: float | None = Field(
        None, description="Lowest finite per-epoch validation loss recorded so far (null before the first epoch)."
    )
    test_acc: float | None = Field(
        None,
        description="Accuracy on the dataset's test split after training (null without one); reported beside the "
        "validation split, never used to pick anything.",
    )
    test_loss: float | None = Field(None, description="Cross-entropy on the test split after training.")
    steps: StepsTaken
    samples_seen: int = Field(description="Training samples consumed.")
    wall_time_s: WallTime
    images_per_s: float | None = Field(description="Training throughput, samples per second.")
    tokens_seen: int | None = Field(
        None,
        description="Texts only: real (non-padding) training tokens consumed; the same for every run of one seed, "
        "as samples are (null for other data).",
    )
    tokens_per_s: float | None = Field(None, description="Texts only: training throughput in real tokens per second.")
    device: str | None = Field(description="Device the run trained on, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.")
    torch_version: str | None = Field(description="PyTorch version used.")
    peak_memory_bytes: int | None = Field(
        None,
        description="Peak memory while the run's pack trained (runs trained together share it), as "
        "`peak_memory_method` measured it; null for runs trained before it was recorded.",
    )
    peak_memory_method: str | None = Field(
        None,
        description="`cuda_max_memory_allocated` (GPU: tensors allocated, the dataset on the device included), "
        "`process_peak_rss` (CPU: the worker process's peak resident set during the pack, Linux VmHWM reset at its "
        "start: the worker, its dataset and allocator slack included) or `process_lifetime_peak_rss` (CPU where "
        "the reset is not allowed: the process's peak since it started).",
    )
    pack_runs: int | None = Field(None, description="Runs in the pack that shared `peak_memory_bytes`.")
    error: str | None = Field(description="Reason for a failed, diverged or cancelled run.")


class Stat(BaseModel):
    mean: float | None = Field(description="Mean over the cell's finished seeds.")
    std: float | None = Field(description="Sample standard deviation over seeds (null with fewer than 2).")
    n: int = Field(0, description="Values the statistic is computed from (succeeded seeds with a finite value).")
    ci95_low: float | None = Field(
        None,
        description="Lower end of the two-sided 95% Student-t interval of the mean, mean − t(0.975, n−1)·std/√n, "
        "clipped to 0 for accuracies (see `ci95_clipped`). Null with fewer than 2 values and when every seed gave "
        "the same value (zero spread: no interval can be formed; `interval_note` says so).",
    )
    ci95_high: float | None = Field(
        None, description="Upper end of the 95% t-interval of the mean, clipped to 1 for accuracies (see `ci95_low`)."
    )
    ci95_half_width: float | None = Field(
        None,
        description='t(0.975, n−1)·std/√n: what "±" means in the CLI and the report (before any clipping). '
        "Null when there is no interval.",
    )
    ci95_clipped: bool = Field(
        False,
        description="True when the t-interval crossed the metric's possible range (accuracy 0..1) and was cut to "
        "it; the true mean lies in that range, so the coverage stays 95%.",
    )
    interval_note: str | None = Field(
        None, description="Why there is no interval (no value, one value, zero spread), or that it was clipped."
    )


def _no_values() -> Stat:
    """The statistic of a metric with no value in any seed (the default of the metrics not every job has)."""
    return Stat(mean=None, std=None)


class CellKey(BaseModel):
    """Which cell (variant × batch size, over seeds) an item is about: the fields per-cell items start with."""

    variant: str = Field(description="Variant label.")
    batch_size: int = Field(description="Batch size.")


class CellSummary(CellKey):
    n: int = Field(description="Seeds with a final result (succeeded runs).")
    n_total: int = Field(description="Seeds requested.")
    diverged: int = Field(
        description="Seeds whose training diverged (NaN/inf loss). A failure of the variant: counted here and named "
        "in the verdicts, but left out of every mean, interval and test (they have no final accuracy)."
    )
    pending: int = Field(0, description="Seeds still queued or running; the cell's numbers will change.")
    failed: int = Field(
        0, description="Seeds that failed on an error or were cancelled: no result, not held against the variant."
    )
    val_acc: Stat = Field(description="Final validation accuracy over seeds, 0..1.")
    val_loss: Stat = Field(description="Final validation loss over seeds.")
    test_acc: Stat = Field(
        default_factory=_no_values,
        description="Test-split accuracy over seeds, 0..1 (no values without a test split).",
    )
    test_loss: Stat = Field(default_factory=_no_values, description="Test-split loss over seeds.")
    train_loss: Stat = Field(description="Final-epoch training loss over seeds.")
    best_val_acc: Stat = Field(
        default_factory=_no_values,
        description="Best-epoch validation accuracy over seeds (each seed's highest per-epoch `val_acc`), 0..1. "
        "Picked on the validation split, so optimistic compared with the final value.",
    )
    best_val_loss: Stat = Field(
        default_factory=_no_values,
        description="Best-epoch validation loss over seeds (each seed's lowest per-epoch `val_loss`).",
    )
    images_per_s: Stat = Field(
        default_factory=_no_values,
        description="Training throughput over seeds (samples per second of each run; packed runs share a device).",
    )
    peak_memory_bytes: Stat = Field(
        default_factory=_no_values,
        description="Peak memory of the runs' packs over seeds (see the runs' `peak_memory_method`).",
    )


class ComparisonOut(BaseModel):
    variant: str = Field(description="Variant compared with the baseline.")
    baseline: str = Field(description="Baseline variant label.")
    batch_size: int = Field(description="Batch size of both cells.")
    n_pairs: int = Field(
        description="Seeds that finished (succeeded) in both cells; the test pairs these by seed. "
        "Diverged, failed and unfinished runs are left out."
    )
    seeds: list[int] = Field(description="The paired seeds.")
    variant_val_acc: float | None = Field(description="Mean final accuracy of the variant over the paired seeds, 0..1.")
    baseline_val_acc: float | None = Field(
        description="Mean final accuracy of the baseline over the paired seeds, 0..1."
    )
    diff_points: float | None = Field(
        description="Mean paired difference variant − baseline in accuracy points (0..100 scale); "
        "positive means the variant is better. Null with no pair."
    )
    std_points: float | None = Field(
        description="Sample standard deviation of the per-seed differences, in points (null with fewer than 2 pairs)."
    )
    ci95_low_points: float | None = Field(
        description="Lower end of the **unadjusted** 95% t-interval of the mean difference, in points (as "
        "`scipy.stats.ttest_rel(...).confidence_interval()`); null with fewer than 2 pairs or zero spread. "
        "The verdict rests on the adjusted interval `ci_low_points`..`ci_high_points`."
    )
    ci95_high_points: float | None = Field(description="Upper end of the unadjusted 95% t-interval of the difference.")
    t: float | None = Field(description="Paired t statistic (as `scipy.stats.ttest_rel`), null when untestable.")
    p_value: float | None = Field(
        description="Two-sided paired t-test p-value, unadjusted. Null with fewer than 2 pairs or when every pair "
        "gave the same difference (zero spread: the test is undefined, see `note`)."
    )
    p_holm: float | None = Field(
        description="`p_value` after the Holm step-down over the job's family of tests: the difference and the "
        "equivalence test of every comparison that has a p-value (with Shaffer's constraint that at most one of "
        "a comparison's two null hypotheses can be true, so the first multiplier is the number of comparisons)."
    )
    equivalence_margin_points: float = Field(
        description="δ: the margin of the equivalence test, in points (the job spec's `equivalence_margin` × 100)."
    )
    p_equivalence: float | None = Field(
        None,
        description="p-value of the two one-sided paired t-tests (TOST) of |difference| ≥ δ, the larger of the two "
        "one-sided p-values; unadjusted; as `statsmodels.stats.weightstats.ttost_paired`. Null when untestable.",
    )
    p_equivalence_holm: float | None = Field(
        None, description="`p_equivalence` adjusted in the same family as `p_holm`."
    )
    verdict: VerdictOut = Field("inconclusive", description=VERDICT_DESCRIPTION)
    ci_level: float | None = Field(
        None,
        description="Confidence level of the adjusted interval the verdict rests on: 1 − 0.05/k for `different` "
        "(k = the test's Holm multiplier; the interval excludes 0), 1 − 0.1/k for `equivalent` (the TOST interval; "
        "inside ±δ), 1 − 0.05/m for `inconclusive` (simultaneous over the m comparisons; includes 0 and reaches "
        "beyond ±δ). Null when untestable.",
    )
    ci_low_points: float | None = Field(
        None, description="Lower end of the adjusted interval at `ci_level`, in points (clipped to −100)."
    )
    ci_high_points: float | None = Field(
        None, description="Upper end of the adjusted interval at `ci_level`, in points (clipped to +100)."
    )
    alpha_adjusted: float | None = Field(
        None, description="0.05/m, m = comparisons with a test: the level the power numbers below are computed at."
    )
    min_detectable_points: float | None = Field(
        None,
        description="Inconclusive comparisons only: the smallest true difference the paired t-test would detect "
        "with 80% power at the current seeds, two-sided at `alpha_adjusted`, given the observed `std_points` "
        "(above 100 when no possible difference would be detectable; the verdict then says so).",
    )
    seeds_needed: int | None = Field(
        None,
        description="Inconclusive comparisons only: seeds (pairs) needed to detect a difference of δ with 80% "
        "power at `alpha_adjusted`, from the observed `std_points` (as `statsmodels.stats.power.TTestPower`). "
        "Null when there is no variance estimate or more than 1000 would be needed (see the verdict).",
    )
    significant: bool = Field(
        description="True only when `verdict` is `different`: the only case where a difference is claimed."
    )
    outcome: str = Field(
        description="The verdict's finer reason: `better` / `worse` (different, by sign), `equivalent`, "
        "`inconclusive` (tested; neither shown), and four inconclusive cases with no test: `identical` (same "
        "accuracy in every seed), `constant` (same non-zero difference in every seed), `too_few` (1 pair), "
        "`no_data` (no pair)."
    )
    variant_diverged: int = Field(description="Seeds of the variant that diverged at this batch size.")
    baseline_diverged: int = Field(description="Seeds of the baseline that diverged at this batch size.")
    note: str | None = Field(description="Why there is no p-value or interval, when there is none.")


class SensitivityOut(BaseModel):
    variant: str = Field(description="Variant label.")
    best_batch_size: int = Field(
        description="The variant's batch size with the highest mean final accuracy (ties: the larger batch), among "
        "batch sizes with at least 2 finished seeds when there are any."
    )
    batch_size: int = Field(description="A smaller batch size the drop is measured to.")
    n_pairs: int = Field(description="Seeds that succeeded at both batch sizes; the drop is paired by seed.")
    drop_points: float | None = Field(
        description="Mean paired accuracy drop best − smaller, in points (positive = worse at the smaller batch)."
    )
    ci95_low_points: float | None = Field(
        description="Lower end of the unadjusted 95% paired t-interval of the drop, in points (null with fewer "
        "than 2 pairs or zero spread)."
    )
    ci95_high_points: float | None = Field(description="Upper end of the unadjusted 95% paired t-interval of the drop.")
    p_value: float | None = Field(description="Two-sided paired t-test p-value of the drop, unadjusted.")
    p_holm: float | None = Field(
        description="Holm-adjusted over the job's batch-size drops (their difference and equivalence tests "
        "together, as for `comparisons`)."
    )
    p_equivalence_holm: float | None = Field(
        None, description="Adjusted p-value of the equivalence test (|drop| < δ), same family as `p_holm`."
    )
    verdict: VerdictOut = Field("inconclusive", description=VERDICT_DESCRIPTION)
    ci_level: float | None = Field(None, description="Level of the adjusted interval (as in `comparisons`).")
    ci_low_points: float | None = Field(None, description="Lower end of the adjusted interval of the drop.")
    ci_high_points: float | None = Field(None, description="Upper end of the adjusted interval of the drop.")
    min_detectable_points: float | None = Field(
        None, description="Inconclusive drops only: smallest drop detectable with 80% power at the current seeds."
    )
    seeds_needed: int | None = Field(
        None, description="Inconclusive drops only: seeds needed to detect a drop of δ with 80% power."
    )
    significant: bool = Field(description="True only when `verdict` is `different`.")
    note: str | None = Field(description="Why there is no p-value or interval, when there is none.")


class Results(BaseModel):
    job_id: JobId
    status: str = Field(description="Job status.")
    metric: str = Field(
        "val_acc",
        description="The primary metric every `val_acc`/`best_val_acc`/`test_acc` field (test: `test_miou`), "
        "interval, comparison and verdict here is about: `val_acc` (validation accuracy) or, for segmentation datasets, `val_miou` (mean intersection "
        "over union over the classes present in truth or prediction; pixel accuracy stays in the runs' "
        "`val_acc` curve). Both 0..1; differences in points (×100).",
    )
    complete: bool = Field(description="False while runs are still queued or running: the numbers are partial.")
    variants: list[str] = Field(description="Variant labels in spec order.")
    batch_sizes: list[int] = Field(description="Batch sizes in spec order.")
    budget_equal: bool = Field(description="True when every succeeded run consumed the same number of samples.")
    notes: list[str] = Field(description="Caveats a reader should know (partial results, unequal budgets...).")
    runs: list[RunResult] = Field(description="One entry per run.")
    cells: list[CellSummary] = Field(description="Per (variant, batch size) mean and std over seeds.")
    baseline: str | None = Field(
        None,
        description="Variant every other is compared with: `?baseline=` if given, else `bn`, else the first variant.",
    )
    comparisons: list[ComparisonOut] = Field(
        default_factory=list,
        description="Every non-baseline variant vs the baseline at each batch size, paired by seed, Holm-corrected.",
    )
    sensitivity: list[SensitivityOut] = Field(
        default_factory=list,
        description="Per variant, the accuracy drop from its best batch size to each smaller one, paired by seed.",
    )
    equivalence_margin_points: float = Field(
        1.0, description="δ of the equivalence tests, in accuracy points (the job spec's `equivalence_margin` × 100)."
    )
    verdicts: list[str] = Field(
        default_factory=list,
        description="Plain sentences generated from `cells`, `comparisons` and `sensitivity`: each says different, "
        "equivalent within ±δ or inconclusive, why, with the adjusted interval it rests on; inconclusive ones say "
        "how many seeds would be needed.",
    )
    how_to_read: list[str] = Field(
        default_factory=list,
        description="A short explanation of the vocabulary above (±, the three verdicts, the adjustment), shown "
        "under the verdicts by the CLI and the report.",
    )


class CurveSeries(RunKey):
    total_points: int = Field(description="Points recorded before downsampling.")
    window_points: int = Field(0, description="Points in the requested `offset`/`limit` window, before downsampling.")
    next_offset: int | None = Field(
        None, description="`offset` for the next page of this series; null when the window reached its end."
    )
    nonfinite_points: int = Field(
        0, description="NaN/inf values in the window (a diverging run); left out of `points`, which JSON cannot carry."
    )
    points: list[MetricPointOut] = Field(description="The (possibly downsampled) series in step order.")


class Curves(BaseModel):
    job_id: JobId
    metric: str = Field(description="Metric name: val_acc, val_loss, train_loss, train_loss_step, lr, ...")
    max_points: int | None = Field(
        None, description="Per-series point cap that was applied (min/max per bucket); null for full resolution."
    )
    offset: int = Field(0, description="Points skipped at the start of every series (in step order).")
    limit: int | None = Field(None, description="Window length per series before downsampling; null for no limit.")
    series: list[CurveSeries] = Field(description="One series per run that has points.")


class AggregatePointOut(BaseModel):
    step: int = Field(description="Optimizer step (seeds of one cell share their steps).")
    epoch: float = Field(description="Epochs completed at that step.")
    n: int = Field(description="Seeds with a finite value at this step.")
    mean: float = Field(description="Mean over those seeds.")
    std: float | None = Field(description="Sample standard deviation over seeds (null with one seed).")
    lower: float | None = Field(description="mean − std: lower edge of the ±1 std band (null with one seed).")
    upper: float | None = Field(description="mean + std: upper edge of the ±1 std band (null with one seed).")
    min: float = Field(description="Lowest value over seeds.")
    max: float = Field(description="Highest value over seeds.")


class CellCurve(CellKey):
    seeds: list[int] = Field(description="Seeds whose runs contributed points.")
    statuses: dict[str, int] = Field(description="Contributing runs per status (diverged runs end early).")
    total_points: int = Field(description="Steps in the aggregate before downsampling.")
    points: list[AggregatePointOut] = Field(description="Per step, in step order (possibly downsampled).")


class CurveAggregate(BaseModel):
    job_id: JobId
    metric: str = Field(description="Metric name.")
    max_points: int | None = Field(description="Per-cell point cap applied (on the mean); null for full resolution.")
    cells: list[CellCurve] = Field(description="One entry per (variant, batch size) with points.")
