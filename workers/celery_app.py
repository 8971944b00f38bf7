"""The Celery application (`celery -A workers.celery_app worker -Q train --pool solo`).

One run trains at a time per worker process (`--pool solo`): SIGTERM then reaches the training
loop, which checkpoints and hands the run back instead of being killed mid-epoch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.config import get_settings
from app.queue import celery_config
from workers import lifecycle

celery_app = Celery("normbench", include=["workers.tasks"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app  # `celery -A workers.celery_app` finds `app`

worker_ready.connect(lifecycle.on_worker_ready, weak=False)
worker_shutting_down.connect(lifecycle.on_worker_shutting_down, weak=False)


@worker_process_init.connect
def _per_process_setup(**_: Any) -> None:
    lifecycle.apply_thread_setting()  # prefork children; solo workers apply it when ready
