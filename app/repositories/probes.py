"""Probe state transitions: a worker claims a queued probe (once) and records how it ended."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.tables import Probe, utcnow

# A running probe this long past its max_seconds lost its worker (a measurement may overrun the limit a little).
STALE_GRACE = timedelta(seconds=600)
STALE_ERROR = (
    "the worker measuring it stopped before it finished (no result long after its max_seconds); POST the probe again"
)


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


def fail_stale(
    session: Session, now: datetime, *, owner: str | None = None, probe_ids: Collection[str] | None = None
) -> list[str]:
    """Running probes whose worker went away (killed, lost), now far past their `max_seconds` (STALE_GRACE):
    failed, saying so, so none stays running or holds its owner's quota forever. Every owner's, or one owner's,
    or the probes named; the caller commits. The reconciler runs it for all; reading a probe, for that one."""
    query = select(Probe.id, Probe.started_at, Probe.spec).where(Probe.status == "running")
    if owner is not None:
        query = query.where(Probe.owner == owner)
    if probe_ids is not None:
        query = query.where(Probe.id.in_(probe_ids))
    stale = [
        probe_id
        for probe_id, started_at, spec in session.execute(query)
        if started_at is not None
        and now - started_at > timedelta(seconds=int(spec.get("max_seconds", 300))) + STALE_GRACE
    ]
    if stale:
        session.execute(
            update(Probe)
            .where(Probe.id.in_(stale), Probe.status == "running")
            .values(status="failed", error=STALE_ERROR, finished_at=now)
        )
    return stale
