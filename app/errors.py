"""Domain errors and the handlers that turn every error into `{"error", "detail"}` JSON."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import DatabaseBusy

BUSY_RETRY_AFTER = "2"  # seconds; a pool or thread wait that timed out clears within a poll or two
# Marks a 503 that says "the database is unreachable" for app.api.middleware.DatabaseOutageWait, which removes it.
DATABASE_DOWN_HEADER = "x-normbench-database-down"


class DomainError(Exception):
    """An error the caller can act on, answered as `{"error": kind, "detail"}` with the class's status.

    A subclass names its status (`class NotFound(DomainError, status=HTTPStatus.NOT_FOUND)`); its kind is its
    name in snake case unless it sets `kind` itself."""

    status_code = int(HTTPStatus.BAD_REQUEST)
    kind = "bad_request"
    headers: dict[str, str] | None = None

    def __init_subclass__(cls, status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = int(status)
        if "kind" not in cls.__dict__:
            cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if headers is not None:
            self.headers = headers


class NotFound(DomainError, status=HTTPStatus.NOT_FOUND):
    """The resource does not exist, or is not the caller's."""


class InvalidSpec(DomainError, status=HTTPStatus.UNPROCESSABLE_ENTITY):
    """The job spec breaks a rule (the detail says which and how to fix it)."""


class InvalidDataset(DomainError, status=HTTPStatus.UNPROCESSABLE_ENTITY):
    """The upload is not a dataset NormBench can read."""


class PayloadTooLarge(DomainError, status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
    """The request or upload is over a size limit."""


class Conflict(DomainError, status=HTTPStatus.CONFLICT):
    """The resource's state does not allow the change (for example, deleting a dataset a job uses)."""


class Unavailable(DomainError, status=HTTPStatus.SERVICE_UNAVAILABLE):
    """A service the request needs is down; retrying later can succeed."""


class Unauthorized(DomainError, status=HTTPStatus.UNAUTHORIZED):
    """No valid API key."""

    headers = {"WWW-Authenticate": "Bearer"}


class QuotaExceeded(DomainError, status=HTTPStatus.TOO_MANY_REQUESTS):
    """The owner's storage or rate quota is used up."""


def _body(kind: str, detail: str) -> dict[str, str]:
    return {"error": kind, "detail": detail}


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


class InvalidRequest(DomainError, status=HTTPStatus.UNPROCESSABLE_ENTITY):
    """The request cannot be stored or looked up as sent."""


# Database failures the services do not name themselves, each answered as the error beside it.
DATABASE_ERRORS: tuple[tuple[tuple[type[Exception], ...], DomainError], ...] = (
    # The database refused a value taken from the request (a NUL character, a string over a column's
    # length): the caller's input is at fault, and nothing was written (the session rolls back).
    (
        (DataError,),
        InvalidRequest(
            "a value in the request cannot be stored or looked up (it contains a NUL character or is too long); "
            "remove control characters and shorten it"
        ),
    ),
    # The safety net for a race the services do not name themselves (they lock, or turn it into a 409 with
    # their own words): a concurrent request deleted what this one refers to, or still uses what it deletes.
    (
        (IntegrityError,),
        Conflict(
            "the request conflicts with a change made at the same time (something it refers to was deleted, or "
            "something it deletes is in use); nothing was changed: reload and try again"
        ),
    ),
    (
        (OperationalError,),
        Unavailable(
            "the database is unreachable; retry in a few seconds (GET /readyz shows when it is back)",
            headers={"Retry-After": "5", DATABASE_DOWN_HEADER: "1"},
        ),
    ),
    # Every pooled connection (or every database thread) stayed busy for the whole wait: the server is
    # overloaded, not broken, so the answer is "try again shortly", never a 500.
    (
        (PoolTimeout, DatabaseBusy),
        Unavailable(
            "the server is busy (all database connections are in use); retry after the Retry-After seconds",
            headers={"Retry-After": BUSY_RETRY_AFTER},
        ),
    ),
)


def _answer(error: DomainError) -> JSONResponse:
    return JSONResponse(_body(error.kind, error.detail), status_code=error.status_code, headers=error.headers)


def _answer_with(error: DomainError) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_: Request, __: Exception) -> JSONResponse:
        return _answer(error)

    return handler


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return _answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_body("invalid_request", _format_validation(exc)), status_code=422)

    for types, error in DATABASE_ERRORS:
        for exc_type in types:
            app.add_exception_handler(exc_type, _answer_with(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # The framework could not parse the body (not UTF-8, malformed multipart, over the form limits):
            # a request validation failure like any other, so the same 422 every body-taking route documents.
            detail = f"{exc.detail}; send a UTF-8 JSON body, or for uploads a multipart form with one `file` field"
            return JSONResponse(_body("invalid_request", detail), status_code=422)
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
