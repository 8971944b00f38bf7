"""Database engine and session factory for one process, and the thread budget that keeps request threads and
pooled connections sized together."""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

# Connections per process. Read from the environment (not from a Settings object) because the engine is
# shared by every Settings of one database URL; app.config documents NORMBENCH_DB_POOL_SIZE.
DEFAULT_POOL_SIZE = 12
DEFAULT_POLL_THREADS = 4  # NORMBENCH_POLL_THREADS: the hot read paths' own threads and connections
# Seconds a thread waits for a pooled connection before the request is answered 503 (app.errors). With the
# thread limits below a thread never waits on the pool; this bounds the case where it does anyway.
POOL_TIMEOUT = 5.0


def pool_size_from_env() -> int:
    return max(2, int(os.environ.get("NORMBENCH_DB_POOL_SIZE", DEFAULT_POOL_SIZE)))


def make_engine(url: str, pool_size: int | None = None) -> Engine:
    # A fixed-size pool (no overflow): the thread limits of `size_thread_pools` are derived from it.
    size = pool_size or pool_size_from_env()
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=size,
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Fail fast when Postgres is unreachable: the API answers 503 instead of hanging.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        connect_args={"connect_timeout": 3},
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


@lru_cache(maxsize=8)
def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url), expire_on_commit=False)


def poll_threads_from_env() -> int:
    return max(1, int(os.environ.get("NORMBENCH_POLL_THREADS", DEFAULT_POLL_THREADS)))


@lru_cache(maxsize=8)
def read_session_factory(url: str) -> sessionmaker[Session]:
    """Sessions for the hot read-only paths (status polls, event polls, key look-ups): a small pool of their
    own, one connection per poll thread, so a burst of other requests cannot take their connections. In
    autocommit: a read is its statements alone, with no BEGIN and ROLLBACK round trips; and no pre-ping round
    trip either: `read_with_retry` retries once on a connection that turns out dead instead. Never write with it."""
    size = poll_threads_from_env()
    if url.startswith("sqlite"):
        engine = make_engine(url, pool_size=size)
    else:
        engine = create_engine(
            url, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT, connect_args={"connect_timeout": 3}
        )
    return sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def read_with_retry(url: str, read: Callable[[Session], T]) -> T:
    """`read(session)` on a read session; once more on a fresh connection if the pooled one had gone away (a
    database restart): reads are idempotent, and the failed connection invalidated the pool's stale ones."""
    for attempt in range(2):
        try:
            with read_session_factory(url)() as session:
                return read(session)
        except DBAPIError as e:
            if attempt or not e.connection_invalidated:
                raise
    raise AssertionError("unreachable")


def pool_capacity(factory: sessionmaker[Session]) -> int:
    """How many connections the engine behind `factory` can hand out at once."""
    pool = factory.kw["bind"].pool
    size = pool.size() if hasattr(pool, "size") else DEFAULT_POOL_SIZE
    return int(size) + max(0, int(getattr(pool, "_max_overflow", 0)))


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# ------------------------------------------------------------------------------------------ thread budget
#
# Every blocking database call of a request runs in a thread, and every such thread needs a pooled
# connection. So threads are capped by connections: FastAPI's default thread pool (every sync endpoint) gets
# one thread per connection of the main pool, the hot read paths (status polls, event polls) one per
# connection of the read pool. A request beyond those waits in the event loop, holding neither a thread nor
# a connection, and a poll that cannot get a thread within `db_wait_seconds` is answered 503 + Retry-After.


class DatabaseBusy(Exception):
    """No database thread came free in time; the handler in app.errors answers 503 with Retry-After."""


class _Waiter:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class _PollThreads:
    """Fair admission to the poll threads: waiters queue per key (the API key, or the local owner) and a
    freed thread goes to the keys in turn, so one key's backlog cannot delay another key's request by more
    than one read per thread. Behind it a thread limiter of the same size, which itself never makes anyone
    wait. Event-loop code only: no locks."""

    def __init__(self, threads: int, wait_seconds: float) -> None:
        self.free = threads
        self.queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.limiter = anyio.CapacityLimiter(threads)
        self.wait_seconds = wait_seconds

    async def acquire(self, key: str) -> None:
        if self.free > 0 and not self.queues:
            self.free -= 1
            return
        waiter = _Waiter()
        self.queues.setdefault(key, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:  # timed out or cancelled: leave the queue, or pass on a thread just granted
            if waiter.granted:
                self.release()
            else:
                queue = self.queues.get(key)
                if queue is not None:
                    queue.remove(waiter)
                    if not queue:
                        del self.queues[key]
            raise

    def release(self) -> None:
        if not self.queues:
            self.free += 1
            return
        key, queue = next(iter(self.queues.items()))
        waiter = queue.popleft()
        if queue:
            self.queues.move_to_end(key)  # this key has had its turn
        else:
            del self.queues[key]
        waiter.granted = True
        waiter.event.set()


_poll_threads: RunVar[_PollThreads] = RunVar("normbench_poll_threads")


def size_thread_pools(database_url: str, wait_seconds: float) -> tuple[int, int]:
    """Call once in the event loop (the lifespan): FastAPI's thread pool gets one thread per connection of the
    main pool, the hot read paths one per connection of theirs. Returns (endpoint threads, poll threads)."""
    endpoints = pool_capacity(session_factory(database_url))
    polls = pool_capacity(read_session_factory(database_url))
    anyio.to_thread.current_default_thread_limiter().total_tokens = endpoints
    _poll_threads.set(_PollThreads(polls, wait_seconds))
    return endpoints, polls


async def run_in_db_thread(fn: Callable[[], T], key: str = "") -> T:
    """Run a short blocking database read on one of the poll threads, taking turns with other keys; DatabaseBusy
    if no thread frees up in time."""
    try:
        threads = _poll_threads.get()
    except LookupError:  # an app driven without its lifespan (some unit tests): a small default
        threads = _PollThreads(4, 10.0)
        _poll_threads.set(threads)
    with anyio.move_on_after(threads.wait_seconds):
        await threads.acquire(key)
        try:
            # Shielded: a thread that started runs to the end, so its connection is always returned.
            with anyio.CancelScope(shield=True):
                return await anyio.to_thread.run_sync(fn, limiter=threads.limiter)
        finally:
            threads.release()
    raise DatabaseBusy
