"""Results of a job computed from what is in the database: per-run finals, per-cell summaries,
paired comparisons against a baseline, batch-size sensitivity and verdicts.

Everything is recomputed from the rows on each request, so a running job gives a consistent
partial answer (`complete: false` plus a note); the statistical rules live in
`app.services.statistics`.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core import catalogue
from app.core.run_states import ACTIVE, TERMINAL, RunStatus
from app.errors import DomainError
from app.schemas.jobs import JobSpec
from app.schemas.results import CellSummary, ComparisonOut, Results, RunResult, SensitivityOut, Stat
from app.schemas.runs import run_key
from app.services import statistics as st
from app.services.curves import build_curves, downsample
from app.tables import Dataset, Job, MetricPoint, Run

__all__ = ["DEFAULT_BASELINE", "InvalidParameter", "build_curves", "build_results", "downsample", "job_runs"]

DEFAULT_BASELINE = "bn"


class InvalidParameter(DomainError):
    status_code = 422
    kind = "invalid_request"


def job_runs(session: Session, job: Job) -> list[Run]:
    stmt = select(Run).where(Run.job_id == job.id).order_by(Run.batch_size, Run.variant_index, Run.seed)
    return list(session.scalars(stmt))


def best_epoch_values(session: Session, job: Job, metric: str = "val_acc") -> dict[str, dict[str, float]]:
    """Per run: the highest per-epoch `metric` (the job's primary one, as `best_val_acc`) and the lowest finite
    per-epoch `val_loss`."""
    inf = float("inf")
    stmt = (
        select(MetricPoint.run_id, MetricPoint.name, func.max(MetricPoint.value), func.min(MetricPoint.value))
        .join(Run, Run.id == MetricPoint.run_id)
        .where(
            Run.job_id == job.id,
            MetricPoint.name.in_((metric, "val_loss")),
            MetricPoint.value < inf,  # excludes +inf and, in Postgres, NaN (which sorts above +inf)
            MetricPoint.value > -inf,
        )
        .group_by(MetricPoint.run_id, MetricPoint.name)
    )
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for run_id, name, hi, lo in session.execute(stmt):
        value = hi if name == metric else lo
        if value is not None and math.isfinite(value):
            out[run_id]["best_val_acc" if name == metric else f"best_{name}"] = value
    return out


def finite_or_none(value: object) -> float | None:
    """A JSON-safe number: the value as a float when it is a finite number, else None."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _run_result(run: Run, best: dict[str, float], metric: str = "val_acc") -> RunResult:
    final = run.final_metrics or {}
    env = run.environment or {}
    peak = env.get("peak_memory") or {}  # workers.peak_memory
    return RunResult(
        **run_key(run),
        status=run.status,
        val_acc=final.get(metric),  # the job's primary metric (Results.metric)
        val_loss=final.get("val_loss"),
        train_loss=final.get("train_loss"),
        best_val_acc=best.get("best_val_acc"),
        best_val_loss=best.get("best_val_loss"),
        test_acc=final.get("test_" + metric.removeprefix("val_")),  # test_acc, or test_miou for segmentation
        test_loss=final.get("test_loss"),
        steps=run.steps_done,
        samples_seen=run.samples_seen,
        wall_time_s=run.wall_time_s,
        images_per_s=final.get("images_per_s"),
        tokens_seen=None if final.get("tokens") is None else int(final["tokens"]),
        tokens_per_s=final.get("tokens_per_s"),
        device=env.get("device"),
        torch_version=env.get("torch"),
        peak_memory_bytes=peak.get("bytes"),
        peak_memory_method=peak.get("method"),
        pack_runs=peak.get("pack_runs"),
        error=run.error,
    )


ACCURACY_RANGE = (0.0, 1.0)


def _stat(values: list[float | None], bounds: tuple[float, float] | None = None) -> Stat:
    """Mean, std and 95% interval; `bounds` (accuracy: 0..1) clips the interval to the possible range."""
    s = st.summarize([v for v in values if v is not None], bounds=bounds)
    return Stat(
        mean=s.mean,
        std=s.std,
        n=s.n,
        ci95_low=s.ci_low,
        ci95_high=s.ci_high,
        ci95_half_width=s.half_width,
        ci95_clipped=s.clipped,
        interval_note=s.note,
    )


def equivalence_margin(job: Job) -> float:
    """δ of the job in accuracy points; jobs submitted before the field existed get the schema's default."""
    fraction = job.spec.get("equivalence_margin", JobSpec.model_fields["equivalence_margin"].default)
    return 100.0 * float(fraction)


def pick_baseline(variants: list[str], requested: str | None) -> tuple[str | None, str | None]:
    """The baseline label and a note when it is not the one asked for or the default."""
    if requested is not None:
        if requested not in variants:
            raise InvalidParameter(
                f"baseline '{requested}' is not a variant of this job; use one of: {', '.join(variants)}"
            )
        return requested, None
    if DEFAULT_BASELINE in variants:
        return DEFAULT_BASELINE, None
    if not variants:
        return None, None
    return variants[0], (
        f"no '{DEFAULT_BASELINE}' variant in this job: comparisons use the first variant, '{variants[0]}', "
        "as the baseline (choose another with ?baseline=)"
    )


def _points(accs: dict[int, float]) -> dict[int, float]:
    return {seed: 100.0 * a for seed, a in accs.items()}


def build_results(session: Session, job: Job, status: str, baseline: str | None = None) -> Results:
    runs = job_runs(session, job)
    dataset = session.get(Dataset, job.dataset_id)
    metric = catalogue.primary_metric(dataset.kind if dataset is not None else None)
    best = best_epoch_values(session, job, metric)
    results = [_run_result(r, best.get(r.id, {}), metric) for r in runs]
    variants = list(dict.fromkeys(r.variant for r in sorted(runs, key=lambda r: r.variant_index)))
    batch_sizes = list(job.spec["batch_sizes"])
    base, base_note = pick_baseline(variants, baseline)

    by_cell: dict[tuple[str, int], list[RunResult]] = defaultdict(list)
    for r in results:
        by_cell[(r.variant, r.batch_size)].append(r)
    # final accuracy by cell and seed, succeeded runs only (diverged runs have none: see statistics)
    acc: dict[tuple[str, int], dict[int, float]] = {}
    summaries: list[CellSummary] = []
    counts: list[st.CellCount] = []
    for b in batch_sizes:
        for v in variants:
            members = by_cell.get((v, b), [])
            ok = [r for r in members if r.status == RunStatus.SUCCEEDED]
            acc[(v, b)] = {r.seed: a for r in ok if (a := finite_or_none(r.val_acc)) is not None}
            diverged = sum(r.status == RunStatus.DIVERGED for r in members)
            summaries.append(
                CellSummary(
                    variant=v,
                    batch_size=b,
                    n=len(ok),
                    n_total=len(members),
                    diverged=diverged,
                    pending=sum(r.status in ACTIVE for r in members),
                    failed=sum(r.status in (RunStatus.FAILED, RunStatus.CANCELLED) for r in members),
                    val_acc=_stat([finite_or_none(r.val_acc) for r in ok], ACCURACY_RANGE),
                    val_loss=_stat([finite_or_none(r.val_loss) for r in ok]),
                    test_acc=_stat([finite_or_none(r.test_acc) for r in ok], ACCURACY_RANGE),
                    test_loss=_stat([finite_or_none(r.test_loss) for r in ok]),
                    train_loss=_stat([finite_or_none(r.train_loss) for r in ok]),
                    best_val_acc=_stat([r.best_val_acc for r in ok], ACCURACY_RANGE),
                    best_val_loss=_stat([r.best_val_loss for r in ok]),
                    images_per_s=_stat([finite_or_none(r.images_per_s) for r in ok]),
                    peak_memory_bytes=_stat([finite_or_none(r.peak_memory_bytes) for r in ok]),
                )
            )
            counts.append(st.CellCount(v, b, len(members), len(ok), diverged))
    diverged_in = {(c.variant, c.batch_size): c.diverged for c in counts}

    margin = equivalence_margin(job)
    # variant vs baseline, paired by seed; one family (difference and equivalence tests) over the whole job
    comparisons: list[st.Comparison] = []
    if base is not None:
        pairs = [
            (v, b, st.paired_test(_points(acc[(v, b)]), _points(acc[(base, b)])))
            for b in batch_sizes
            for v in variants
            if v != base
        ]
        decided = st.decide([t for _, _, t in pairs], margin, limit=100.0)
        comparisons = [st.Comparison(v, base, b, t, d) for (v, b, t), d in zip(pairs, decided, strict=True)]

    # batch-size sensitivity per variant, paired by seed; the job's drops are another family
    drops: list[tuple[str, int, st.Drop]] = []
    for v in variants:
        by_batch = {b: _points(acc[(v, b)]) for b in batch_sizes if acc[(v, b)]}
        best_b, variant_drops = st.batch_drops(by_batch)
        if best_b is not None:
            drops.extend((v, best_b, d) for d in variant_drops)
    decided_drops = st.decide([d.test for _, _, d in drops], margin, limit=100.0)
    sensitivity = [
        st.Sensitivity(v, best_b, d.batch_size, d.test, dd)
        for (v, best_b, d), dd in zip(drops, decided_drops, strict=True)
    ]

    complete = all(r.status in TERMINAL for r in runs)
    finished = sum(r.status in TERMINAL for r in runs)
    consumed = {r.samples_seen for r in runs if r.status == RunStatus.SUCCEEDED}
    notes = []
    if not complete:
        notes.append(
            f"partial: {len(runs) - finished} of {len(runs)} runs are still queued or running; numbers will change"
        )
    if len(consumed) > 1:
        notes.append(f"unequal budgets: succeeded runs consumed {sorted(consumed)} samples")
    diverged = sum(r.status == RunStatus.DIVERGED for r in runs)
    if diverged:
        notes.append(
            f"{diverged} run(s) diverged (NaN/inf loss); they count as failures of their variant and are left out "
            "of means, intervals and tests"
        )
    if base_note:
        notes.append(base_note)
    if base is not None and len(variants) == 1:
        notes.append("only one variant: there is nothing to compare it with")

    return Results(
        job_id=job.id,
        status=status,
        metric=metric,
        complete=complete,
        variants=variants,
        batch_sizes=batch_sizes,
        budget_equal=len(consumed) <= 1,
        notes=notes,
        runs=results,
        cells=summaries,
        baseline=base,
        comparisons=[_comparison_out(c, acc, diverged_in) for c in comparisons],
        sensitivity=[_sensitivity_out(s) for s in sensitivity],
        equivalence_margin_points=margin,
        verdicts=relabel(
            st.verdicts(
                batch_sizes, counts, comparisons, sensitivity, variants, runs_finished=finished, runs_total=len(runs)
            ),
            metric,
        ),
        how_to_read=relabel(
            st.how_to_read(
                margin, sum(c.test.testable for c in comparisons), sum(s.test.testable for s in sensitivity)
            ),
            metric,
        ),
    )


def relabel(sentences: list[str], metric: str) -> list[str]:
    """The statistics' sentences speak of accuracy; a job whose primary metric is another says its name."""
    label = catalogue.METRIC_LABELS.get(metric, metric)
    return sentences if metric == "val_acc" else [s.replace("accuracy", label) for s in sentences]


def _mean_over(accs: dict[int, float], seeds: tuple[int, ...]) -> float | None:
    return statistics.fmean(accs[s] for s in seeds) if seeds else None


def _test_fields(t: st.PairedTest) -> dict[str, Any]:
    """What ComparisonOut and SensitivityOut both say of a paired test: pairs, the difference's interval, p."""
    return {
        "n_pairs": t.n,
        "ci95_low_points": t.ci_low,
        "ci95_high_points": t.ci_high,
        "p_value": t.p,
        "note": t.note,
    }


def _decision_fields(d: st.Decision) -> dict[str, Any]:
    """What ComparisonOut and SensitivityOut both say of a decision: adjusted p-values, verdict, its interval,
    and for an inconclusive one the power numbers."""
    return {
        "p_holm": d.p_adjusted,
        "p_equivalence_holm": d.p_equivalence_adjusted,
        "verdict": d.verdict,
        "ci_level": d.ci_level,
        "ci_low_points": d.ci_low,
        "ci_high_points": d.ci_high,
        "min_detectable_points": d.min_detectable,
        "seeds_needed": d.seeds_needed,
        "significant": d.verdict == "different",
    }


def _comparison_out(
    c: st.Comparison, acc: dict[tuple[str, int], dict[int, float]], diverged: dict[tuple[str, int], int]
) -> ComparisonOut:
    t, d = c.test, c.decision
    return ComparisonOut(
        variant=c.variant,
        baseline=c.baseline,
        batch_size=c.batch_size,
        seeds=list(t.seeds),
        variant_val_acc=_mean_over(acc[(c.variant, c.batch_size)], t.seeds),
        baseline_val_acc=_mean_over(acc[(c.baseline, c.batch_size)], t.seeds),
        diff_points=t.mean_diff,
        std_points=t.std_diff,
        t=t.t,
        **_test_fields(t),
        **_decision_fields(d),
        equivalence_margin_points=d.margin,
        p_equivalence=d.p_equivalence,
        alpha_adjusted=d.alpha_adjusted,
        outcome=d.claim,
        variant_diverged=diverged[(c.variant, c.batch_size)],
        baseline_diverged=diverged[(c.baseline, c.batch_size)],
    )


def _sensitivity_out(s: st.Sensitivity) -> SensitivityOut:
    t, d = s.test, s.decision
    return SensitivityOut(
        variant=s.variant,
        best_batch_size=s.best_batch_size,
        batch_size=s.batch_size,
        drop_points=t.mean_diff,
        **_test_fields(t),
        **_decision_fields(d),
    )
