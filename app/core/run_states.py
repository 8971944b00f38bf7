"""A run's lifecycle: its states, the sets the code asks about, and the messages a person reads when a
run ends for a reason other than its training (torch-free: the API, workers and Alembic share it)."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """queued → running → succeeded | failed | diverged | cancelled. A terminal state never changes;
    only an explicit retry puts a failed or cancelled run back in the queue."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"


ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DIVERGED, RunStatus.CANCELLED})
# Succeeded and diverged runs are results and stay: a diverged run would diverge again (same seed).
RETRYABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})

CANCELLED_BEFORE_START = "cancelled by user before it started"
CANCELLED_BY_USER = "cancelled by user"
SHUT_DOWN = "worker shut down; resumes from its checkpoint"
WORKER_LOST = "the worker was lost (killed, out of memory or unreachable) on all {attempts} attempts"


def worker_lost(attempts: int) -> str:
    """The error of a run whose worker vanished on every attempt it was allowed."""
    return WORKER_LOST.format(attempts=attempts)
