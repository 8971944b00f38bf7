"""The reconciler's rules, one round at a time, on the real Postgres."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta

from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import func, select, update

from app.config import Settings
from app.db import session_scope
from app.queue import publish_train_run
from app.tables import Job, Run, utcnow
from tests.factories import job_spec
from workers.reconciler import broker_depth, reconcile_once


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
    assert counts == {
        "cancelled": 0,
        "failed": 1,
        "requeued": 1,
        "published": 3,
        "probes_failed": 0,
        "probes_published": 0,
    }
    assert sorted(published) == sorted([ids[0], ids[1], ids[5]])
    after = states(settings, ids)
    assert after[1][:2] == ("queued", 1)
    assert after[2][0] == "failed" and "all 3 attempts" in (after[2][2] or "")
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(Run.failure_class).where(Run.id == ids[2])) == "infrastructure"
    assert after[3][:2] == ("running", 1) and after[4][0] == "queued"
    with session_scope(settings.resolved_database_url) as s:  # a second round finds nothing to do
        assert reconcile_once(s, settings, published.append) == {
            "cancelled": 0,
            "failed": 0,
            "requeued": 0,
            "published": 0,
            "probes_failed": 0,
            "probes_published": 0,
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


# --- the republish storm (issue 15 item 10): 2,000 queued runs, one slow worker, an hour of simulated time ---

RUNS, ROUND_S, WORK_S, HOUR_S = 2000, 10, 20, 3600
SLACK = 2  # tasks a worker has taken from the queue but not yet claimed, and rounding


def many_queued_runs(client: TestClient, settings: Settings, n: int) -> list[str]:
    """`n` queued runs of one job (the API makes the first, the rest are copies of it), none published yet."""
    job_id, (first, *_) = make_runs(client, 1)
    with session_scope(settings.resolved_database_url) as s:
        run = s.get(Run, first)
        assert run is not None
        copy = {c: getattr(run, c) for c in ("job_id", "owner", "variant", "variant_index", "norm", "norm_params")}
        s.add_all(Run(**copy, batch_size=8, seed=i, status="queued", pack_key=f"storm{i}") for i in range(1, n))
        s.flush()
        s.execute(update(Run).where(Run.job_id == job_id).values(published_at=None, publish_count=0))
        return list(s.scalars(select(Run.id).where(Run.job_id == job_id).order_by(Run.seed)))


class RedisQueue:
    """The real Redis list of the train queue, as the broker fills it and one slow worker drains it."""

    def __init__(self, settings: Settings, redis_client: Redis) -> None:
        self.settings, self.redis, self.key = settings, redis_client, f"{settings.broker_key_prefix}train"
        self.sent = 0

    def publish(self, run_id: str) -> None:
        publish_train_run(self.settings, run_id)
        self.sent += 1

    def depth(self) -> int:
        return int(self.redis.llen(self.key))

    def take(self) -> str | None:
        """The oldest task's run id (kombu pushes on the left and pops on the right)."""
        raw = self.redis.rpop(self.key)
        if raw is None:
            return None
        message = json.loads(raw)
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        return str(args[0])


class SlowWorker:
    """Takes one task every WORK_S simulated seconds and trains its run for that long (duplicates it skips
    at once, as a real worker does)."""

    def __init__(self, settings: Settings, queue: RedisQueue) -> None:
        self.settings, self.queue, self.current, self.next_at = settings, queue, None, 0.0

    def tick(self, t: float, now: datetime) -> None:
        if t < self.next_at:
            return
        with session_scope(self.settings.resolved_database_url) as s:
            if self.current is not None:
                s.execute(update(Run).where(Run.id == self.current).values(status="succeeded", finished_at=now))
                self.current = None
            while (run_id := self.queue.take()) is not None:
                claimed = s.execute(
                    update(Run)
                    .where(Run.id == run_id, Run.status == "queued")
                    .values(status="running", attempt=Run.attempt + 1, lease_expires_at=now + timedelta(days=1))
                    .returning(Run.id)
                ).first()
                if claimed is not None:
                    self.current = run_id
                    break
        self.next_at = t + WORK_S


def queued_count(settings: Settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return int(s.scalar(select(func.count()).where(Run.status == "queued")) or 0)


def test_a_slow_worker_never_grows_the_broker_queue(
    client: TestClient, settings: Settings, redis_client: Redis
) -> None:
    """2,000 queued runs, one worker taking a task every 20 s, the reconciler every 10 s for an hour of simulated
    time, and the broker losing every task half-way: the queue never holds more than one task per queued run
    (plus SLACK), lost tasks are all sent again, and nothing else is."""
    ids = many_queued_runs(client, settings, RUNS)
    queue = RedisQueue(settings, redis_client)
    redis_client.delete(queue.key)
    worker = SlowWorker(settings, queue)
    start = utcnow()
    excess: list[int] = []
    lost_at, lost = HOUR_S // 2, 0
    for t in range(0, HOUR_S + 1, ROUND_S):
        now = start + timedelta(seconds=t)
        if t == lost_at:  # a Redis restart without persistence: every waiting task is gone
            lost = queue.depth()
            redis_client.delete(queue.key)
        with session_scope(settings.resolved_database_url) as s:
            reconcile_once(s, settings, queue.publish, now=now, queue_depth=lambda: broker_depth(settings))
        worker.tick(t, now)
        excess.append(queue.depth() - queued_count(settings))
    assert max(excess) <= SLACK, f"the queue outgrew the queued runs by {max(excess)}"
    assert queue.depth() == queued_count(settings) > 0  # every queued run has its task again
    # Sent: each run once, then again only the tasks the broker lost.
    assert len(ids) <= queue.sent <= len(ids) + lost + SLACK
    with session_scope(settings.resolved_database_url) as s:
        assert max(s.scalars(select(Run.publish_count))) <= 2


def test_without_a_queue_depth_back_off_and_the_cap_bound_republishing(client: TestClient, settings: Settings) -> None:
    """A broker that cannot say its depth: each run's task is sent again at most after 600 s, then 1,200 s more
    (then the 3,600 s cap, past the hour), and no round sends more than the cap."""
    ids = many_queued_runs(client, settings, RUNS)
    start = utcnow()
    per_round: list[int] = []
    sent: list[str] = []
    for t in range(0, HOUR_S + 1, ROUND_S):
        before = len(sent)
        with session_scope(settings.resolved_database_url) as s:
            reconcile_once(s, settings, sent.append, now=start + timedelta(seconds=t))
        per_round.append(len(sent) - before)
    assert max(per_round) <= settings.republish_max_per_cycle
    assert sorted(set(sent)) == sorted(ids)
    assert max(sent.count(i) for i in ids) == 3  # the first publish, +600 s, +1,800 s
    with session_scope(settings.resolved_database_url) as s:
        assert set(s.scalars(select(Run.publish_count))) == {3}
