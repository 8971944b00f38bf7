"""Live progress of a job as Server-Sent Events, derived by polling the database.

Postgres is the only source. One poller per job and process, shared by all of the job's open streams,
reads the job's runs (and the per-epoch metric points of runs that moved) every `POLL_SECONDS` in one short
read session, and its tracker turns what changed since the last look into events:

    run_started   a run was claimed by a worker (again, with a higher `attempt`, after a retry)
    epoch_done    a run recorded an epoch's val_acc / val_loss / train_loss
    run_finished  a run reached a terminal state
    job_finished  every run is terminal; the stream then ends

The poller keeps the events in the order found; a stream starts from the beginning of that log (the job's
history: a poller's first poll gives, for each run in order, run_started, its epochs, run_finished), so a
client that connects late, or reconnects, sees the whole picture; event ids count the events of one
connection. Between polls no stream holds a thread or a database connection. The tracker is plain
synchronous code, so tests and the route share it; `event_stream` wraps it for the ASGI server.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.lowlevel import RunVar
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.run_states import TERMINAL, RunStatus
from app.db import read_with_retry, run_in_db_thread
from app.repositories.runs import ordered_runs
from app.schemas.events import EpochDone, JobFinished, RunFinished, RunStarted
from app.schemas.runs import run_key
from app.services.jobs import job_state
from app.services.results import finite_or_none
from app.tables import Job, MetricPoint, Run

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
RETRY_MS = 2000  # the reconnection delay an EventSource client is told to use
EPOCH_METRICS = ("val_acc", "val_loss", "train_loss")


@dataclass(frozen=True)
class Event:
    name: str
    data: BaseModel


@dataclass
class _Seen:
    attempt: int = 0  # attempt of the last run_started sent
    epoch: int = 0  # last epoch_done sent
    finished: bool = False  # run_finished sent


class JobEventTracker:
    """What one stream has told its client so far, and the events that bring it up to date.

    Per run it keeps the attempt last announced, the last epoch sent and whether the run's end was
    sent. An epoch is sent once per run: a retried attempt that redoes an epoch from its checkpoint
    does not repeat it. A run cancelled before it ever started gets only `run_finished`.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.seen: dict[str, _Seen] = {}
        self.done = False

    def poll(self, session: Session) -> list[Event]:
        job = session.get(Job, self.job_id)
        if job is None:  # gone (its owner's data was removed): nothing more will happen
            self.done = True
            return []
        epochs_total = int(job.budget.get("epochs", 0))
        # Runs first, points after: progress and points are committed together, so points read later
        # include at least every epoch the run rows report (and all of them for a terminal run).
        runs = list(session.scalars(ordered_runs(job.id)))
        epochs = self._new_epochs(session, runs)
        events: list[Event] = []
        for run in runs:
            seen = self.seen.setdefault(run.id, _Seen())
            if seen.finished:
                continue
            terminal = run.status in TERMINAL
            if run.attempt > seen.attempt and (run.status == RunStatus.RUNNING or terminal):
                seen.attempt = run.attempt
                events.append(Event("run_started", self._started(run, epochs_total)))
            if seen.attempt > 0:
                for epoch, metrics in sorted(epochs.get(run.id, {}).items()):
                    if epoch > seen.epoch:
                        seen.epoch = epoch
                        events.append(Event("epoch_done", self._epoch(run, epoch, epochs_total, metrics)))
            if terminal:
                seen.finished = True
                events.append(Event("run_finished", self._finished(run)))
        if all(self.seen[r.id].finished for r in runs):
            state = job_state(session, job)
            events.append(
                Event(
                    "job_finished",
                    JobFinished(
                        job_id=job.id,
                        status=state.status,
                        runs_total=state.runs_total,
                        runs_finished=state.runs_finished,
                        counts=state.counts,
                    ),
                )
            )
            self.done = True
        return events

    def _new_epochs(self, session: Session, runs: list[Run]) -> dict[str, dict[int, dict[str, float | None]]]:
        """Per-epoch metrics of the runs that may have epochs this stream has not sent."""
        wanted = []
        for run in runs:
            seen = self.seen.get(run.id) or _Seen()
            if not seen.finished and run.attempt > 0 and (run.status in TERMINAL or run.epochs_done > seen.epoch):
                wanted.append(run.id)
        out: dict[str, dict[int, dict[str, float | None]]] = defaultdict(dict)
        if not wanted:
            return out
        since = min((self.seen[r].epoch if r in self.seen else 0) for r in wanted)
        stmt = select(MetricPoint.run_id, MetricPoint.epoch, MetricPoint.name, MetricPoint.value).where(
            MetricPoint.run_id.in_(wanted), MetricPoint.name.in_(EPOCH_METRICS), MetricPoint.epoch > since
        )
        for run_id, epoch, name, value in session.execute(stmt):
            if epoch != int(epoch):
                continue
            out[run_id].setdefault(int(epoch), dict.fromkeys(EPOCH_METRICS))[name] = finite_or_none(value)
        return out

    @staticmethod
    def _started(run: Run, epochs_total: int) -> RunStarted:
        return RunStarted(
            **run_key(run),
            attempt=run.attempt,
            epochs_total=epochs_total,
        )

    @staticmethod
    def _epoch(run: Run, epoch: int, epochs_total: int, metrics: dict[str, float | None]) -> EpochDone:
        return EpochDone(
            **run_key(run),
            epoch=epoch,
            epochs_total=epochs_total,
            val_acc=metrics.get("val_acc"),
            val_loss=metrics.get("val_loss"),
            train_loss=metrics.get("train_loss"),
        )

    @staticmethod
    def _finished(run: Run) -> RunFinished:
        final = run.final_metrics or {}
        return RunFinished(
            **run_key(run),
            status=run.status,
            attempt=run.attempt,
            val_acc=finite_or_none(final.get("val_acc")),
            val_loss=finite_or_none(final.get("val_loss")),
            train_loss=finite_or_none(final.get("train_loss")),
            steps=run.steps_done,
            wall_time_s=finite_or_none(run.wall_time_s),
            error=run.error,
        )


