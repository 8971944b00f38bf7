"""Celery tasks. The train task claims a run, trains it on the fixed budget and records the outcome."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from functools import lru_cache
from pathlib import Path

import torch

from app.config import get_settings
from app.db import session_scope
from app.queue import TRAIN_RUN_TASK
from app.storage import open_storage
from app.tables import Dataset, Job, Run
from workers.celery_app import celery_app
from workers.data import DeviceData, load_device_data
from workers.engine import Point, RunConfig, environment, train
from workers.runstore import StaleAttempt, cancel_requested, claim_run, finish_run, record_progress

log = logging.getLogger(__name__)
CANCEL_CHECK_SECONDS = 2.0


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@lru_cache(maxsize=2)
def _cached_data(path: str, sha256: str, budget_json: str, device: str) -> DeviceData:
    # Runs of one job share their dataset; keep the last couple resident on the device.
    return load_device_data(Path(path), json.loads(budget_json), torch.device(device))


class DbReporter:
    """Writes progress through the run's fencing token and polls for cancellation."""

    def __init__(self, db_url: str, run_id: str, attempt: int) -> None:
        self.db_url, self.run_id, self.attempt = db_url, run_id, attempt
        self._last_check = 0.0

    def report(self, points: list[Point], *, step: int, epoch: int, samples: int) -> None:
        with session_scope(self.db_url) as s:
            record_progress(s, self.run_id, self.attempt, points, step=step, epoch=epoch, samples=samples)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < CANCEL_CHECK_SECONDS:
            return False
        self._last_check = now
        with session_scope(self.db_url) as s:
            return cancel_requested(s, self.run_id)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@celery_app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str:
    settings = get_settings()
    db = settings.resolved_database_url
    with session_scope(db) as s:
        attempt = claim_run(s, run_id, worker_name())
    if attempt is None:
        log.info("run %s is not claimable (finished, cancelled or held by a live worker)", run_id)
        return "skipped"
    device = pick_device()
    try:
        with session_scope(db) as s:
            run = s.get(Run, run_id)
            assert run is not None
            job = s.get(Job, run.job_id)
            assert job is not None
            dataset = s.get(Dataset, job.dataset_id)
            assert dataset is not None
            stop = job.cancel_requested
            spec = job.spec
            cfg = RunConfig(
                arch=spec["model"]["arch"],
                norm=run.norm,
                norm_params=dict(run.norm_params),
                batch_size=run.batch_size,
                seed=run.seed,
                budget=dict(job.budget),
                model=spec["model"],
                optimizer=spec["optimizer"],
                augment=spec["augment"],
                log_every_steps=spec["log_every_steps"],
            )
            uri, sha = dataset.storage_uri, dataset.sha256
        if stop:
            with session_scope(db) as s:
                finish_run(s, run_id, attempt, "cancelled", error="cancelled by user before it started")
            return "cancelled"
        path = open_storage(settings.resolved_storage_url).fetch(uri)
        data = _cached_data(str(path), sha, json.dumps(cfg.budget, sort_keys=True), str(device))
        outcome = train(cfg, data, device, DbReporter(db, run_id, attempt))
        with session_scope(db) as s:
            finish_run(
                s,
                run_id,
                attempt,
                outcome.status,
                final_metrics=outcome.final_metrics or None,
                error=outcome.error,
                steps=outcome.steps,
                samples=outcome.samples,
                wall_time_s=outcome.wall_time_s,
                environment=environment(device),
            )
        return outcome.status
    except StaleAttempt:
        log.warning("run %s attempt %s was superseded; stopping without further writes", run_id, attempt)
        return "stale"
    except Exception as e:  # a data or model error: fail the run with its message, no retry
        log.exception("run %s failed", run_id)
        with session_scope(db) as s:
            finish_run(s, run_id, attempt, "failed", error=f"{type(e).__name__}: {e}", environment=environment(device))
        return "failed"
