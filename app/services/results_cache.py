"""Finished jobs' results and report pages, computed once per process and served from memory after that.

Only a job whose every run is terminal is cached: terminal runs never change (a stale attempt's writes are
no-ops), so neither do their numbers. The key holds the job's state as well as the request (run count, status
counts, last finish time), so a job that is retried or extended, and so changes, gets a new key and is
recomputed; a running job's numbers are always computed afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from app.services.jobs import JobState

MAX_BYTES = 64 * 2**20  # per process; least recently used entries go first


class TerminalCache:
    """Bytes by key, bounded in total size; safe to use from several request threads."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get_or_compute(self, key: tuple[Hashable, ...], state: JobState, compute: Callable[[], bytes]) -> bytes:
        if state.runs_total == 0 or state.runs_finished < state.runs_total:
            return compute()  # runs still queued or running: the numbers can change between two requests
        full_key = (*key, state.runs_total, state.finished_at, tuple(sorted(state.counts.items())))
        with self.lock:
            hit = self.entries.get(full_key)
            if hit is not None:
                self.entries.move_to_end(full_key)
                return hit
        value = compute()
        if len(value) <= self.max_bytes // 4:
            with self.lock:
                if full_key not in self.entries:
                    self.entries[full_key] = value
                    self.size += len(value)
                while self.size > self.max_bytes:
                    _, old = self.entries.popitem(last=False)
                    self.size -= len(old)
        return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.size = 0


cache = TerminalCache()
