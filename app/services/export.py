"""Every metric point of a job or a run as long-format CSV, streamed row batch by row batch."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Select, select

from app.db import session_factory
from app.repositories.runs import ordered_runs
from app.schemas.common import ERROR_RESPONSES
from app.tables import MetricPoint, Run

CSV_COLUMNS = ("job_id", "run_id", "variant", "batch_size", "seed", "step", "epoch", "name", "value")
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
CHUNK_ROWS = 2000


def content_disposition(filename: str) -> str:
    return f'attachment; filename="{filename}"'


def stream_metrics_csv(database_url: str, *, job_id: str | None = None, run_id: str | None = None) -> Iterator[bytes]:
    """CSV bytes: a header, then one row per metric point, runs in (batch size, variant, seed) order
    and each run's points by (name, step), which the unique index serves without a sort.

    Give `job_id` (every run of the job), `run_id` (one run) or both. Opens its own session: the
    response body is produced after the request's session is gone. Values are written with Python's
    shortest round-trip repr (`0.9755`, `inf`, `nan`).
    """
    if job_id is None and run_id is None:
        raise ValueError("stream_metrics_csv needs a job_id or a run_id")
    session = session_factory(database_url)()
    try:
        runs_stmt = ordered_runs(job_id) if job_id is not None else select(Run)
        if run_id is not None:
            runs_stmt = runs_stmt.where(Run.id == run_id)
        runs = list(session.scalars(runs_stmt))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        rows = 0
        for run in runs:
            labels = (run.job_id, run.id, run.variant, run.batch_size, run.seed)
            for step, epoch, name, value in session.execute(_points(run.id)):
                writer.writerow((*labels, step, repr(float(epoch)), name, repr(float(value))))
                rows += 1
                if rows % CHUNK_ROWS == 0:
                    yield buf.getvalue().encode()
                    buf.seek(0)
                    buf.truncate()
        yield buf.getvalue().encode()
    finally:
        session.close()


def _points(run_id: str) -> Select[int, float, str, float]:
    return (
        select(MetricPoint.step, MetricPoint.epoch, MetricPoint.name, MetricPoint.value)
        .where(MetricPoint.run_id == run_id)
        .order_by(MetricPoint.name, MetricPoint.step)
        .execution_options(yield_per=CHUNK_ROWS)
    )


CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/csv": {"schema": {"type": "string"}}},
        "description": "Long-format CSV, one row per metric point: " + ", ".join(CSV_COLUMNS) + ".",
    },
    **ERROR_RESPONSES,
}
