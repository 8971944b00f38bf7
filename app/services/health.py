"""What the probes and the operator metrics report: whether the database and broker answer, and counts
of runs, jobs and datasets in the Prometheus text format."""

from __future__ import annotations

import hmac

from sqlalchemy import Select, func, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.run_states import RunStatus
from app.errors import NotFound, Unauthorized
from app.queue import broker_reachable
from app.tables import Dataset, Job, Run, utcnow

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"


def readiness_checks(session: Session, settings: Settings) -> dict[str, str]:
    """`ok` or why not, for the database and the broker."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    checks["broker"] = "ok" if broker_reachable(settings) else "unreachable"
    return checks


def check_metrics_access(settings: Settings, bearer: str | None) -> None:
    """The metrics count every owner's runs, jobs and datasets: public only where NORMBENCH_METRICS_PUBLIC says
    so (default: keys off, which is loopback only); otherwise for the admin token alone, compared in constant time."""
    if settings.resolved_metrics_public:
        return
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected:
        raise NotFound(
            "metrics are not public on this server (they count every owner's data): set NORMBENCH_ADMIN_TOKEN and "
            "scrape with `Authorization: Bearer <token>`, or set NORMBENCH_METRICS_PUBLIC=true"
        )
    if not hmac.compare_digest((bearer or "").encode(), expected.encode()):
        raise Unauthorized("GET /metrics needs `Authorization: Bearer <NORMBENCH_ADMIN_TOKEN>`")


def _count(session: Session, stmt: Select[int]) -> int:
    return int(session.scalar(stmt) or 0)


def prometheus_metrics(session: Session) -> str:
    """Runs by status, running runs whose lease expired (a lost worker the reconciler has not seen yet),
    queued runs never published, jobs and datasets."""
    by_status = dict(session.execute(select(Run.status, func.count()).group_by(Run.status)).all())
    running_expired = (Run.status == RunStatus.RUNNING) & (Run.lease_expires_at < utcnow())
    queued_unpublished = (Run.status == RunStatus.QUEUED) & Run.published_at.is_(None)
    totals = {
        "normbench_runs_lease_expired": (
            "Running runs whose lease expired.",
            _count(session, select(func.count()).where(running_expired)),
        ),
        "normbench_runs_unpublished": (
            "Queued runs no task was published for yet.",
            _count(session, select(func.count()).where(queued_unpublished)),
        ),
        "normbench_jobs": ("Jobs.", _count(session, select(func.count()).select_from(Job))),
        "normbench_datasets": (
            "Datasets, built-in included.",
            _count(session, select(func.count()).select_from(Dataset)),
        ),
    }
    lines = ["# HELP normbench_runs Runs by status.", "# TYPE normbench_runs gauge"]
    lines += [f'normbench_runs{{status="{s}"}} {by_status.get(s, 0)}' for s in RunStatus]
    for name, (help_text, value) in totals.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"
