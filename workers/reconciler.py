"""The reconciler: Postgres is the referee, so it repairs whatever the broker or a dead worker lost.

- queued runs never published (the API died between commit and publish, or the broker was down) are published;
- queued runs whose task the broker really lost are published again: only while the broker's queue holds fewer
  tasks than there are published queued runs (the deficit), the longest waiting first, each run at most once per
  back-off (`republish_after_seconds`, doubling with each republish up to `republish_max_backoff_seconds`). A
  slow worker therefore never grows the queue: it holds at most one task per queued run plus the few a worker
  has taken but not yet claimed. A broker that cannot say its depth gets back-off alone;
- every round publishes at most `republish_max_per_cycle` of those, and one reconciler at a time does (a
  Postgres advisory lock), so several workers' reconcilers never fill one deficit twice;
- running runs whose lease expired (the worker died or froze) go back to the queue, or fail once they used up
  `max_attempts`; queued runs of cancelled jobs are cancelled;
- running probes whose worker went away (far past their `max_seconds`) fail, saying so; queued probes never
  sent, or whose task may be lost, are sent again with the runs' back-off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import TRAIN_QUEUE, Settings
from app.db import session_scope
from app.queue import celery_config
from app.repositories import probes, publishing, runs
from app.tables import Job, Probe, utcnow

log = logging.getLogger(__name__)
Publish = Callable[[str], None]
QueueDepth = Callable[[], int | None]
# Any fixed key: the Postgres advisory lock only one reconciler's publishing holds at a time.
PUBLISH_LOCK = 0x6E6F726D  # "norm"


def reconcile_once(
    session: Session,
    settings: Settings,
    publish: Publish,
    *,
    publish_probe: Publish | None = None,
    now: datetime | None = None,
    queue_depth: QueueDepth | None = None,
) -> dict[str, int]:
    """One round of repairs, committed before anything is published; returns what it did, by kind.
    `publish` sends a run's task, `publish_probe` a probe's (None: probes are not republished);
    `queue_depth` says how many tasks the broker's queue holds (None: it cannot say); `now` is for tests."""
    now = now or utcnow()
    cancelled = runs.cancel_queued(session, select(Job.id).where(Job.cancel_requested))
    lost = runs.requeue_expired(session, settings.max_attempts, now)
    stale_probes = probes.fail_stale(session, now)
    session.commit()
    for run_id in lost.requeued:  # their task was consumed: each needs a new one
        publish(run_id)
    with _publish_lock(session) as leader:
        republished = _republish(session, settings, publish, now, queue_depth) if leader else 0
        probes_published = _republish_probes(session, settings, publish_probe, now) if leader else 0
    counts = {
        "cancelled": len(cancelled) + len(lost.cancelled),
        "failed": len(lost.failed),
        "requeued": len(lost.requeued),
        "published": len(lost.requeued) + republished,
        "probes_failed": len(stale_probes),
        "probes_published": probes_published,
    }
    if any(counts.values()):
        log.warning("reconciler: %s", counts)
    return counts


def _republish(
    session: Session, settings: Settings, publish: Publish, now: datetime, queue_depth: QueueDepth | None
) -> int:
    """Publish the never-published runs and those whose task is lost, within the round's cap."""
    cap = settings.republish_max_per_cycle
    expected = runs.count_queued_published(session)  # before this round marks any
    never = runs.take_unpublished(session, now, cap)
    depth = queue_depth() if queue_depth is not None else None
    # Tasks missing from the broker; unknown depth: as many as are due (back-off and the cap still bound it).
    missing = cap if depth is None else max(0, expected - depth)
    stale = runs.take_stale(
        session,
        now,
        settings.republish_after_seconds,
        settings.republish_max_backoff_seconds,
        min(cap - len(never), missing),
    )
    session.commit()
    for run_id in never + stale:
        publish(run_id)
    return len(never) + len(stale)


def _republish_probes(session: Session, settings: Settings, publish: Publish | None, now: datetime) -> int:
    """Send the tasks of queued probes that were never sent or are due again. Back-off alone bounds this (the
    queue depth counts runs' tasks); an owner has at most a few probes queued, and a duplicate measures nothing."""
    if publish is None:
        return 0
    cap = settings.republish_max_per_cycle
    never = publishing.take_unpublished(session, Probe, now, cap)
    after, longest = settings.republish_after_seconds, settings.republish_max_backoff_seconds
    stale = publishing.take_stale(session, Probe, now, after, longest, cap - len(never))
    session.commit()
    for probe_id in never + stale:
        publish(probe_id)
    return len(never) + len(stale)


@contextmanager
def _publish_lock(session: Session) -> Iterator[bool]:
    """On Postgres, whether this round holds the publishing lock (a session-level advisory lock on a connection
    of its own, held until the round's tasks are sent); elsewhere (one embedded worker) always."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        yield True
        return
    with bind.engine.connect() as conn:
        leader = bool(conn.scalar(select(func.pg_try_advisory_lock(PUBLISH_LOCK))))
        conn.commit()
        try:
            yield leader
        finally:
            if leader:
                conn.scalar(select(func.pg_advisory_unlock(PUBLISH_LOCK)))
                conn.commit()


def broker_depth(settings: Settings) -> int | None:
    """Tasks waiting in the broker's train queue (Redis, SQLAlchemy and filesystem transports), or None when
    the broker cannot say (unreachable, or a transport without a count)."""
    options = celery_config(settings)["broker_transport_options"]
    try:
        with (
            Connection(settings.resolved_broker_url, transport_options=options, connect_timeout=3) as conn,
            conn.channel() as channel,
        ):
            _, count, _ = channel.queue_declare(TRAIN_QUEUE, passive=False)
            return int(count)
    except Exception:  # no count is no reason to stop repairing: back-off alone bounds the republishing
        log.warning("could not read the broker's queue depth", exc_info=True)
        return None


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `reconcile_seconds` inside a worker process."""

    def __init__(self, settings: Settings, publish: Publish, publish_probe: Publish) -> None:
        super().__init__(name="normbench-reconciler", daemon=True)
        self.settings, self.publish, self.publish_probe = settings, publish, publish_probe
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.reconcile_seconds):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    reconcile_once(
                        session, self.settings, self.publish, publish_probe=self.publish_probe, queue_depth=self.depth
                    )
            except Exception:  # the database or broker is down: try again next round
                log.exception("reconciler round failed")

    def depth(self) -> int | None:
        return broker_depth(self.settings)
