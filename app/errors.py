"""Domain errors and the handlers that turn every error into `{"error", "detail"}` JSON."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class DomainError(Exception):
    status_code = 400
    kind = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    status_code = 404
    kind = "not_found"


class InvalidSpec(DomainError):
    status_code = 422
    kind = "invalid_spec"


class InvalidDataset(DomainError):
    status_code = 422
    kind = "invalid_dataset"


class PayloadTooLarge(DomainError):
    status_code = 413
    kind = "payload_too_large"


class Conflict(DomainError):
    status_code = 409
    kind = "conflict"


class Unavailable(DomainError):
    status_code = 503
    kind = "unavailable"


def _body(kind: str, detail: str) -> dict[str, str]:
    return {"error": kind, "detail": detail}


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(_body(exc.kind, exc.detail), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_body("invalid_request", _format_validation(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
