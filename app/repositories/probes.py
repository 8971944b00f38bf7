"""Probe state transitions: a worker claims a queued probe (once) and records how it ended."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.tables import Probe, utcnow


def claim_probe(session: Session, probe_id: str, worker: str) -> bool:
    """queued → running, in one conditional update: a redelivered task finds it taken and measures nothing."""
    rows = session.execute(
        update(Probe)
        .where(Probe.id == probe_id, Probe.status == "queued")
        .values(status="running", worker=worker, started_at=utcnow())
        .returning(Probe.id)
    ).all()
    session.commit()
    return bool(rows)


def finish_probe(session: Session, probe_id: str, *, result: dict[str, Any] | None, error: str | None) -> None:
    """running → succeeded (with its result) or failed (with why)."""
    session.execute(
        update(Probe)
        .where(Probe.id == probe_id, Probe.status == "running")
        .values(
            status="failed" if error is not None else "succeeded",
            result=result,
            error=None if error is None else error[:2000],
            finished_at=utcnow(),
        )
    )
    session.commit()


def fail_queued(session: Session, probe_id: str, error: str) -> None:
    """A probe whose task could not be published: failed at once, saying so (nothing would ever measure it)."""
    session.execute(
        update(Probe)
        .where(Probe.id == probe_id, Probe.status == "queued")
        .values(status="failed", error=error, finished_at=utcnow())
    )
    session.commit()


def fail_stale(session: Session, probe_id: str, started_before: datetime) -> None:
    """A running probe whose worker went away (killed, lost): failed, saying so, once it is far past its time."""
    session.execute(
        update(Probe)
        .where(Probe.id == probe_id, Probe.status == "running", Probe.started_at < started_before)
        .values(
            status="failed",
            error="the worker measuring it stopped before it finished (no result long after its max_seconds); "
            "POST the probe again",
            finished_at=utcnow(),
        )
    )
    session.commit()
