"""How a claimed run ended, recorded: its training outcome, or the exception that stopped it, classified
as the design's failure classes (a lost claim, an unreachable database, out of memory, a data or code error).

Out of memory (a CUDA OOM, MemoryError, or the CPU allocator refusing past the worker's RLIMIT_DATA) is class
`resource`: the run fails at once and is not retried unchanged (it would run out again), and the worker goes on."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.core.run_states import RunStatus
from app.db import session_scope
from app.queue import publish_train_run
from app.repositories.runs import Claim, FailureClass, StaleAttempt, finish_run, release_run
from workers.engine import Outcome
from workers.lease import LeaseLost

log = logging.getLogger(__name__)

# How a settled run ended when it did not reach a run status of its own (the task's return value).
STALE = "stale"  # another attempt holds the run: this worker wrote nothing more
LOST = "lost"  # the database was unreachable: the lease expires and the reconciler requeues the run
RELEASED = "released"  # handed back to the queue and published again (shutdown)
# How the CPU allocator (c10's DefaultCPUAllocator) and others word a refused allocation.
_OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a refused allocation (on the GPU or the CPU), not a bug."""
    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _OOM_WORDS)


INTERRUPTED = "interrupted"  # the engine's outcome for a run stopped by shutdown, checkpointed


def settle(settings: Settings, claim: Claim, env: dict[str, Any], result: Outcome | BaseException) -> str:
    """Record how one run ended (its outcome, or the exception that stopped it); returns a status word."""
    if isinstance(result, Outcome):
        return record_outcome(settings, claim, result, env)
    if isinstance(result, StaleAttempt):
        log.warning("run %s attempt %s was superseded; stopped without further writes", claim.run_id, claim.attempt)
        return STALE
    if isinstance(result, LeaseLost | OperationalError):
        log.error("run %s attempt %s stopped: %s", claim.run_id, claim.attempt, result)
        return LOST
    if out_of_memory(result):
        log.error("run %s ran out of memory: %s", claim.run_id, result)
        kind, error = FailureClass.RESOURCE, f"out of memory: {type(result).__name__}: {result}"
    else:  # a data or model error: fail the run with its message, no retry
        log.error("run %s failed", claim.run_id, exc_info=result)
        kind, error = FailureClass.DATA, f"{type(result).__name__}: {result}"
    try:
        finish_through_outage(settings, claim, RunStatus.FAILED, error=error, environment=env, failure_class=kind)
    except OperationalError as e:
        log.error("run %s attempt %s stopped: %s", claim.run_id, claim.attempt, e)
        return LOST
    return RunStatus.FAILED


def record_outcome(settings: Settings, claim: Claim, outcome: Outcome, env: dict[str, Any]) -> str:
    """A run the engine brought to an end: finished with its status, or (interrupted) handed back."""
    if outcome.status == RunStatus.SUCCEEDED and env.get("resumed_from_step") == outcome.steps:
        log.info("run %s attempt %s: training had ended (final checkpoint); recording it", claim.run_id, claim.attempt)
    else:
        log.info(
            "run %s attempt %s trained to %s at step %s", claim.run_id, claim.attempt, outcome.status, outcome.steps
        )
    if outcome.status == INTERRUPTED:
        return release(settings, claim, outcome.error or INTERRUPTED)
    finish_through_outage(
        settings,
        claim,
        RunStatus(outcome.status),
        final_metrics=outcome.final_metrics or None,
        error=outcome.error,
        steps=outcome.steps,
        samples=outcome.samples,
        wall_time_s=outcome.wall_time_s,
        environment=env,
    )
    return outcome.status


def finish_through_outage(settings: Settings, claim: Claim, status: RunStatus, **fields: Any) -> bool:
    """`finish_run`, tried again every half second while the database is unreachable, for up to a lease from
    the first failure (counted per process, so the runs of a pack do not each wait a lease), so a trained run's
    result survives a database restart instead of the run being trained again (the soak, issue 15). Safe to
    repeat: the write only lands while this attempt still holds the run."""
    global _down_since
    while True:
        try:
            with session_scope(settings.resolved_database_url) as s:
                written = finish_run(s, claim.run_id, claim.attempt, status, **fields)
            _down_since = None
            return written
        except OperationalError:
            now = time.monotonic()
            _down_since = _down_since or now
            if now - _down_since > settings.lease_seconds:
                raise
            log.warning(
                "run %s attempt %s: the database is unreachable; recording its end again", claim.run_id, claim.attempt
            )
            time.sleep(0.5)


_down_since: float | None = None  # when this process's result writes began to find the database unreachable


def release(settings: Settings, claim: Claim, reason: str) -> str:
    """Hand the run back to the queue and publish it, if this attempt still holds it."""
    with session_scope(settings.resolved_database_url) as s:
        released = release_run(s, claim.run_id, claim.attempt, reason)
    if released:
        publish_train_run(settings, claim.run_id)
    return RELEASED
