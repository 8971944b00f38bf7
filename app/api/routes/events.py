"""Live progress of a job: `GET /v1/jobs/{id}/events` as Server-Sent Events."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import BearerDep, SettingsDep, resolve_owner
from app.api.rate_limit import client_key
from app.db import read_with_retry, run_in_db_thread
from app.schemas.common import ERROR_RESPONSES, ErrorBody
from app.schemas.events import describe_events
from app.services import events
from app.services import jobs as service

router = APIRouter(prefix="/v1/jobs", tags=["events"])

EVENT_STREAM_MEDIA_TYPE = "text/event-stream"

DESCRIPTION = f"""Server-Sent Events (`text/event-stream`) with the progress of a job, read from the database every
{events.POLL_SECONDS:g} s (once per job for all of its open streams). Each event has an `id:` (1, 2, 3... within the connection), an `event:` name and a
one-line JSON `data:`. Accuracies are fractions 0..1; values that are not finite are `null`.

{describe_events()}

Order: a run's `run_started` comes before its `epoch_done` events (epochs ascending), which come before its
`run_finished`; `job_finished` is the last event, after every `run_finished`, and the server then closes the
stream. A stream starts with the job's history so far (the events in the order the server found them; for a
job that already finished and has no other open stream: per run in order `run_started`, its epochs,
`run_finished`), then `job_finished` if the job has finished, then the end of the stream.

Reconnecting: every stream starts from the job's history, so a client that reconnects (an `EventSource`
does so by itself after `retry:` {events.RETRY_MS} ms) receives the history again rather than resuming after its
`Last-Event-ID`, which is ignored; the events are idempotent facts keyed by `run_id` (and `epoch`, `attempt`),
so a client can drop the ones it has seen. A browser should `close()` its `EventSource` on `job_finished`, or
it reconnects and receives the history again. While nothing changes the server sends a comment line
(`: heartbeat`) every {events.HEARTBEAT_SECONDS:g} s so proxies keep the connection open. It stops polling as
soon as the client disconnects."""

STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The event stream (see the operation's description for the events and their fields).",
        "content": {
            EVENT_STREAM_MEDIA_TYPE: {
                "schema": {"type": "string"},
                "example": 'id: 1\nevent: run_started\ndata: {"run_id":"…","variant":"bn","batch_size":8,'
                '"seed":0,"attempt":1,"epochs_total":3}\n\n',
            }
        },
    },
    401: {"model": ErrorBody, "description": "Missing, malformed, unknown or revoked API key."},
    **ERROR_RESPONSES,
}


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=STREAM_RESPONSES,
    summary="Live progress of a job as Server-Sent Events",
    description=DESCRIPTION,
)
async def job_events(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    credentials: BearerDep,
    follow: Annotated[
        bool,
        Query(
            description="`true` (default): stream until the job finishes. `false`: send what has happened so far "
            "(and `job_finished` if the job has finished), then close — a snapshot for scripts."
        ),
    ] = True,
) -> StreamingResponse:
    # async: the key and ownership check takes a poll thread for one short read; the stream itself then holds
    # no thread and no connection (its job's shared poller reads for every stream of the job).
    def check(session: Session) -> str:
        return service.get_job(session, resolve_owner(settings, session, credentials), job_id).id

    job = await run_in_db_thread(partial(read_with_retry, settings.resolved_database_url, check), client_key(request))
    return StreamingResponse(
        events.event_stream(settings.resolved_database_url, job, request.is_disconnected, follow=follow),
        media_type=EVENT_STREAM_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
