"""The Celery application (`celery -A workers.celery_app worker -Q train --pool solo`).

One pack trains at a time per worker process (`--pool solo`): SIGTERM then reaches the training
loop, which checkpoints and hands the runs back instead of being killed mid-epoch. A CPU machine
runs one such worker per core (NORMBENCH_WORKERS), each with the cores it gets as torch threads
(NORMBENCH_TORCH_THREADS: one each, then). On a CPU the process's memory is capped at
NORMBENCH_WORKER_MEMORY_BYTES, so a run that runs out fails alone.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.config import get_settings
from app.queue import celery_config
from workers import lifecycle

celery_app = Celery("normbench", include=["workers.tasks", "workers.probe"])
celery_app.conf.update(celery_config(get_settings()))
app = celery_app  # `celery -A workers.celery_app` finds `app`

log = logging.getLogger(__name__)


def limit_memory(**_: Any) -> None:
    """On a CPU worker, cap this process's data segment (heap and private mappings: every tensor) at
    NORMBENCH_WORKER_MEMORY_BYTES with RLIMIT_DATA, so an allocation past it raises (the run fails, class
    `resource`) instead of the kernel's OOM killer ending the worker and whatever else shares it. Not with
    CUDA: the driver maps large private areas, and device memory is not host memory."""
    import torch

    if torch.cuda.is_available():
        return
    limit = get_settings().worker_memory_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info("worker memory limited to %d bytes (RLIMIT_DATA)", limit)


def warm_up(**_: Any) -> None:
    """Pay torch's one-time lazy imports now, not in the first job: the first optimizer torch builds imports
    torch._dynamo (seconds on a small CPU), and every epoch-end checkpoint builds one for its format."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


worker_ready.connect(limit_memory, weak=False, dispatch_uid="normbench.limit_memory")  # solo: trains here
worker_ready.connect(lifecycle.on_worker_ready, weak=False)
worker_ready.connect(warm_up, weak=False, dispatch_uid="normbench.warm_up")
worker_shutting_down.connect(lifecycle.on_worker_shutting_down, weak=False)


@worker_process_init.connect
def _per_process_setup(**_: Any) -> None:
    lifecycle.apply_thread_setting()  # prefork children; solo workers apply it when ready
    limit_memory()
    warm_up()
