"""Raw ASGI middlewares that guard every request before FastAPI sees it: the body-size cap and the
loopback-only rule of keys-off mode."""

from __future__ import annotations

import ipaddress
import json

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings, is_loopback
from app.core.units import human_bytes

UPLOAD_PATH = "/v1/datasets"
MULTIPART_SLACK = 64 * 1024  # multipart boundaries, part headers and the two short form fields


class _BodyTooLarge(Exception):
    pass


async def _send_error(send: Send, status: int, kind: str, detail: str) -> None:
    body = json.dumps({"error": kind, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the client may still be sending: tell it to stop
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Caps every request body while it is being received, before anything is spooled or parsed.

    A dataset upload may carry `max_upload_bytes` (plus multipart framing); any other request
    `max_request_bytes`. An honest Content-Length over the cap is answered 413 without reading a
    byte; a body without one (chunked) or one that lies is cut off with 413 as soon as the running
    count passes the cap. The upload's partial temporary file is closed (and so removed) by the form
    parser when the read fails.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> tuple[int, str]:
        if scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH:
            cap = self.settings.max_upload_bytes
            return (
                cap + MULTIPART_SLACK,
                f"the upload is over the limit of {human_bytes(cap)} (NORMBENCH_MAX_UPLOAD_BYTES)",
            )
        cap = self.settings.max_request_bytes
        return cap, f"the request body is over the limit of {human_bytes(cap)} (NORMBENCH_MAX_REQUEST_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, detail = self._limit(scope)
        detail += "; upload a smaller file or a subset of the data"
        length = _content_length(scope)
        if length is not None and length > limit:
            await _send_error(send, 413, "payload_too_large", detail)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # whatever the app made of the aborted read, the answer is our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (exceeded and not started):
                raise
        if exceeded and not started:
            await _send_error(send, 413, "payload_too_large", detail)


class LoopbackOnlyWithoutKeys:
    """Defence in depth for keys-off mode: refuse a request that arrived on a non-loopback address.

    The start-up check (`check_bind_safety`) needs to know the bind address; this catches a server
    started some other way (e.g. gunicorn -b 0.0.0.0). Servers that do not report an IP address
    (the test client, Unix sockets) are not judged.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if (
            scope["type"] == "http"
            and not self.settings.require_api_keys
            and server
            and _is_ip(str(server[0]))
            and not is_loopback(str(server[0]))
        ):
            await _send_error(
                send,
                403,
                "forbidden",
                "this server runs without API keys (NORMBENCH_REQUIRE_API_KEYS=false), so it answers only on "
                "loopback; set NORMBENCH_REQUIRE_API_KEYS=true to serve other addresses",
            )
            return
        await self.app(scope, receive, send)


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the guards; call after everything else is set up."""
    # Added last = outermost: the body cap applies before any other middleware or route sees the body.
    app.add_middleware(LoopbackOnlyWithoutKeys, settings=settings)
    app.add_middleware(BodyLimitMiddleware, settings=settings)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
