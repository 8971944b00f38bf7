"""The Celery application (`celery -A workers.celery_app worker -Q train`)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from app.config import get_settings
from app.queue import celery_config

celery_app = Celery("normbench", include=["workers.tasks"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app  # `celery -A workers.celery_app` finds `app`


@worker_process_init.connect
def _per_process_setup(**_: Any) -> None:
    import torch

    threads = get_settings().torch_threads
    if threads > 0:
        torch.set_num_threads(threads)
