"""Celery tasks. The train task claims a run, trains it on the fixed budget and records the outcome."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.exc import OperationalError

from app.config import Settings, get_settings
from app.db import session_scope
from app.queue import TRAIN_RUN_TASK, publish_train_run
from app.storage import Storage, open_storage
from app.tables import Dataset, Job, Run
from workers.celery_app import celery_app
from workers.data import DeviceData, load_device_data
from workers.engine import Outcome, Point, Progress, RunConfig, environment, train
from workers.lifecycle import SHUTDOWN
from workers.runstore import (
    Claim,
    StaleAttempt,
    claim_run,
    finish_run,
    record_progress,
    release_run,
    renew_lease,
)

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The lease could not be renewed for longer than it lasts: another worker may take the run."""


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@lru_cache(maxsize=2)
def _cached_data(path: str, sha256: str, budget_json: str, device: str) -> DeviceData:
    # Runs of one job share their dataset; keep the last couple resident on the device.
    return load_device_data(Path(path), json.loads(budget_json), torch.device(device))


class Heartbeat(threading.Thread):
    """Renews the run's lease every few seconds and picks up cancellation on the way."""

    def __init__(self, settings: Settings, claim: Claim) -> None:
        super().__init__(name=f"heartbeat-{claim.run_id}", daemon=True)
        self.settings, self.claim = settings, claim
        self.done = threading.Event()
        self.cancelled = self.superseded = self.unreachable = False
        self.last_ok = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings.resolved_database_url) as s:
                    cancel = renew_lease(s, self.claim.run_id, self.claim.attempt, self.settings.lease_seconds)
            except Exception:
                if time.monotonic() - self.last_ok > self.settings.lease_seconds:
                    self.unreachable = True
                continue
            self.last_ok = time.monotonic()
            if cancel is None:
                self.superseded = True
                return
            self.cancelled = cancel


class DbReporter:
    """Writes progress, points and checkpoints through the run's fencing token."""

    def __init__(self, settings: Settings, storage: Storage, claim: Claim, heartbeat: Heartbeat, abort: bool) -> None:
        self.settings, self.storage, self.claim, self.heartbeat = settings, storage, claim, heartbeat
        self.checkpoint_uri = claim.checkpoint_uri
        self.abort = abort

    def report(self, points: list[Point], progress: Progress, checkpoint: dict[str, Any] | None = None) -> None:
        if self.abort and progress.step > 0:
            os._exit(137)  # fault-injection hook (tests only): die like an OOM-killed process
        uri = None
        if checkpoint is not None and (
            progress.epoch % self.settings.checkpoint_every_epochs == 0 or SHUTDOWN.is_set()
        ):
            uri = save_checkpoint(self.storage, self.claim, progress.step, checkpoint)
        with session_scope(self.settings.resolved_database_url) as s:
            record_progress(
                s,
                self.claim.run_id,
                self.claim.attempt,
                points,
                progress,
                lease_seconds=self.settings.lease_seconds,
                checkpoint_uri=uri,
            )
        if uri is not None:
            if self.checkpoint_uri and self.checkpoint_uri != uri:
                self.storage.delete(self.checkpoint_uri)  # keep only the one the database points to
            self.checkpoint_uri = uri

    def stop_reason(self) -> str | None:
        hb = self.heartbeat
        if hb.superseded:
            raise StaleAttempt(f"run {self.claim.run_id} attempt {self.claim.attempt} was taken over")
        if hb.unreachable:
            raise LeaseLost(f"could not renew the lease of run {self.claim.run_id} for {self.settings.lease_seconds}s")
        if hb.cancelled:
            return "cancelled"
        if SHUTDOWN.is_set():
            return "shutdown"
        return None


def save_checkpoint(storage: Storage, claim: Claim, step: int, state: dict[str, Any]) -> str:
    with tempfile.TemporaryDirectory(prefix="normbench-ckpt-") as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save(state, path)
        return storage.put_file(f"checkpoints/{claim.run_id}/attempt{claim.attempt}-step{step}.pt", path)


def load_checkpoint(storage: Storage, uri: str, device: torch.device) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code.
    state: dict[str, Any] = torch.load(storage.fetch(uri), map_location=device, weights_only=True)
    state["aug_rng"] = state["aug_rng"].cpu()
    state["torch_rng"] = state["torch_rng"].cpu()
    return state


