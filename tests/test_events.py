"""Live progress as Server-Sent Events: read during a real run, replayed for a finished job, and the
tracker's rules (retries, epochs sent once, runs cancelled before they started) on rows written by hand."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_factory
from app.main import create_app
from app.services import events as events_service
from app.services import keys
from app.services.events import JobEventTracker
from app.tables import Job, MetricPoint, Run, utcnow
from tests.factories import job_spec
from tests.support import WorkerProcess
from tests.test_cli import serve

SPEC = job_spec(
    "digits",
    model={"arch": "mlp", "hidden": [32]},
    variants=[{"norm": "bn"}, {"norm": "gn", "groups": 4}],
    batch_sizes=[8],
    budget={"epochs": 3},
)


def read_events(lines: Iterator[str], on_event: Any = None) -> tuple[list[tuple[int, str, dict[str, Any]]], int]:
    """Parse a text/event-stream into (id, event, data) triples; also count comment lines."""
    events: list[tuple[int, str, dict[str, Any]]] = []
    comments = 0
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            comments += 1
        elif line == "":
            if "event" in fields:
                events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                if on_event:
                    on_event(events[-1])
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return events, comments


def assert_well_ordered(events: list[tuple[int, str, dict[str, Any]]], run_ids: set[str], epochs: int) -> None:
    assert [i for i, _, _ in events] == list(range(1, len(events) + 1))
    names = [name for _, name, _ in events]
    assert names.count("job_finished") == 1 and names[-1] == "job_finished"
    for run_id in run_ids:
        mine = [(name, data) for _, name, data in events if data.get("run_id") == run_id]
        assert [name for name, _ in mine] == ["run_started"] + ["epoch_done"] * epochs + ["run_finished"], mine
        assert [data["epoch"] for name, data in mine if name == "epoch_done"] == list(range(1, epochs + 1))
        for name, data in mine:
            if name == "epoch_done":
                assert 0.0 <= data["val_acc"] <= 1.0 and data["val_loss"] > 0 and data["train_loss"] > 0
                assert data["epochs_total"] == epochs
        started, finished = mine[0][1], mine[-1][1]
        assert started["attempt"] == 1 and started["batch_size"] == 8 and started["variant"] in ("bn", "gn(4)")
        assert finished["status"] == "succeeded" and 0.0 <= finished["val_acc"] <= 1.0 and finished["error"] is None
        assert finished["val_acc"] == mine[-2][1]["val_acc"]  # the final metrics are the last epoch's
    done = events[-1][2]
    assert done["status"] == "succeeded" and done["runs_total"] == done["runs_finished"] == len(run_ids)
    assert done["counts"] == {"succeeded": len(run_ids)}


def test_unknown_and_other_owners_jobs_are_404(client: TestClient, settings: Settings) -> None:
    resp = client.get("/v1/jobs/missing/events")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    keyed = settings.model_copy(update={"require_api_keys": True})
    with TestClient(create_app(keyed)) as c:
        with session_factory(keyed.resolved_database_url)() as s:
            alice, bob = keys.create_key(s, "alice").token, keys.create_key(s, "bob").token
        job_id = c.post("/v1/jobs", json=SPEC, headers={"Authorization": f"Bearer {alice}"}).json()["id"]
        assert c.get(f"/v1/jobs/{job_id}/events").status_code == 401
        resp = c.get(f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {bob}"})
        assert resp.status_code == 404 and job_id in resp.json()["detail"]
        snapshot = c.get(
            f"/v1/jobs/{job_id}/events", params={"follow": "false"}, headers={"Authorization": f"Bearer {alice}"}
        )
        assert snapshot.status_code == 200 and snapshot.text.startswith("retry: ")
        c.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {alice}"})


def test_openapi_documents_every_event(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {"404", "401"} <= set(op["responses"])
    for text in ("run_started", "epoch_done", "run_finished", "job_finished", "val_acc", "attempt", "Last-Event-ID"):
        assert text in op["description"], text


# --------------------------------------------------------------- the tracker on hand-written rows


def add_runs(session: Session, job: Job, n: int) -> list[Run]:
    runs = [
        Run(
            job_id=job.id,
            owner=job.owner,
            variant="bn",
            variant_index=0,
            norm="bn",
            norm_params={},
            batch_size=8,
            seed=seed,
            status="queued",
            published_at=utcnow() + timedelta(days=1),  # so a worker's reconciler leaves these rows alone
        )
        for seed in range(n)
    ]
    session.add_all(runs)
    session.commit()
    return runs


def add_job(session: Session, settings: Settings, runs: int) -> tuple[Job, list[Run]]:
    """A job of the default owner (2 epochs of 800 samples) with `runs` queued runs."""
    job = Job(
        owner=settings.default_owner, dataset_id="digits", spec={}, budget={"epochs": 2, "samples_per_epoch": 800}
    )
    session.add(job)
    session.commit()
    return job, add_runs(session, job, runs)


def running_job(settings: Settings) -> tuple[Job, Run]:
    """A job whose one run is held by a (pretend) live worker, so no reconciler takes it: the job stays running."""
    with session_factory(settings.resolved_database_url)() as s:
        job, (run,) = add_job(s, settings, 1)
        s.execute(update(Run).where(Run.id == run.id).values(status="running", attempt=1))
        s.commit()
    return job, run


def write_epoch(session: Session, run: Run, epoch: int, acc: float) -> None:
    for name in ("val_acc", "val_loss", "train_loss"):
        value = acc if name == "val_acc" else 1.0 / epoch
        session.add(MetricPoint(run_id=run.id, step=100 * epoch, epoch=float(epoch), name=name, value=value))
    # Points that are not epoch metrics, and a step-level point that lands on an integral epoch: ignored.
    session.add(MetricPoint(run_id=run.id, step=100 * epoch, epoch=float(epoch), name="lr", value=0.1))
    session.add(MetricPoint(run_id=run.id, step=100 * epoch - 50, epoch=epoch - 0.5, name="train_loss", value=2.0))
    session.execute(update(Run).where(Run.id == run.id).values(epochs_done=epoch, steps_done=100 * epoch))
    session.commit()


def test_tracker_sends_each_change_once(client: TestClient, settings: Settings) -> None:
    """Claims, a retry that redoes an epoch, a run cancelled before it started, a NaN loss, the job's end."""
    factory = session_factory(settings.resolved_database_url)
    with factory() as s:
        job, (a, b, c) = add_job(s, settings, 3)
    tracker = JobEventTracker(job.id)

    def poll() -> list[tuple[str, dict[str, Any]]]:
        with factory() as s:
            return [(e.name, e.data.model_dump()) for e in tracker.poll(s)]

    assert poll() == []  # all queued: nothing to say yet
    with factory() as s:
        # Run a claimed, and then ends its first epoch before anyone looks again.
        s.execute(update(Run).where(Run.id == a.id).values(status="running", attempt=1, started_at=utcnow()))
        s.commit()
        write_epoch(s, a, 1, 0.5)
    events = poll()
    assert [(n, d.get("epoch")) for n, d in events] == [("run_started", None), ("epoch_done", 1)]
    assert events[1][1] | {"run_id": None} == {
        "run_id": None,
        "variant": "bn",
        "batch_size": 8,
        "seed": 0,
        "epoch": 1,
        "epochs_total": 2,
        "val_acc": 0.5,
        "val_loss": 1.0,
        "train_loss": 1.0,
    }
    assert poll() == []  # nothing changed
    with factory() as s:
        # Run a is handed back and claimed again (attempt 2), redoing epoch 1 from its checkpoint; run c is
        # cancelled while queued.
        s.execute(update(Run).where(Run.id == a.id).values(attempt=2))
        s.execute(
            update(Run).where(Run.id == c.id).values(status="cancelled", error="cancelled by user before it started")
        )
        s.commit()
    events = poll()
    assert [(n, d["run_id"], d.get("attempt")) for n, d in events] == [
        ("run_started", a.id, 2),
        ("run_finished", c.id, 0),
    ]
    assert events[1][1]["status"] == "cancelled" and events[1][1]["val_acc"] is None
    with factory() as s:
        write_epoch(s, a, 2, 0.75)
        s.execute(
            update(Run)
            .where(Run.id == a.id)
            .values(status="succeeded", final_metrics={"val_acc": 0.75, "val_loss": 0.5, "train_loss": 0.5})
        )
        s.execute(update(Run).where(Run.id == b.id).values(status="running", attempt=1))
        s.commit()
        write_epoch(s, b, 1, 0.25)
        s.execute(
            update(MetricPoint)
            .where(MetricPoint.run_id == b.id, MetricPoint.name == "val_loss")
            .values(value=float("nan"))
        )
        s.execute(
            update(Run)
            .where(Run.id == b.id)
            .values(status="diverged", error="training loss became non-finite at step 150 (epoch 2)")
        )
        s.commit()
    events = poll()
    assert [(n, d.get("run_id"), d.get("epoch")) for n, d in events] == [
        ("epoch_done", a.id, 2),
        ("run_finished", a.id, None),
        ("run_started", b.id, None),
        ("epoch_done", b.id, 1),
        ("run_finished", b.id, None),
        ("job_finished", None, None),
    ]
    assert events[1][1]["val_acc"] == 0.75 and events[3][1]["val_loss"] is None  # NaN is sent as null
    assert events[4][1]["status"] == "diverged" and "non-finite" in events[4][1]["error"]
    assert events[5][1] == {
        "job_id": job.id,
        "status": "cancelled",
        "runs_total": 3,
        "runs_finished": 3,
        "counts": {"succeeded": 1, "diverged": 1, "cancelled": 1},
    }
    assert tracker.done

    # A new stream on the finished job: the whole history, per run in order.
    with client.stream("GET", f"/v1/jobs/{job.id}/events") as stream:
        replay, comments = read_events(stream.iter_lines())
    assert comments == 1  # the opening comment; no heartbeat
    assert [(n, d.get("run_id")) for _, n, d in replay] == [
        ("run_started", a.id),
        ("epoch_done", a.id),
        ("epoch_done", a.id),
        ("run_finished", a.id),
        ("run_started", b.id),
        ("epoch_done", b.id),
        ("run_finished", b.id),
        ("run_finished", c.id),
        ("job_finished", None),
    ]
    assert replay[0][2]["attempt"] == 2  # history knows only the latest attempt


