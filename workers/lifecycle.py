"""Worker process lifecycle: start the reconciler when ready, note a requested shutdown."""

from __future__ import annotations

import logging
import threading
from typing import Any

from app.config import get_settings
from app.queue import publish_probe, publish_train_run
from workers.reconciler import ReconcilerThread

log = logging.getLogger(__name__)

# Set on SIGTERM/SIGINT: the training loop checkpoints, hands its run back and returns.
SHUTDOWN = threading.Event()
_reconciler: ReconcilerThread | None = None


def on_worker_ready(**_: Any) -> None:
    global _reconciler
    settings = get_settings()
    apply_thread_setting()
    _reconciler = ReconcilerThread(
        settings,
        lambda run_id: publish_train_run(settings, run_id),
        lambda probe_id: publish_probe(settings, probe_id),
    )
    _reconciler.start()


def apply_thread_setting() -> None:
    """NORMBENCH_TORCH_THREADS, or on a CPU the cores shared among this machine's workers (a GPU worker keeps
    torch's default unless the setting names a number)."""
    import torch

    settings = get_settings()
    threads = settings.torch_threads if torch.cuda.is_available() else settings.cpu_threads()
    if threads > 0:
        torch.set_num_threads(threads)


def on_worker_shutting_down(**_: Any) -> None:
    log.warning("shutdown requested: checkpointing the current run and handing it back")
    SHUTDOWN.set()
    if _reconciler is not None:
        _reconciler.stopping.set()
