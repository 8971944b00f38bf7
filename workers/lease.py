"""The leases of the runs a worker trains: one heartbeat thread renews them all, and each run reads its
own `Lease` to learn that it was cancelled, taken over, or can no longer reach the database."""

from __future__ import annotations

import threading
import time

from app.config import Settings
from app.db import session_scope
from app.repositories.runs import Claim, renew_leases


class LeaseLost(RuntimeError):
    """The lease could not be renewed for longer than it lasts: another worker may take the run."""


class Heartbeat(threading.Thread):
    """Renews the leases of the runs this worker trains (one run, or a pack) every few seconds, in one
    statement, and picks up cancellation and lost claims on the way."""

    def __init__(self, settings: Settings, claims: list[Claim]) -> None:
        super().__init__(name=f"heartbeat-{claims[0].run_id}", daemon=True)
        self.settings, self.claims = settings, list(claims)
        self.done = threading.Event()
        self.cancelled: set[str] = set()
        self.superseded: set[str] = set()
        self.finished: set[str] = set()  # settled runs: their leases are no longer renewed
        self.unreachable = False
        self.last_ok = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.settings.heartbeat_seconds):
            live = [
                (c.run_id, c.attempt)
                for c in self.claims
                if c.run_id not in self.superseded and c.run_id not in self.finished
            ]
            if not live:
                return
            try:
                with session_scope(self.settings.resolved_database_url) as s:
                    states = renew_leases(s, live, self.settings.lease_seconds)
            except Exception:
                # Keep trying until the lease would have run out; after that another worker may own the run.
                if time.monotonic() - self.last_ok > self.settings.lease_seconds:
                    self.unreachable = True
                continue
            self.last_ok = time.monotonic()
            for run_id, cancel in states.items():
                if cancel is None:
                    if run_id not in self.finished:
                        self.superseded.add(run_id)
                elif cancel:
                    self.cancelled.add(run_id)

    def lease(self, run_id: str) -> Lease:
        return Lease(self, run_id)


class Lease:
    """One run's view of the shared heartbeat."""

    def __init__(self, heartbeat: Heartbeat, run_id: str) -> None:
        self.heartbeat, self.run_id = heartbeat, run_id

    @property
    def superseded(self) -> bool:
        return self.run_id in self.heartbeat.superseded

    @property
    def cancelled(self) -> bool:
        return self.run_id in self.heartbeat.cancelled

    @property
    def unreachable(self) -> bool:
        return self.heartbeat.unreachable
