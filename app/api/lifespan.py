"""What the API does when it starts: refuse an unsafe bind (configured, or already bound, and once the server
has bound its socket, the real one), then make sure the database is migrated and holds the built-in datasets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError, ProgrammingError

from app.api.bind_check import BindVerdict, check_sockets_at_start, watch_new_sockets
from app.config import Settings, check_bind_safety
from app.db import session_scope, size_thread_pools
from app.services.builtin import ensure_builtin_datasets
from app.storage import settings_storage

log = logging.getLogger(__name__)

# Fewer, larger young-generation collections while the API serves. At CPython's default (700, 10, 10) a flood of
# short-lived request objects sets off collections that stall the event loop for every client: bench/flood.py,
# the other owner's p99 under 1,300 clients was 125-160 ms at the default and 65-72 ms at these thresholds.
# Reference counting still frees almost everything at once; only cycles wait longer.
GC_THRESHOLDS = (100_000, 50, 1000)


def start_up(settings: Settings) -> BindVerdict:
    try:
        check_bind_safety(settings)
        verdict = check_sockets_at_start(settings)
    except RuntimeError as e:
        log.error("%s", e)
        raise
    try:
        with session_scope(settings.resolved_database_url) as session:
            ensure_builtin_datasets(session, settings_storage(settings))
    except (OperationalError, ProgrammingError) as e:
        raise RuntimeError(
            f"database at {settings.resolved_database_url!r} is not ready ({type(e).__name__}); "
            "run `alembic upgrade head` first"
        ) from e
    return verdict


def lifespan_for(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verdict = start_up(settings)
        app.state.bind_verdict = verdict  # read by LoopbackOnlyWithoutKeys on every request
        # Threads sized to the DB pool, so a request never holds a thread while waiting for a connection.
        size_thread_pools(settings.resolved_database_url, settings.db_wait_seconds)
        thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        watcher = asyncio.create_task(watch_new_sockets(settings, verdict))
        try:
            yield
        finally:
            gc.set_threshold(*thresholds)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    return lifespan