def test_follow_false_is_a_snapshot_and_heartbeats_keep_a_quiet_stream_open(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, run = running_job(settings)
    with session_factory(settings.resolved_database_url)() as s:
        write_epoch(s, run, 1, 0.5)
    resp = client.get(f"/v1/jobs/{job.id}/events", params={"follow": "false"})
    events, _ = read_events(iter(resp.text.splitlines()))
    assert [n for _, n, _ in events] == ["run_started", "epoch_done"]

    monkeypatch.setattr("app.services.events.POLL_SECONDS", 0.05)
    monkeypatch.setattr("app.services.events.HEARTBEAT_SECONDS", 0.2)
    with client.stream("GET", f"/v1/jobs/{job.id}/events") as stream:
        seen: list[str] = []
        for line in stream.iter_lines():
            seen.append(line)
            if line == ": heartbeat":
                break
    # Leaving the `with` disconnects; the stream stops polling (the test would hang otherwise).
    assert seen[:2] == ["retry: 2000", f": events of job {job.id}"]
    assert "event: epoch_done" in seen


def test_a_client_that_goes_away_stops_the_polling(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a real socket (uvicorn): once the client hangs up, the server polls the database no more."""
    job, _ = running_job(settings)
    polls = 0
    real_poll = events_service.poll_once

    def counting_poll(tracker: JobEventTracker, url: str) -> list[Any]:
        nonlocal polls
        polls += 1
        return real_poll(tracker, url)

    monkeypatch.setattr(events_service, "poll_once", counting_poll)
    monkeypatch.setattr(events_service, "POLL_SECONDS", 0.05)
    for base in serve(settings):
        with httpx.Client(base_url=base, timeout=10) as http, http.stream("GET", f"/v1/jobs/{job.id}/events") as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: run_started"
            deadline = time.monotonic() + 5
            while polls < 5:  # connected: it keeps looking for changes
                assert time.monotonic() < deadline, polls
                time.sleep(0.05)
        deadline = time.monotonic() + 5
        while True:  # the server notices within a poll or two
            before = polls
            time.sleep(0.5)
            if polls == before:
                break
            assert time.monotonic() < deadline, "the stream kept polling after the client left"


# ---------------------------------------------------------------- a real worker behind the stream


@pytest.mark.e2e
def test_stream_follows_a_real_run_then_replays_it(
    client: TestClient, settings: Settings, worker: WorkerProcess
) -> None:
    resp = client.post("/v1/jobs", json=SPEC)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    first, second = client.get(f"/v1/jobs/{job_id}/runs").json()  # published, and so trained, in this order
    # Hold the second run's row locked: the worker's claim of it waits, so the job cannot finish before the
    # stream has delivered the first run in full. (A timer lets go after 60 s so a failure cannot hang.)
    lock = psycopg.connect(settings.resolved_database_url.replace("+psycopg", ""))
    lock.execute("SELECT id FROM runs WHERE id = %s FOR UPDATE", (second["id"],))
    release = threading.Timer(60, lock.rollback)
    release.start()
    seen_mid_run: list[dict[str, Any]] = []

    def on_event(event: tuple[int, str, dict[str, Any]]) -> None:
        if event[1] == "run_finished" and event[2]["run_id"] == first["id"]:
            # Another request while the stream is open: the job is half done, and the stream already told us so.
            seen_mid_run.append(client.get(f"/v1/jobs/{job_id}").json())
            lock.rollback()

    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-cache"
            live, _ = read_events(stream.iter_lines(), on_event)
    finally:
        release.cancel()
        lock.close()
    assert seen_mid_run, "the first run's end never arrived while the second run was held"
    assert seen_mid_run[0]["progress"]["runs_finished"] == 1 and seen_mid_run[0]["status"] in ("queued", "running")
    run_ids = {first["id"], second["id"]}
    assert_well_ordered(live, run_ids, epochs=3)
    names = [(n, d.get("run_id")) for _, n, d in live]
    assert names.index(("run_finished", first["id"])) < names.index(("run_started", second["id"]))
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"  # the stream ended with the job

    # The same job, finished: its history in run order, then job_finished, then the stream closes.
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        replay, _ = read_events(stream.iter_lines())
    assert_well_ordered(replay, run_ids, epochs=3)
    runs_in_order = [data["run_id"] for _, name, data in replay if name == "run_started"]
    assert [r["id"] for r in client.get(f"/v1/jobs/{job_id}/runs").json()] == runs_in_order
    assert [name for _, name, _ in replay[:5]] == [
        "run_started",
        "epoch_done",
        "epoch_done",
        "epoch_done",
        "run_finished",
    ]
    live_epochs = {(d["run_id"], d["epoch"]): d for _, n, d in live if n == "epoch_done"}
    assert live_epochs == {(d["run_id"], d["epoch"]): d for _, n, d in replay if n == "epoch_done"}


@pytest.mark.e2e
def test_cancelled_job_stream_ends_with_cancelled(client: TestClient, worker: WorkerProcess) -> None:
    spec = {**SPEC, "budget": {"epochs": 40}, "batch_sizes": [2]}
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        lines = stream.iter_lines()
        cancelled = False

        def cancel_on_start(event: tuple[int, str, dict[str, Any]]) -> None:
            nonlocal cancelled
            if event[1] == "run_started" and not cancelled:
                cancelled = True
                assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200

        events, _ = read_events(lines, cancel_on_start)
    names = [n for _, n, _ in events]
    assert names[-1] == "job_finished" and events[-1][2]["status"] == "cancelled"
    finished = {d["run_id"]: d for _, n, d in events if n == "run_finished"}
    assert len(finished) == 2 and all(d["status"] == "cancelled" for d in finished.values())
    assert any(d["attempt"] == 0 and "before it started" in (d["error"] or "") for d in finished.values())
    assert names.count("run_started") == 1  # the run that never started has no run_started
