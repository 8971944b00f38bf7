"""The HTML report of a job and the SVG plots it embeds.

One self-contained page (inline CSS, inline SVG, no script, nothing fetched from elsewhere) built
from the same numbers as `GET /v1/jobs/{id}/results` and `/curves/aggregate`: the accuracy-vs-batch
chart with error bars, training curves with seed bands per batch size, the verdicts, the
per-cell statistics, the comparisons against the baseline, the job spec and the environment.
While runs are still queued or running the page carries a meta refresh and a progress bar.

Every string that came from a user (job and dataset names, variant labels, error messages, the spec)
is escaped with `html.escape` before it reaches the markup.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.core import catalogue
from app.core.run_states import RunStatus
from app.schemas.results import CellCurve, CellSummary, ComparisonOut, Results, RunResult, SensitivityOut, Stat
from app.services import jobs as jobs_service
from app.services.curves import build_curve_aggregate
from app.services.finetune_report import resources_section, transfer_section
from app.services.jobs import JobState
from app.services.plots import BandPoint, CellPoint, accuracy_chart, curves_chart, variant_style
from app.services.results import build_results, job_runs
from app.services.seg_report import relabel_page, segmentation_section
from app.tables import Dataset, Job

Interval = Literal["ci95", "std"]
Band = Literal["minmax", "std"]
CURVE_POINTS = 200  # per cell: plenty for a 330-pixel-wide panel

# Headers for every report response: no script may run, nothing may be fetched from elsewhere.
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)
SECURITY_HEADERS = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}

METRIC_LABELS = {
    "val_acc": "validation accuracy (%)",
    "val_miou": "validation mean IoU (%)",
    "val_loss": "validation loss",
    "train_loss": "training loss (epoch mean)",
    "train_loss_step": "training loss (logged steps)",
    "lr": "learning rate",
}
INTERVAL_LABELS: dict[str, str] = {"ci95": "95% CI", "std": "±1 std"}
BAND_LABELS: dict[str, str] = {"minmax": "min–max across seeds", "std": "±1 std across seeds"}


def is_percent(metric: str) -> bool:
    return metric.endswith(("acc", "miou"))


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric + (" (%)" if is_percent(metric) else ""))


# ----------------------------------------------------------------------------------------------
# chart inputs from the results and aggregate curves


def accuracy_cells(results: Results, interval: Interval) -> dict[tuple[str, int], CellPoint]:
    out = {}
    for c in results.cells:
        s = c.val_acc
        mean = None if s.mean is None else 100 * s.mean
        low = high = None
        if mean is not None:
            if interval == "std" and s.std is not None:
                low, high = mean - 100 * s.std, mean + 100 * s.std
            elif interval == "ci95" and s.ci95_low is not None and s.ci95_high is not None:
                low, high = 100 * s.ci95_low, 100 * s.ci95_high
        out[(c.variant, c.batch_size)] = CellPoint(
            mean=mean, low=low, high=high, n=c.n, n_total=c.n_total, diverged=c.diverged, pending=c.pending
        )
    return out


def band_points(cell: CellCurve, band: Band, scale: float) -> list[BandPoint]:
    out = []
    for p in cell.points:
        if band == "std":
            lower, upper = p.lower, p.upper
        else:
            lower, upper = (p.min, p.max) if p.n > 1 else (None, None)
        out.append(
            BandPoint(
                x=p.epoch,
                mean=scale * p.mean,
                lower=None if lower is None else scale * lower,
                upper=None if upper is None else scale * upper,
                n=p.n,
            )
        )
    return out


def _job_title(job: Job) -> str:
    return job.name or f"Job {job.id}"


def _variants_and_batches(session: Session, job: Job) -> tuple[list[str], list[int]]:
    runs = sorted(job_runs(session, job), key=lambda r: r.variant_index)
    return list(dict.fromkeys(r.variant for r in runs)), list(job.spec["batch_sizes"])


def accuracy_svg(session: Session, job: Job, interval: Interval = "ci95", results: Results | None = None) -> str:
    """The accuracy-vs-batch-size chart of a job as a standalone SVG document."""
    if results is None:
        results = build_results(session, job, jobs_service.job_state(session, job).status)
    seeds = len(job.spec.get("seeds", []))
    subtitle = (
        f"{_job_title(job)} · mean of {seeds} seed{'s' if seeds != 1 else ''} per point, "
        f"error bars {INTERVAL_LABELS[interval]}"
    )
    if not results.complete:
        subtitle += " · partial: runs still in progress"
    return accuracy_chart(
        results.variants,
        results.batch_sizes,
        accuracy_cells(results, interval),
        subtitle=subtitle,
        error_label=INTERVAL_LABELS[interval],
    )


def curves_svg(session: Session, job: Job, metric: str = "val_acc", band: Band = "minmax") -> str:
    """Training curves of one metric, one panel per batch size, as a standalone SVG document."""
    variants, batch_sizes = _variants_and_batches(session, job)
    agg = build_curve_aggregate(session, job, metric, CURVE_POINTS)
    scale = 100.0 if is_percent(metric) else 1.0
    curves = {(c.variant, c.batch_size): band_points(c, band, scale) for c in agg.cells}
    label = metric_label(metric)
    return curves_chart(
        variants,
        batch_sizes,
        curves,
        title=f"Training curves: {label}",
        subtitle=f"{_job_title(job)} · line: mean across seeds · band: {BAND_LABELS[band]} · one panel per batch size",
        y_label=label,
        percent=is_percent(metric),
    )


# ----------------------------------------------------------------------------------------------
# the page


def e(value: object) -> str:
    return escape(str(value), quote=True)


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, fmt)


def pval(p: float | None) -> str:
    if p is None:
        return "—"
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1f}"


def span(low: float | None, high: float | None, fmt: Callable[[float | None], str]) -> str:
    """An interval as `low to high` in `fmt`, or — without both ends."""
    return "—" if low is None or high is None else f"{fmt(low)} to {fmt(high)}"


def _table(head: str, rows: Iterable[tuple[str, Sequence[object]]], left: Container[int]) -> str:
    """A report <table>: `head` is the column labels separated by "|"; a row is (its <tr> attributes, its cells'
    HTML); the columns numbered in `left` hold text and are left-aligned, the others numbers."""

    def align(i: int) -> str:
        return ' class="l"' if i in left else ""

    out = ["<table><thead><tr>", *(f"<th{align(i)}>{label}</th>" for i, label in enumerate(head.split("|")))]
    out.append("</tr></thead><tbody>")
    for attrs, cells in rows:
        out += [f"<tr{attrs}>", *(f"<td{align(i)}>{cell}</td>" for i, cell in enumerate(cells)), "</tr>"]
    out.append("</tbody></table>")
    return "".join(out)


def _abbreviation(results: Results) -> str:
    """The primary metric in a column head: `acc`, or `mIoU` for segmentation."""
    return catalogue.METRIC_ABBREVIATIONS.get(results.metric, results.metric)


def _small(note: str) -> str:
    return f'<p class="small">{note}</p>'


STATUS_COLOURS: dict[str, str] = {
    RunStatus.QUEUED: "#6e7781",
    RunStatus.RUNNING: "#0072B2",
    RunStatus.SUCCEEDED: "#1a7f37",
    RunStatus.FAILED: "#b42318",
    RunStatus.CANCELLED: "#6e7781",
    RunStatus.DIVERGED: "#b42318",
}
OUTCOME_TEXT = {
    "better": ("▲ better", "good"),
    "worse": ("▼ worse", "bad"),
    "equivalent": ("≈ equivalent within ±δ", "good"),
    "inconclusive": ("? inconclusive", "warn"),
    "identical": ("= identical (no spread)", "neutral"),
    "constant": ("constant difference, untestable", "neutral"),
    "too_few": ("too few seeds", "warn"),
    "no_data": ("no data", "warn"),
}

CSS = """
:root{--ink:#1f2328;--muted:#57606a;--line:#d8dee4;--bg:#f3f5f7;--good:#116329;--bad:#b42318;--warn:#8a5a00;
--accent:#0072B2}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.5 'Liberation Sans','Helvetica Neue',Arial,'DejaVu Sans',sans-serif}
main{max-width:1120px;margin:0 auto;padding:20px 24px 48px}
a{color:var(--accent)}
.kicker{text-transform:uppercase;letter-spacing:.08em;font-size:11px;color:var(--muted);font-weight:bold}
h1{font-size:26px;margin:2px 0 4px;word-break:break-word}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14px;margin:14px 0 6px}
.meta{color:var(--muted);margin:0}
.meta b{color:var(--ink);font-weight:600}
.badge{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12px;font-weight:bold;color:#fff;
vertical-align:middle;margin-left:8px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:14px 0}
.progress{height:12px;background:#e6e8eb;border-radius:6px;overflow:hidden;margin:8px 0 4px}
.progress>div{height:100%;background:var(--accent)}
.links{font-size:12px;color:var(--muted);margin-top:6px}
.links a{margin-right:10px}
ul.verdicts{margin:0;padding:0;list-style:none}
ul.verdicts li{padding:6px 10px;margin:4px 0;border-left:4px solid #c9d1d9;background:#f6f8fa;border-radius:0 6px 6px 0}
ul.verdicts li.claim{border-left-color:var(--accent);background:#eef6fc;font-weight:600}
ul.verdicts li.warn{border-left-color:#d4a72c;background:#fff8e5}
.headline{font-size:16px;margin:0 0 12px;padding:10px 14px;background:#eef6fc;border-radius:8px}
.notes{margin:10px 0 0;padding:8px 12px;background:#fff8e5;border:1px solid #f0d58c;border-radius:6px;font-size:13px}
.notes ul{margin:4px 0 0;padding-left:18px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:bold;background:#f6f8fa}
th:first-child,td:first-child,td.l,th.l{text-align:left}
table.glance td{text-align:center;padding:8px 6px}
table.glance th{text-align:center}
table.glance td:first-child{text-align:left;white-space:nowrap}
table.glance td.best{background:#e8f3ec}
table.glance .v{font-size:17px;font-weight:600}
table.glance td.best .v{font-weight:800}
table.glance .ci,table.glance .n{font-size:11px;color:var(--muted)}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.good{color:var(--good);font-weight:bold}.bad{color:var(--bad);font-weight:bold}.warn{color:var(--warn)}
.neutral{color:var(--muted)}
.div{color:var(--bad);font-size:11px;font-weight:bold}
.small{font-size:12px;color:var(--muted)}
svg.chart{width:100%;height:auto;display:block}
pre{background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:10px 12px;overflow:auto;font-size:12px;
margin:0}
details summary{cursor:pointer;font-weight:bold}
footer{color:var(--muted);font-size:12px;margin-top:20px}
"""


@dataclass
class PageOptions:
    baseline: str | None = None
    interval: Interval = "ci95"
    band: Band = "minmax"
    refresh: int = 5


def render_report(session: Session, job: Job, options: PageOptions | None = None) -> str:
    """The whole HTML page of one job."""
    opts = options or PageOptions()
    state = jobs_service.job_state(session, job)
    results = build_results(session, job, state.status, baseline=opts.baseline)
    title = _job_title(job)
    base = f"/v1/jobs/{e(job.id)}"
    colour_of = {v: variant_style(i).colour for i, v in enumerate(results.variants)}
    out = _page_head(title, refresh=opts.refresh if not results.complete else 0)
    out += _header(job, session.get(Dataset, job.dataset_id), state, results, opts.refresh, base)
    # the answer first: headline, the accuracy chart and the glance table
    out += [
        '<section class="card" id="accuracy">',
        f'<p class="headline">{_headline(results)}</p>',
        accuracy_svg(session, job, opts.interval, results=results),
        "</section>",
        _glance_table(results, colour_of),
    ]
    out += _verdicts(results)
    out.append(how_to_read_box(results))
    out += ['<section class="card" id="curves">', curves_svg(session, job, results.metric, opts.band), "</section>"]
    out += [
        _comparisons_table(results),
        _sensitivity_table(results),
        _statistics_table(results, colour_of),
        resources_section(results),
        _runs_table(results),
    ]
    out.append(transfer_section(job_runs(session, job)))
    out.append(switchable_mixtures_section(job_runs(session, job)))
    out.append(segmentation_section(job_runs(session, job), session.get(Dataset, job.dataset_id)))
    out += _spec(job, base)
    out.append(_environment(job_runs(session, job)))
    out.append(
        f"<footer>Generated {e(_when(datetime.now(UTC)))} by NormBench from the rows in its database; "
        f'the same numbers as <a href="{base}/results">/results</a>. Colours: Okabe–Ito palette; every variant also '
        "has its own marker shape.</footer>"
    )
    out.append("</main></body></html>")
    return relabel_page("\n".join(out), results.metric)  # segmentation: mean IoU, not accuracy


def _page_head(title: str, refresh: int) -> list[str]:
    """Up to the opening of `<main>`; `refresh` > 0 reloads the page every so many seconds."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh > 0:
        out.append(f'<meta http-equiv="refresh" content="{int(refresh)}">')
    out.append(f"<title>{e(title)} · NormBench report</title>")
    out.append(f"<style>{CSS}</style></head><body><main>")
    return out


def _header(job: Job, dataset: Dataset | None, state: JobState, results: Results, refresh: int, base: str) -> list[str]:
    """The summary card: name and status, what was compared on what, when, progress, and links to the data."""
    spec = job.spec
    model_txt = describe_model(spec.get("model") or {})
    epochs = (job.budget or {}).get("epochs", (spec.get("budget") or {}).get("epochs"))
    status_colour = STATUS_COLOURS.get(state.status, "#6e7781")
    dataset_txt = job.dataset_id
    if dataset is not None and dataset.name:
        dataset_txt = dataset.name if dataset.id in dataset.name else f"{dataset.name} ({dataset.id})"
    out = [
        '<header class="card" id="summary">',
        '<div class="kicker">NormBench report · which normalization layer at which batch size?</div>',
        f'<h1><span class="job-name">{e(_job_title(job))}</span>'
        f'<span class="badge" style="background:{status_colour}" data-status="{e(state.status)}">'
        f"{e(state.status)}</span></h1>",
        f'<p class="meta">Dataset <b>{e(dataset_txt)}</b> · model <b>{e(model_txt or "default")}</b> · '
        f"<b>{len(results.variants)}</b> variants × <b>{len(results.batch_sizes)}</b> batch sizes × "
        f"<b>{len(spec.get('seeds', []))}</b> seeds = <b>{state.runs_total}</b> runs · budget <b>{e(epochs)}</b> "
        f"epochs per run · baseline <b>{e(results.baseline or '—')}</b></p>",
        f'<p class="meta">Job <code>{e(job.id)}</code> · submitted {e(_when(job.created_at))}'
        + (f" · started {e(_when(state.started_at))}" if state.started_at else "")
        + (f" · finished {e(_when(state.finished_at))}" if state.finished_at else "")
        + "</p>",
    ]
    if not results.complete:
        out += _progress(state, refresh)
    out.append(
        '<div class="links">Data: '
        f'<a href="{base}/results">results JSON</a><a href="{base}/curves/aggregate?metric=val_acc">curves JSON</a>'
        f'<a href="{base}/export.csv">all metric points (CSV)</a>'
        f'<a href="{base}/plots/accuracy.svg">accuracy.svg</a>'
        f'<a href="{base}/plots/curves.svg?metric=val_acc">curves.svg</a>'
        f'<a href="{base}/plots/curves.svg?metric=val_loss">loss curves.svg</a></div>'
    )
    out.append("</header>")
    return out


def _progress(state: JobState, refresh: int) -> list[str]:
    frac = max(0.0, min(1.0, state.fraction))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(state.counts.items()))
    reloads = f"; this page reloads every {int(refresh)} s" if refresh > 0 else ""
    return [
        f'<div class="progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
        f'aria-valuenow="{round(100 * frac)}" data-progress="{frac:.4f}"><div style="width:{100 * frac:.1f}%"></div></div>',
        f'<p class="small">{state.runs_finished} of {state.runs_total} runs finished ({e(counts)}) · '
        f"{100 * frac:.0f}% of all training steps done{reloads}. Numbers below are partial.</p>",
    ]


def _verdicts(results: Results) -> list[str]:
    out = ['<section class="card" id="verdicts"><h2>Verdicts</h2>']
    if results.verdicts:
        out.append('<ul class="verdicts">')
        out.extend(f'<li class="{_verdict_class(v)}">{e(v)}</li>' for v in results.verdicts)
        out.append("</ul>")
    else:
        out.append('<p class="small">No verdicts yet: they appear once runs finish.</p>')
    out.append(
        '<p class="small">Three verdicts: <b>different</b> (Holm-adjusted paired t-test p &lt; 0.05; the adjusted '
        "interval excludes 0), <b>equivalent within ±δ</b> (two one-sided tests in the same Holm family; the adjusted "
        "interval lies inside ±δ) and <b>inconclusive</b> (neither; the sentence says how many seeds would tell).</p>"
    )
    if results.notes:
        out.append('<div class="notes"><b>Caveats</b><ul>')
        out.extend(f"<li>{e(n)}</li>" for n in results.notes)
        out.append("</ul></div>")
    out.append("</section>")
    return out


def _spec(job: Job, base: str) -> list[str]:
    out = [
        '<section class="card" id="spec"><h2>Job spec</h2>',
        f"<pre>{e(compact_json(drop_nulls(job.spec)))}</pre>",
        f'<p class="small">Unset (null) parameters are left out here; <a href="{base}">GET /v1/jobs/{e(job.id)}</a> '
        "returns the spec as stored.</p>",
    ]
    if job.budget:
        out.append("<h3>Resolved budget (identical for every run)</h3>")
        out.append(f"<pre>{e(compact_json(job.budget))}</pre>")
    out.append("</section>")
    return out


def describe_model(model: object) -> str:
    """The architecture and the settings that apply to it (the spec carries every field's default)."""
    if not isinstance(model, dict):
        return str(model or "default")
    arch = model.get("arch", "auto")
    relevant = {
        "mlp": ("hidden",),
        "cnn": ("width",),
        "resnet": ("depth", "width"),
        "cnn1d": ("width",),
        "resnet1d": ("depth", "width"),
        "unet": ("width", "levels"),
        "transformer": ("width", "layers", "heads"),
    }.get(arch, tuple(model))
    details = ", ".join(f"{k} {model[k]}" for k in relevant if k in model and k != "arch")
    return f"{arch} ({details})" if details else str(arch)


def drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def compact_json(value: Any, width: int = 120) -> str:
    """Indented JSON that keeps a container on one line when it fits, so a spec reads at a glance."""

    def render(v: Any, indent: int, column: int) -> str:
        flat = json.dumps(v, default=str, ensure_ascii=False)
        if not isinstance(v, dict | list) or not v or column + len(flat) <= width:
            return flat
        pad = " " * (indent + 2)
        if isinstance(v, dict):
            lines = []
            for k, item in v.items():
                key = json.dumps(str(k), ensure_ascii=False) + ": "
                lines.append(pad + key + render(item, indent + 2, indent + 2 + len(key)))
            return "{\n" + ",\n".join(lines) + "\n" + " " * indent + "}"
        return "[\n" + ",\n".join(pad + render(item, indent + 2, indent + 2) for item in v) + "\n" + " " * indent + "]"

    return render(value, 0, 0)


def _when(ts: datetime | None) -> str:
    if ts is None:
        return "—"
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _verdict_class(sentence: str) -> str:
    if any(
        w in sentence for w in (" beats ", " trails ", " loses ", " points higher ", " equivalent within ", " keeps ")
    ):
        return "claim"
    if any(w in sentence for w in ("diverged", "Partial", "Not enough", "Cannot")):
        return "warn"
    return "plain"


def _headline(results: Results) -> str:
    return " ".join(x for x in (_comparison_headline(results), _sensitivity_headline(results)) if x)


def _comparison_headline(results: Results) -> str:
    tested = [c for c in results.comparisons if c.n_pairs > 0]
    if not results.comparisons:
        if not results.cells or all(c.n == 0 for c in results.cells):
            return "No results yet."
        return "Only one variant: nothing to compare."
    sig = [c for c in results.comparisons if c.significant]
    base = e(results.baseline or "")
    if not tested:
        return f"No comparison against <b>{base}</b> has data yet."
    if not sig:
        return (
            f"No variant differs significantly from <b>{base}</b> at any batch size "
            f"({len(tested)} comparison{'s' if len(tested) != 1 else ''} with data)."
        )
    parts = []
    for c in sig:
        word = "beats" if (c.diff_points or 0) > 0 else "trails"
        cls = "good" if word == "beats" else "bad"
        parts.append(
            f'<span class="{cls}">{e(c.variant)} {word} {base} at batch {c.batch_size} '
            f"by {abs(c.diff_points or 0):.1f} pts</span>"
        )
    return (
        f"{len(sig)} of {len(tested)} comparisons against <b>{base}</b> show a significant difference: "
        + "; ".join(parts)
        + "."
    )


def _sensitivity_headline(results: Results) -> str:
    drops = [s for s in results.sensitivity if s.significant and (s.drop_points or 0) > 0]
    if not drops:
        return ""
    by_variant: dict[str, list[str]] = {}
    for s in drops:
        by_variant.setdefault(s.variant, []).append(
            f"{s.drop_points or 0:.1f} pts from batch {s.best_batch_size} to {s.batch_size}"
        )
    parts = [f'<span class="bad">{e(v)} loses {", ".join(items)}</span>' for v, items in by_variant.items()]
    return "Significant batch-size sensitivity: " + "; ".join(parts) + "."


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def _glance_table(results: Results, colour_of: dict[str, str]) -> str:
    cells = {(c.variant, c.batch_size): c for c in results.cells}
    cmp = {(c.variant, c.batch_size): c for c in results.comparisons}
    best: dict[int, float] = {}
    for b in results.batch_sizes:
        means = [c.val_acc.mean for v in results.variants if (c := cells.get((v, b))) and c.val_acc.mean is not None]
        if means:
            best[b] = max(means)
    out = ['<section class="card" id="glance"><h2>Final validation accuracy (%) by variant and batch size</h2>']
    out.append('<table class="glance"><thead><tr><th class="l">variant</th>')
    out.extend(f"<th>batch {b}</th>" for b in results.batch_sizes)
    out.append("</tr></thead><tbody>")
    for v in results.variants:
        is_base = v == results.baseline
        out.append(
            f'<tr data-variant="{e(v)}"><td>{_swatch(colour_of[v])}<b>{e(v)}</b>'
            + (' <span class="small">(baseline)</span>' if is_base else "")
            + "</td>"
        )
        for b in results.batch_sizes:
            c = cells.get((v, b))
            if c is None:
                out.append("<td>—</td>")
                continue
            out.append(_glance_cell(c, cmp.get((v, b)), best.get(b), results.baseline))
        out.append("</tr>")
    out.append("</tbody></table>")
    out.append(
        '<p class="small">Mean over seeds ± half-width of the 95% t-interval (where the interval is clipped to '
        "the possible range its ends are shown instead); n = seeds with a result. Shaded: highest mean in the "
        "column. ▲/▼: different from the baseline at that batch size (Holm-adjusted p &lt; 0.05); ≈: equivalent "
        "within ±δ; ?: inconclusive.</p></section>"
    )
    return "".join(out)


def _interval_text(s: Stat) -> str:
    """The cell's spread in the one vocabulary of the CLI: ± the 95% half-width, the clipped interval's ends, or
    'no spread' when every seed gave the same value."""
    if s.ci95_low is None or s.ci95_high is None:
        return f'<div class="ci">{e(s.interval_note or "")}</div>' if s.interval_note else ""
    if s.ci95_clipped:
        return f'<div class="ci">95% CI {pct(s.ci95_low)}–{pct(s.ci95_high)}</div>'
    half = s.ci95_half_width if s.ci95_half_width is not None else (s.ci95_high - s.ci95_low) / 2
    return f'<div class="ci">± {100 * half:.1f}</div>'


def _glance_cell(c: CellSummary, cmp: ComparisonOut | None, best: float | None, baseline: str | None) -> str:
    s = c.val_acc
    is_best = s.mean is not None and best is not None and abs(s.mean - best) < 1e-12
    cls = ' class="best"' if is_best else ""
    bits = []
    if s.mean is None:
        bits.append('<div class="v">—</div>')
    else:
        bits.append(f'<div class="v">{pct(s.mean)}</div>')
        bits.append(_interval_text(s))
    bits.append(f'<div class="n">n={c.n}/{c.n_total}</div>')
    if c.diverged:
        bits.append(f'<div class="div">{c.diverged} diverged</div>')
    if c.pending:
        bits.append(f'<div class="n">{c.pending} pending</div>')
    if cmp is not None and baseline:
        text, klass = {
            "better": (f"▲ vs {baseline}", "good"),
            "worse": (f"▼ vs {baseline}", "bad"),
            "equivalent": (f"≈ {baseline} (±δ)", "good"),
            "inconclusive": (f"? vs {baseline}", "warn"),
            "identical": (f"= {baseline}", "neutral"),
        }.get(cmp.outcome, ("", "neutral"))
        if text:
            tip = f"{cmp.variant} − {baseline}: {signed(cmp.diff_points)} points"
            bits.append(f'<div class="{klass}" title="{e(tip)}">{e(text)}</div>')
    return f"<td{cls}>{''.join(bits)}</td>"


def _comparisons_table(results: Results) -> str:
    title = f"<h2>Comparisons against the baseline ({e(results.baseline or '—')}), paired by seed</h2>"
    if not results.comparisons:
        body = _small("No comparisons: the job has a single variant.")
    else:
        m = _abbreviation(results)
        head = f"batch|variant|pairs|variant {m} %|baseline {m} %|difference (pts)|95% CI (pts)|p|Holm p|outcome"
        rows = [(f' data-outcome="{e(c.outcome)}"', _comparison_cells(c)) for c in results.comparisons]
        body = _table(head, rows, left={0, 1, 9}) + _small(
            "difference = variant − baseline in accuracy points (positive: the variant is better), mean over seeds "
            "that finished in both cells. Holm p: corrected over every comparison of this job."
        )
    return f'<section class="card" id="comparisons">{title}{body}</section>'


def _comparison_cells(c: ComparisonOut) -> list[object]:
    text, cls = OUTCOME_TEXT.get(c.outcome, (c.outcome, "neutral"))
    tip = f' title="{e(c.note)}"' if c.note else ""
    accuracies = [pct(c.variant_val_acc), pct(c.baseline_val_acc)]
    difference = [f"<b>{signed(c.diff_points)}</b>", span(c.ci95_low_points, c.ci95_high_points, signed)]
    tests = [pval(c.p_value), pval(c.p_holm), f'<span class="{cls}"{tip}>{e(text)}</span>']
    return [c.batch_size, e(c.variant), c.n_pairs, *accuracies, *difference, *tests]


def _sensitivity_table(results: Results) -> str:
    if not results.sensitivity:
        return ""
    head = "variant|best batch|to batch|pairs|drop (pts)|95% CI (pts)|p|Holm p|significant"
    rows = [("", _sensitivity_cells(s)) for s in results.sensitivity]
    return (
        '<section class="card" id="sensitivity"><h2>Batch-size sensitivity: accuracy lost below each variant\'s '
        f"best batch size</h2>{_table(head, rows, left={0, 8})}</section>"
    )


def _sensitivity_cells(s: SensitivityOut) -> list[object]:
    drop = [f"<b>{signed(s.drop_points)}</b>", span(s.ci95_low_points, s.ci95_high_points, signed)]
    significant = '<span class="bad">yes</span>' if s.significant else '<span class="neutral">no</span>'
    tests = [pval(s.p_value), pval(s.p_holm), significant]
    return [e(s.variant), s.best_batch_size, s.batch_size, s.n_pairs, *drop, *tests]


def _statistics_table(results: Results, colour_of: dict[str, str]) -> str:
    m = _abbreviation(results)
    head = f"variant|batch|n / seeds|diverged|pending|val {m} % (mean)|95% CI|std|best-epoch {m} %|val loss|train loss"
    rows = [
        (f' data-variant="{e(c.variant)}" data-batch-size="{c.batch_size}"', _statistics_cells(c, colour_of))
        for c in results.cells
    ]
    note = _small(
        "Final values after the full budget, over succeeded seeds. Diverged seeds (NaN/inf loss) count against "
        "their variant but have no accuracy, so they are left out of means and intervals. Best-epoch accuracy is "
        "picked on the validation split (optimistic)."
    )
    return (
        f'<section class="card" id="statistics"><h2>Statistics per cell</h2>{_table(head, rows, {0})}{note}</section>'
    )


def _statistics_cells(c: CellSummary, colour_of: dict[str, str]) -> list[object]:
    s = c.val_acc
    variant = f"{_swatch(colour_of.get(c.variant, '#999'))}{e(c.variant)}"
    diverged = f'<span class="div">{c.diverged}</span>' if c.diverged else "0"
    spread = [span(s.ci95_low, s.ci95_high, pct), pct(s.std, 2), pct(c.best_val_acc.mean)]
    losses = [num(c.val_loss.mean), num(c.train_loss.mean)]
    counts = [f"{c.n} / {c.n_total}", diverged, c.pending]
    return [variant, c.batch_size, *counts, f"<b>{pct(s.mean)}</b>", *spread, *losses]


def _runs_table(results: Results) -> str:
    m = _abbreviation(results)
    head = f"variant|batch|seed|status|val {m} %|best {m} %|steps|samples|wall s|img/s|error"
    table = _table(head, [("", _run_cells(r)) for r in results.runs], left={0, 3, 10})
    summary = f"<summary>All {len(results.runs)} runs</summary>"
    return f'<section class="card" id="runs"><details>{summary}{table}</details></section>'


def _run_cells(r: RunResult) -> list[object]:
    colour = STATUS_COLOURS.get(r.status, "#6e7781")
    status = f'<span style="color:{colour};font-weight:bold">{e(r.status)}</span>'
    error = f'<span class="small">{e(r.error[:200] + ("…" if len(r.error) > 200 else ""))}</span>' if r.error else ""
    accuracies = [pct(r.val_acc), pct(r.best_val_acc)]
    work = [r.steps, r.samples_seen, num(r.wall_time_s, ".1f"), num(r.images_per_s, ".0f")]
    return [e(r.variant), r.batch_size, r.seed, status, *accuracies, *work, error]


# How a run was scheduled, not what it ran on: left out when environments are compared. Pack composition
# is planned at submit; a run that trained in another pack than planned is listed on its own.
# `peak_memory` (per pack) and `init` (per variant) have their own sections.
PACKING_FIELDS = frozenset(
    {"engine", "pack_runs", "pack_planned", "largest_group", "resumed_from_step", "peak_memory", "init"}
)


def _environment(runs: list[Any]) -> str:
    envs: Counter[str] = Counter()
    for r in runs:
        if r.environment:
            # seg_preview: the run's predicted mask (the segmentation section shows it), not the machine
            machine = {k: v for k, v in r.environment.items() if k not in PACKING_FIELDS and k != "seg_preview"}
            envs[json.dumps(machine, sort_keys=True, default=str)] += 1
    out = ['<section class="card" id="environment"><h2>Environment</h2>']
    if not envs:
        out.append('<p class="small">No run has reported its environment yet.</p></section>')
        return "".join(out)
    rows = [(json.loads(k), n) for k, n in envs.most_common()]
    preferred = ["torch", "device", "cuda", "python", "threads"]
    keys = [k for k in preferred if any(k in env for env, _ in rows)]
    keys += sorted({k for env, _ in rows for k in env} - set(keys))
    out.append("<table><thead><tr>")
    out.extend(f'<th class="l">{e(k)}</th>' for k in keys)
    out.append("<th>runs</th></tr></thead><tbody>")
    for env, n in rows:
        out.append("<tr>" + "".join(f'<td class="l">{e(env.get(k, "—"))}</td>' for k in keys) + f"<td>{n}</td></tr>")
    out.append("</tbody></table>")
    if len(rows) > 1:
        out.append('<p class="small warn">Runs trained in different environments: compare with care.</p>')
    out.append(_packs(runs))
    out.append("</section>")
    return "".join(out)


def _packs(runs: list[Any]) -> str:
    """How the runs were packed: the planned pack sizes, and every run that trained in a different pack."""
    sizes = Counter(Counter(r.pack_key for r in runs if r.pack_key).values())
    if not sizes:
        return ""
    planned = ", ".join(
        f"{n} pack{'s' * (n != 1)} of {size} run{'s' * (size != 1)}" for size, n in sorted(sizes.items(), reverse=True)
    )
    out = [
        f'<p class="small">Runs of one batch size and variant train together in packs planned at submit: {planned}. '
        "A run's float rounding depends on its pack, so packs are fixed by the spec: the same job gives the same "
        "numbers on the same machine and software, however many workers run it.</p>"
    ]
    moved = [
        r
        for r in runs
        if r.environment
        and "pack_planned" in r.environment  # recorded since packs are planned at submit
        and r.environment.get("pack_runs") not in (None, r.environment["pack_planned"])
    ]
    if moved:
        items = "".join(
            f"<li>{e(r.variant)} at batch {r.batch_size}, seed {r.seed}: trained in a pack of "
            f"{r.environment['pack_runs']}, planned {e(r.environment.get('pack_planned', '?'))}</li>"
            for r in moved
        )
        out.append(
            f'<p class="small warn">{len(moved)} run{"s" * (len(moved) != 1)} trained in a different pack than planned '
            "(requeued alone after a lost worker, or retried): their numbers can differ from a rerun's by float "
            f'rounding, which over a long training can grow to seed-to-seed size:</p><ul class="small">{items}</ul>'
        )
    return "".join(out)


def how_to_read_box(results: Results) -> str:
    """The "how to read this" box under the verdicts: the same text as the CLI's (`Results.how_to_read`)."""
    if not results.how_to_read:
        return ""
    items = "".join(f"<li>{e(line)}</li>" for line in results.how_to_read)
    return f'<section class="card" id="how-to-read"><h2>How to read this</h2><ul class="small">{items}</ul></section>'


MIX_PREFIX = "sn_mix/"  # workers.epoch_metrics.MIX_PREFIX: the finals Switchable Normalization runs report
MIX_NAMES = {"bn": "BN", "in": "IN", "ln": "LN"}


def switchable_mixtures_section(runs: list[Any]) -> str:
    """Which statistics Switchable Normalization chose: per layer and batch size, the learned shares of BN, IN
    and LN in the mean and in the variance (softmax of the layer's weights, averaged over the finished seeds).
    Empty when no run reported them."""
    shares: dict[tuple[str, int], dict[str, list[float]]] = {}
    layers: list[str] = []
    for r in runs:
        for name, value in (r.final_metrics or {}).items():
            if not name.startswith(MIX_PREFIX) or not isinstance(value, int | float):
                continue
            layer, _, key = name[len(MIX_PREFIX) :].rpartition("/")
            if layer not in layers:
                layers.append(layer)
            shares.setdefault((r.variant, r.batch_size), {}).setdefault(f"{layer}/{key}", []).append(float(value))
    if not shares:
        return ""
    cells = sorted(shares, key=lambda c: (c[0], c[1]))

    def share(x: float | None) -> str:
        return "—" if x is None else f"{pct(x, 0)}%"

    def mean(cell: tuple[str, int], key: str) -> float | None:
        values = shares[cell].get(key)
        return sum(values) / len(values) if values else None

    def mix(cell: tuple[str, int], layer: str, part: str) -> str:
        values = {s: mean(cell, f"{layer}/{part}_{s}") for s in MIX_NAMES}
        if all(v is None for v in values.values()):
            return "—"
        top = max(values, key=lambda s: values[s] or 0.0)
        return " · ".join(
            f"<b>{MIX_NAMES[s]} {share(v)}</b>" if s == top else f"{MIX_NAMES[s]} {share(v)}" for s, v in values.items()
        )

    def overall(cell: tuple[str, int], part: str, stat: str) -> float | None:
        values = [v for layer in layers if (v := mean(cell, f"{layer}/{part}_{stat}")) is not None]
        return sum(values) / len(values) if values else None

    summary = "; ".join(
        f"{e(v)} at batch {b}: BN {share(overall((v, b), 'mean', 'bn'))} of the mean and "
        f"{share(overall((v, b), 'var', 'bn'))} of the variance"
        for v, b in cells
    )
    out = [
        '<section class="card" id="switchable-mixtures"><h2>Which statistics did Switchable Normalization choose?</h2>',
        '<p class="small">Each Switchable Normalization layer learns how much of its mean and of its variance comes '
        "from BatchNorm's statistics (over the batch), InstanceNorm's (per sample and channel) and LayerNorm's (per "
        "sample): the shares after training, averaged over seeds, largest in bold. Averaged over the layers, "
        f"{summary}. At batch 1 BN's statistics over one sample are IN's, so the two share one role in training "
        "(their weights move together); on flat inputs (MLP) there are no IN statistics.</p>",
        '<table><thead><tr><th class="l">layer</th>',
    ]
    out += [f'<th class="l">{e(v)} · batch {b}</th>' for v, b in cells]
    out.append("</tr></thead><tbody>")
    for layer in layers:
        out.append(f'<tr><td class="l">{e(layer)}</td>')
        out += [
            f'<td class="l small">mean: {mix(c, layer, "mean")}<br>variance: {mix(c, layer, "var")}</td>' for c in cells
        ]
        out.append("</tr>")
    out.append("</tbody></table></section>")
    return "".join(out)
