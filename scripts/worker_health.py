"""The worker container's healthcheck: healthy when this worker answers a Celery ping, or, while it trains
(the solo pool answers no ping until its task ends), when a run it holds has a lease it keeps renewing.

Exit 0 healthy, 1 not. Run inside the worker container: `python scripts/worker_health.py` (the worker is
started with `--hostname normbench@%h`, so its Celery name is normbench@<container hostname>).
"""

from __future__ import annotations

import socket
import sys

from celery import Celery
from sqlalchemy import select

from app.config import Settings, get_settings
from app.core.run_states import RunStatus
from app.db import session_factory
from app.queue import celery_config
from app.tables import Run
from app.tables.base import utcnow


def answers_ping(settings: Settings, host: str, timeout: float = 5.0) -> bool:
    client = Celery("normbench-health")
    client.conf.update(celery_config(settings))
    try:
        return bool(client.control.ping(destination=[f"normbench@{host}"], timeout=timeout))
    except Exception:  # broker down: not healthy
        return False


def training_with_a_live_lease(settings: Settings, host: str) -> bool:
    # runs.worker is "<hostname>:<pid>" (workers.tasks.worker_name); the heartbeat renews lease_expires_at.
    query = select(Run.id).where(
        Run.status == RunStatus.RUNNING, Run.worker.like(f"{host}:%"), Run.lease_expires_at > utcnow()
    )
    with session_factory(settings.resolved_database_url)() as session:
        return session.execute(query.limit(1)).first() is not None


def main() -> int:
    settings, host = get_settings(), socket.gethostname()
    # The lease first: one indexed read, where a ping to a busy or unreachable broker waits seconds.
    return 0 if training_with_a_live_lease(settings, host) or answers_ping(settings, host) else 1


if __name__ == "__main__":
    sys.exit(main())
