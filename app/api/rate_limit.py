"""Per-key admission for /v1: a token bucket (rate) and a cap on requests in flight (concurrency), both
answered with 429 + Retry-After in the event loop, before any thread or database work.

The key is the API key's public prefix read from the `Authorization` header (no look-up: an unknown key
still gets its 401 from the route, but only at its bucket's pace), the one local owner when keys are off,
and the client address for requests without a well-formed key. Limits hold per API process.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

LIMITED_PREFIX = "/v1/"
SCOPE_KEY = "normbench.client_key"
MAX_TRACKED_KEYS = 10_000  # least recently seen keys beyond this are forgotten (a full bucket is the default)
_TOKEN_RE = re.compile(rb"^bearer\s+nb_([0-9a-f]{12})_[0-9a-f]{64}\s*$", re.IGNORECASE)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


class KeyLimits:
    """Token buckets and in-flight counts per key (plain dict work on the event loop: no locks needed)."""

    def __init__(self, rate: float, burst: int, in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_in_flight = in_flight
        self.clock = clock
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(tokens=self.burst, updated=now)
            if len(self.buckets) > MAX_TRACKED_KEYS:
                self._forget_one()
        else:
            self.buckets.move_to_end(key)
        return bucket

    def _forget_one(self) -> None:
        for key, bucket in self.buckets.items():
            if bucket.in_flight == 0:
                del self.buckets[key]
                return

    def admit(self, key: str) -> float | None:
        """None when the request may go ahead (the caller must then `release`), else seconds to wait."""
        now = self.clock()
        bucket = self._bucket(key, now)
        if self.rate > 0:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1.0:
                return (1.0 - bucket.tokens) / self.rate
        if bucket.in_flight >= self.max_in_flight:
            return 1.0
        if self.rate > 0:
            bucket.tokens -= 1.0
        bucket.in_flight += 1
        return None

    def release(self, key: str) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1


def client_key(request: Request) -> str:
    """The key this request was admitted under ("" for a request that did not pass the middleware)."""
    return str(request.scope.get(SCOPE_KEY, ""))


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.limits = KeyLimits(
            settings.rate_limit_per_second, settings.rate_limit_burst, settings.rate_limit_in_flight
        )

    def _key(self, scope: Scope) -> str:
        if not self.settings.require_api_keys:
            return f"owner:{self.settings.default_owner}"
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                match = _TOKEN_RE.match(value)
                if match:
                    return f"key:{match.group(1).decode()}"
                break
        client = scope.get("client")
        return f"addr:{client[0] if client else '?'}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(LIMITED_PREFIX):
            await self.app(scope, receive, send)
            return
        key = self._key(scope)
        scope[SCOPE_KEY] = key  # the poll threads take turns by it (app.db.run_in_db_thread)
        wait = self.limits.admit(key)
        if wait is not None:
            await _too_many(send, wait)
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.limits.release(key)

        async def send_and_release(message: Message) -> None:
            # A response that has started no longer holds a place: an event stream stays open for minutes
            # without a thread or a connection, so it does not count against the in-flight cap.
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()


async def _too_many(send: Send, wait: float) -> None:
    retry_after = max(1, math.ceil(wait))
    body = json.dumps(
        {
            "error": "rate_limited",
            "detail": f"too many requests for this API key; retry after {retry_after} s "
            "(limits: NORMBENCH_RATE_LIMIT_PER_SECOND, NORMBENCH_RATE_LIMIT_BURST, NORMBENCH_RATE_LIMIT_IN_FLIGHT)",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
