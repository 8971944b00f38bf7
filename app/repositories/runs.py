"""The runs table's queries and transitions."""

from __future__ import annotations

from sqlalchemy import Select, select

from app.tables import Run


def ordered_runs(job_id: str) -> Select[Run]:
    """A job's runs in report order: batch size, then the spec's variant order, then seed."""
    return select(Run).where(Run.job_id == job_id).order_by(Run.batch_size, Run.variant_index, Run.seed)