def run_config(run: Run, job: Job) -> RunConfig:
    spec = job.spec
    return RunConfig(
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


@celery_app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str:
    settings = get_settings()
    with session_scope(settings.resolved_database_url) as s:
        claim = claim_run(s, run_id, worker_name(), settings.lease_seconds, settings.max_attempts)
    if claim is None:
        log.info("run %s is not claimable (finished, cancelled or held by a live worker)", run_id)
        return "skipped"
    heartbeat = Heartbeat(settings, claim)
    heartbeat.start()
    try:
        return _train_claimed(settings, claim, heartbeat)
    finally:
        heartbeat.done.set()


def _train_claimed(settings: Settings, claim: Claim, heartbeat: Heartbeat) -> str:
    db = settings.resolved_database_url
    device = pick_device()
    env = environment(device)
    storage = open_storage(settings.resolved_storage_url)
    try:
        with session_scope(db) as s:
            run, job = s.get(Run, claim.run_id), None
            assert run is not None
            job = s.get(Job, run.job_id)
            dataset = s.get(Dataset, job.dataset_id) if job else None
            assert job is not None and dataset is not None
            cfg, cancelled = run_config(run, job), job.cancel_requested
            uri, sha, abort = dataset.storage_uri, dataset.sha256, job.name == settings.fault_abort_job_name
        if cancelled:
            with session_scope(db) as s:
                finish_run(s, claim.run_id, claim.attempt, "cancelled", error="cancelled by user before it started")
            return "cancelled"
        data = _cached_data(str(storage.fetch(uri)), sha, json.dumps(cfg.budget, sort_keys=True), str(device))
        resume = load_checkpoint(storage, claim.checkpoint_uri, device) if claim.checkpoint_uri else None
        if resume is not None:
            env["resumed_from_step"] = int(resume["step"])
        reporter = DbReporter(
            settings, storage, claim, heartbeat, abort=abort and settings.fault_abort_job_name is not None
        )
        outcome = train(cfg, data, device, reporter, resume)
        return _record_outcome(settings, claim, outcome, env)
    except StaleAttempt:
        log.warning("run %s attempt %s was superseded; stopped without further writes", claim.run_id, claim.attempt)
        return "stale"
    except (LeaseLost, OperationalError) as e:
        # The database is unreachable: stop; the lease expires and the reconciler requeues the run.
        log.error("run %s attempt %s stopped: %s", claim.run_id, claim.attempt, e)
        return "lost"
    except torch.cuda.OutOfMemoryError as e:
        return _retry_or_fail(settings, claim, f"out of memory: {e}", env)
    except Exception as e:  # a data or model error: fail the run with its message, no retry
        log.exception("run %s failed", claim.run_id)
        with session_scope(db) as s:
            finish_run(s, claim.run_id, claim.attempt, "failed", error=f"{type(e).__name__}: {e}", environment=env)
        return "failed"


def _record_outcome(settings: Settings, claim: Claim, outcome: Outcome, env: dict[str, Any]) -> str:
    log.info("run %s attempt %s trained to %s at step %s", claim.run_id, claim.attempt, outcome.status, outcome.steps)
    with session_scope(settings.resolved_database_url) as s:
        if outcome.status == "interrupted":
            if release_run(s, claim.run_id, claim.attempt, outcome.error or "interrupted"):
                publish_train_run(settings, claim.run_id)
            return "released"
        finish_run(
            s,
            claim.run_id,
            claim.attempt,
            outcome.status,
            final_metrics=outcome.final_metrics or None,
            error=outcome.error,
            steps=outcome.steps,
            samples=outcome.samples,
            wall_time_s=outcome.wall_time_s,
            environment=env,
        )
    return outcome.status


def _retry_or_fail(settings: Settings, claim: Claim, reason: str, env: dict[str, Any]) -> str:
    with session_scope(settings.resolved_database_url) as s:
        if claim.attempt < settings.max_attempts:
            if release_run(s, claim.run_id, claim.attempt, reason):
                publish_train_run(settings, claim.run_id)
            return "released"
        finish_run(
            s,
            claim.run_id,
            claim.attempt,
            "failed",
            error=f"{reason} (after {claim.attempt} attempts)",
            environment=env,
        )
    return "failed"
