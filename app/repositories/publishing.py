"""Sending a queued row's task, for runs and probes alike: a row records when its task was last sent and how
many were, so the reconciler can send the never-sent ones and, after a back-off that doubles with each send,
again the ones whose task the broker may have lost. A second task for a row is harmless: claims are conditional."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, true, update
from sqlalchemy.orm import Session

from app.tables import Probe, Run

Publishable = type[Run] | type[Probe]
QUEUED = "queued"  # RunStatus.QUEUED, and a probe's


def published(table: Publishable, now: datetime) -> dict[str, Any]:
    """What sending a row's task writes: when, and one more publish (which spaces out its republishing)."""
    return {"published_at": now, "publish_count": table.publish_count + 1}


def mark_published(session: Session, table: Publishable, ids: list[str], now: datetime) -> None:
    """Record tasks sent for these rows (the caller commits)."""
    if ids:
        session.execute(update(table).where(table.id.in_(ids)).values(**published(table, now)))


def republish_due(table: Publishable, now: datetime, after_seconds: float, max_seconds: float) -> ColumnElement[bool]:
    """Queued rows whose last task is older than their back-off: `after_seconds` after the first publish,
    doubling with each republish, at most `max_seconds`. One term per doubling, so it is plain SQL anywhere."""
    doublings = max(0, math.ceil(math.log2(max(max_seconds / after_seconds, 1.0))))
    terms = []
    for n in range(doublings + 1):
        wait = min(after_seconds * 2**n, max_seconds)
        if n == doublings:  # the cap: every later publish waits the longest
            count: ColumnElement[bool] = table.publish_count >= n + 1 if n else true()
        elif n == 0:
            count = table.publish_count <= 1
        else:
            count = table.publish_count == n + 1
        terms.append(count & (table.published_at < now - timedelta(seconds=wait)))
    return (table.status == QUEUED) & table.published_at.is_not(None) & or_(*terms)


def take_unpublished(session: Session, table: Publishable, now: datetime, limit: int) -> list[str]:
    """Up to `limit` queued rows whose task was never sent (the API died or the broker was down at submit),
    oldest first: marked published now, for the caller to publish after it commits."""
    where = (table.status == QUEUED) & table.published_at.is_(None)
    return _take(session, table, where, table.created_at, limit, now)


def take_stale(
    session: Session, table: Publishable, now: datetime, after_seconds: float, max_seconds: float, limit: int
) -> list[str]:
    """Up to `limit` queued rows due a republish (`republish_due`), the longest waiting first: marked
    published now, for the caller to publish after it commits."""
    due = republish_due(table, now, after_seconds, max_seconds)
    return _take(session, table, due, table.published_at, limit, now)


def _take(
    session: Session, table: Publishable, where: ColumnElement[bool], order: Any, limit: int, now: datetime
) -> list[str]:
    if limit <= 0:
        return []
    pick = select(table.id).where(where).order_by(order, table.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)  # two reconcilers never take the same row
    ids = list(session.scalars(pick))
    mark_published(session, table, ids, now)
    return ids
