"""Publishing training tasks by name, so the API never imports task code or torch."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.config import TRAIN_QUEUE, Settings

TRAIN_RUN_TASK = "normbench.train_run"
PROBE_TASK = "normbench.probe"  # workers/probe.py: a short measured run that sizes batches


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker configuration shared by the API (publisher) and the worker (consumer)."""
    conf: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": TRAIN_QUEUE,
        "broker_connection_retry_on_startup": True,
        # Fail a publish fast when the broker is down; the reconciler publishes the run later.
        "broker_connection_timeout": 3,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        # Postgres is the source of truth; a late redelivery finds the run already claimed.
        "broker_transport_options": {"visibility_timeout": 6 * 3600},
    }
    if settings.broker_key_prefix and conf["broker_url"].startswith(("redis://", "rediss://")):
        conf["broker_transport_options"]["global_keyprefix"] = settings.broker_key_prefix
    if conf["broker_url"].startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    return conf


_publishers: dict[str, Celery] = {}


def _publisher(settings: Settings) -> Celery:
    key = f"{settings.resolved_broker_url}|{settings.broker_dir}|{settings.broker_key_prefix}"
    if key not in _publishers:
        client = Celery("normbench-api")
        client.conf.update(celery_config(settings))
        _publishers[key] = client
    return _publishers[key]


def publish_train_run(settings: Settings, run_id: str) -> None:
    _publisher(settings).send_task(TRAIN_RUN_TASK, args=[run_id], queue=TRAIN_QUEUE)


def publish_probe(settings: Settings, probe_id: str) -> None:
    # The training queue: the probe measures the device the job's runs will train on.
    _publisher(settings).send_task(PROBE_TASK, args=[probe_id], queue=TRAIN_QUEUE)


def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    try:
        with _publisher(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False