def poll_once(tracker: JobEventTracker, database_url: str) -> list[Event]:
    """One poll in its own short read session (run in a poll thread: the driver blocks)."""
    return read_with_retry(database_url, tracker.poll)


def format_event(event_id: int, event: Event) -> str:
    return _format(event_id, event.name, _data_json(event))


def _data_json(event: Event) -> str:
    return json.dumps(event.data.model_dump(mode="json"), separators=(",", ":"), allow_nan=False)


def _format(event_id: int, name: str, data: str) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n"


class JobPoller:
    """The one poller of a job in this process, shared by all of the job's open streams.

    It keeps the job's events, in the order they were found, as an append-only log; each stream sends the
    log from its start (the job's history) and then whatever is appended. Polls happen only while streams are
    waiting, one at a time, at most one per poll interval, each in a poll thread with a connection of the
    read pool for the length of the poll; between polls no stream holds a thread or a connection. The stream
    that finds a poll due runs it; the others wait for its result.
    """

    def __init__(self, database_url: str, job_id: str) -> None:
        self.database_url = database_url
        self.tracker = JobEventTracker(job_id)
        self.log: list[tuple[str, str]] = []  # (event name, data JSON)
        self.started = 0  # polls begun
        self.finished = 0  # polls ended (with or without success)
        self.polling = False
        self.last_start = -math.inf
        self.subscribers = 0
        self._changed = anyio.Event()

    @property
    def done(self) -> bool:
        return self.tracker.done

    async def wait_for_news(self, poll_every: float, max_wait: float) -> None:
        """Return after the next poll ends (running it here when it is due and nobody else is) or `max_wait`."""
        now = time.monotonic()
        if not self.polling and not self.done and now - self.last_start >= poll_every:
            await self._poll()
            return
        changed = self._changed
        wait = max_wait if self.polling else min(max_wait, self.last_start + poll_every - now)
        with anyio.move_on_after(max(0.0, wait)):
            await changed.wait()

    async def _poll(self) -> None:
        self.polling = True
        self.started += 1
        self.last_start = time.monotonic()
        try:
            # Shielded: once begun, a poll's events reach the log even if the stream that runs it goes away.
            with anyio.CancelScope(shield=True):
                poll = partial(poll_once, self.tracker, self.database_url)
                events = await run_in_db_thread(poll, key=f"events:{self.tracker.job_id}")
                self.log.extend((e.name, _data_json(e)) for e in events)
        except Exception:
            # The database is down or busy: every stream keeps its connection (heartbeats) and the next poll
            # tries again; nothing the tracker had not sent is lost (it only marks what it returned).
            log.warning("polling job %s for events failed", self.tracker.job_id, exc_info=True)
        finally:
            self.polling = False
            self.finished += 1
            self._changed.set()
            self._changed = anyio.Event()


# Per event loop: a poller's anyio.Event belongs to the loop it was made in.
_pollers: RunVar[dict[tuple[str, str], JobPoller]] = RunVar("normbench_job_pollers")


def _registry() -> dict[tuple[str, str], JobPoller]:
    try:
        return _pollers.get()
    except LookupError:
        registry: dict[tuple[str, str], JobPoller] = {}
        _pollers.set(registry)
        return registry


def active_pollers() -> int:
    """Pollers alive in this event loop (for tests)."""
    return len(_registry())


async def event_stream(
    database_url: str,
    job_id: str,
    is_disconnected: Callable[[], Awaitable[bool]],
    *,
    follow: bool = True,
    poll_seconds: float | None = None,
    heartbeat_seconds: float | None = None,
) -> AsyncIterator[str]:
    """The `text/event-stream` body: history, then changes as the job's shared poller finds them, until the
    job finishes, the client goes away, or (with `follow=False`) after a poll that began once it had joined."""
    poll_every = POLL_SECONDS if poll_seconds is None else poll_seconds
    heartbeat_every = HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds
    registry = _registry()
    key = (database_url, job_id)
    poller = registry.get(key)
    if poller is None:
        poller = registry[key] = JobPoller(database_url, job_id)
    poller.subscribers += 1
    # Only a poll that begins after this point can vouch for "nothing more has happened" (snapshot, end).
    joined = poller.started
    sent = 0
    try:
        yield f"retry: {RETRY_MS}\n: events of job {job_id}\n\n"
        last_write = time.monotonic()
        while True:
            if sent < len(poller.log):
                chunk = "".join(_format(i + 1, *poller.log[i]) for i in range(sent, len(poller.log)))
                sent = len(poller.log)
                yield chunk
                last_write = time.monotonic()
            # A finished job's log is complete; a snapshot needs a poll that began after it joined.
            if poller.done or (not follow and poller.finished > joined):
                if sent == len(poller.log):
                    return
                continue
            if await is_disconnected():
                return
            if time.monotonic() - last_write >= heartbeat_every:
                yield ": heartbeat\n\n"
                last_write = time.monotonic()
            await poller.wait_for_news(poll_every, max(0.01, heartbeat_every - (time.monotonic() - last_write)))
    finally:
        poller.subscribers -= 1
        if poller.subscribers == 0 and registry.get(key) is poller:
            del registry[key]
