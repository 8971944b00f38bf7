"""Raw ASGI middlewares that guard every request before FastAPI sees it: the body-size cap, the
loopback-only rule of keys-off mode, and its guards against browsers (Host allow-list, cross-site writes)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.bind_check import BindVerdict, is_ip
from app.api.rate_limit import RateLimitMiddleware
from app.config import Settings, is_loopback
from app.core.units import human_bytes
from app.errors import DATABASE_DOWN_HEADER

UPLOAD_PATH = "/v1/datasets"
WEIGHTS_PATH = "/v1/weights"
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

    A dataset upload may carry `max_upload_bytes` (plus multipart framing), a weights upload
    `max_weights_bytes`; any other request
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
        if scope["method"] == "POST" and scope["path"].rstrip("/") == WEIGHTS_PATH:
            cap = self.settings.max_weights_bytes
            return (
                cap + MULTIPART_SLACK,
                f"the weights file is over the limit of {human_bytes(cap)} (NORMBENCH_MAX_WEIGHTS_BYTES)",
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
        if scope["type"] == "http" and not self.settings.require_api_keys and server and is_ip(str(server[0])):
            if not is_loopback(str(server[0])):
                await _send_error(
                    send,
                    403,
                    "forbidden",
                    "this server runs without API keys (NORMBENCH_REQUIRE_API_KEYS=false), so it answers only on "
                    "loopback; set NORMBENCH_REQUIRE_API_KEYS=true to serve other addresses",
                )
                return
            # Arrived on loopback, but the socket may be bound to all interfaces (0.0.0.0): judge what is bound.
            unsafe = _bind_verdict(scope).judge(self.settings)
            if unsafe:
                await _send_error(send, 403, "forbidden", unsafe)
                return
        await self.app(scope, receive, send)


def _bind_verdict(scope: Scope) -> BindVerdict:
    """The app's verdict on its listening sockets (made at start-up; made here for an app run without one)."""
    state = scope["app"].state
    if getattr(state, "bind_verdict", None) is None:
        state.bind_verdict = BindVerdict()
    return state.bind_verdict  # type: ignore[no-any-return]


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class BrowserGuard:
    """Keys off, every request acts as the one owner, so a browser is the attack path: a page elsewhere can
    make the user's browser send requests to 127.0.0.1. Two checks stop it.

    - DNS rebinding: a page on `evil.example` whose name is re-pointed at 127.0.0.1 sends `Host: evil.example`.
      Only the names in NORMBENCH_ALLOWED_HOSTS are answered (default with keys off: loopback names); others
      get 400. With keys on the check applies only when NORMBENCH_ALLOWED_HOSTS is set. A server that reports
      no IP address (the in-process test client, a Unix socket) is judged only against an explicit list.
    - Cross-site writes (CSRF): a POST/PUT/PATCH/DELETE whose `Origin` is neither the API's own (the `Host`
      it was sent to) nor in NORMBENCH_ALLOWED_ORIGINS, or that has no `Origin` but a `Sec-Fetch-Site` of
      `cross-site`/`same-site`, gets 403. Clients that send neither (curl, the CLI, scripts) pass. With keys
      on nothing is ambient (a browser never attaches the bearer key by itself), so this check is off.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host")
        if host is not None and self._judges_host(scope) and not self._host_allowed(host):
            await _send_error(
                send,
                400,
                "bad_host",
                f"this server does not answer to the host name {host[:100]!r} (a guard against DNS rebinding); "
                "use http://127.0.0.1:PORT or http://localhost:PORT, or add the name to NORMBENCH_ALLOWED_HOSTS",
            )
            return
        if not self.settings.require_api_keys and scope["method"] not in SAFE_METHODS:
            refusal = self._cross_site(headers)
            if refusal:
                await _send_error(send, 403, "cross_site_request", refusal)
                return
        await self.app(scope, receive, send)

    def _judges_host(self, scope: Scope) -> bool:
        if self.settings.allowed_hosts is not None:
            return True
        server = scope.get("server")
        return not self.settings.require_api_keys and server is not None and is_ip(str(server[0]))

    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        if self.settings.allowed_hosts is None:
            return self.settings.require_api_keys or is_loopback(name)
        for entry in map(_host_name, self.settings.allowed_hosts):
            if entry in ("*", name) or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:])):
                return True
        return False

    def _cross_site(self, headers: dict[str, str]) -> str | None:
        origin = headers.get("origin")
        fix = (
            "send it from the NormBench page itself, from a tool that sends no Origin (curl, the CLI), or add the "
            "page's origin to NORMBENCH_ALLOWED_ORIGINS"
        )
        if origin is not None:
            if self._origin_allowed(origin, headers.get("host")):
                return None
            return f"a request that changes data came from another site (Origin {origin[:100]!r}); {fix}"
        site = headers.get("sec-fetch-site", "").lower()
        if site in ("cross-site", "same-site"):
            return f"a request that changes data came from another site (Sec-Fetch-Site: {site}); {fix}"
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        normal = _origin_key(origin)
        if normal is None:
            return False  # `null` (sandboxed frames, file:// pages) or malformed
        if any(_origin_key(o) == normal for o in self.settings.allowed_origins):
            return True
        if host is None:
            return False
        own = _origin_key(f"{normal[0]}://{host}")
        return own is not None and own[1:] == normal[1:]  # the API's own host and port (scheme may differ behind TLS)


def _host_name(host: str) -> str:
    """`Host` header value → lower-case name without port or brackets: `[::1]:8000` → `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None for `null` or a malformed origin."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or DEFAULT_PORTS.get(parts.scheme, 0)


class DatabaseOutageWait:
    """GET and HEAD requests answered "the database is unreachable" (app.errors) are run again every half second
    for up to `db_outage_wait_seconds` before that 503 goes out, so a database restart is a slower answer rather
    than an error. The wait is in the event loop: it holds no thread and no connection. Only reads are repeated
    (they change nothing); inside the rate limit, so a request spends one token however often it is tried."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.wait = app, settings.db_outage_wait_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reads = scope["method"] in ("GET", "HEAD")
        deadline = anyio.current_time() + (self.wait if reads else 0)
        while True:
            attempt = _OutageHold(send)
            await self.app(scope, receive, attempt.send)
            if not attempt.held:
                return
            if anyio.current_time() + RETRY_PAUSE > deadline:
                await attempt.release()
                return
            await anyio.sleep(RETRY_PAUSE)


RETRY_PAUSE = 0.5  # seconds between attempts of a read that found the database unreachable
_MARKER = DATABASE_DOWN_HEADER.encode()


class _OutageHold:
    """One attempt's messages: passed on, unless it is a "database unreachable" 503, which is held back."""

    def __init__(self, send: Send) -> None:
        self.downstream = send
        self.held: list[Message] = []

    async def send(self, message: Message) -> None:
        start = message["type"] == "http.response.start"
        if self.held or (start and message["status"] == 503 and any(k == _MARKER for k, _ in message["headers"])):
            self.held.append(message)
        else:
            await self.downstream(message)

    async def release(self) -> None:
        """Send the held 503, without the internal marker."""
        first, *rest = self.held
        await self.downstream({**first, "headers": [(k, v) for k, v in first["headers"] if k != _MARKER]})
        for message in rest:
            await self.downstream(message)


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the guards; call after everything else is set up."""
    app.add_middleware(DatabaseOutageWait, settings=settings)  # inside the rate limit: one token per request
    # Added last = outermost: the body cap applies before any other middleware or route sees the body.
    app.add_middleware(RateLimitMiddleware, settings=settings)  # innermost: refused requests spend no tokens
    app.add_middleware(BrowserGuard, settings=settings)
    app.add_middleware(LoopbackOnlyWithoutKeys, settings=settings)
    app.add_middleware(BodyLimitMiddleware, settings=settings)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
