"""The reconciler's rules, one round at a time, on the real Postgres."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.tables import Job, Run, utcnow
from tests.factories import job_spec
from workers.reconciler import reconcile_once


def make_runs(client: TestClient, n: int) -> tuple[str, list[str]]:
    job = client.post(
        "/v1/jobs", json=job_spec("digits", batch_sizes=[8], seeds=list(range(n)), variants=[{"norm": "bn"}])
    ).json()
    return job["id"], [r["id"] for r in client.get(f"/v1/jobs/{job['id']}/runs").json()]


def set_run(settings: Settings, run_id: str, **values: object) -> None:
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(**values))


def states(settings: Settings, ids: list[str]) -> list[tuple[str, int, str | None]]:
    with session_scope(settings.resolved_database_url) as s:
        rows = {r.id: (r.status, r.attempt, r.error) for r in s.scalars(select(Run).where(Run.id.in_(ids)))}
    return [rows[i] for i in ids]


def test_one_round_repairs_what_was_lost(client: TestClient, settings: Settings) -> None:
    _, ids = make_runs(client, 6)
    now = utcnow()
    past, future = now - timedelta(seconds=60), now + timedelta(seconds=60)
    set_run(settings, ids[0], published_at=None)  # the API died before publishing
    set_run(settings, ids[1], status="running", attempt=1, lease_expires_at=past)  # worker lost
    set_run(settings, ids[2], status="running", attempt=3, lease_expires_at=past)  # lost on every attempt
    set_run(settings, ids[3], status="running", attempt=1, lease_expires_at=future)  # alive
    set_run(settings, ids[4], published_at=now)  # published just now: leave it to the broker
    set_run(settings, ids[5], published_at=now - timedelta(hours=1))  # broker lost it long ago
    published: list[str] = []
    with session_scope(settings.resolved_database_url) as s:
        counts = reconcile_once(s, settings.model_copy(update={"max_attempts": 3}), published.append)
    assert counts == {"cancelled": 0, "failed": 1, "requeued": 1, "published": 3}
    assert sorted(published) == sorted([ids[0], ids[1], ids[5]])
    after = states(settings, ids)
    assert after[1][:2] == ("queued", 1)
    assert after[2][0] == "failed" and "all 3 attempts" in (after[2][2] or "")
    assert after[3][:2] == ("running", 1) and after[4][0] == "queued"
    with session_scope(settings.resolved_database_url) as s:  # a second round finds nothing to do
        assert reconcile_once(s, settings, published.append) == {
            "cancelled": 0,
            "failed": 0,
            "requeued": 0,
            "published": 0,
        }


def test_runs_of_cancelled_jobs_never_return_to_the_queue(client: TestClient, settings: Settings) -> None:
    job_id, ids = make_runs(client, 2)
    set_run(settings, ids[0], status="running", attempt=1, lease_expires_at=utcnow() - timedelta(seconds=5))
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    published: list[str] = []
    with session_scope(settings.resolved_database_url) as s:
        counts = reconcile_once(s, settings, published.append)
    assert counts["cancelled"] == 2 and published == []
    assert [st[0] for st in states(settings, ids)] == ["cancelled", "cancelled"]
