"""Celery tasks. The train task claims a run (and, with NORMBENCH_PACK_SIZE > 1, up to that many
compatible queued runs of its job to train in one pack), trains on the fixed budget and records each
run's outcome."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
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
from workers.packing import PackTrainer
from workers.runstore import (
    Claim,
    StaleAttempt,
    claim_pack_mates,
    claim_run,
    finish_run,
    record_progress,
    release_run,
    renew_leases,
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
    """Renews the leases of the runs this worker trains (one run, or a pack) every few seconds, in one
    statement, and picks up cancellation and lost claims on the way."""

    def __init__(self, settings: Settings, claims: list[Claim]) -> None:
        super().__init__(name=f"heartbeat-{claims[0].run_id}", daemon=True)
        self.settings, self.claims = settings, list(claims)
        self.done = threading.Event()
        self.cancelled: set[str] = set()
        self.superseded: set[str] = set()
        self.finished: set[str] = set()
        self.unreachable = False
        self.last_ok = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.settings.heartbeat_seconds):
            live = [
                (c.run_id, c.attempt)
                for c in self.claims
                if c.run_id not in self.superseded and c.run_id not in self.finished
            ]
            if not live:
                return
            try:
                with session_scope(self.settings.resolved_database_url) as s:
                    states = renew_leases(s, live, self.settings.lease_seconds)
            except Exception:
                if time.monotonic() - self.last_ok > self.settings.lease_seconds:
                    self.unreachable = True
                continue
            self.last_ok = time.monotonic()
            for run_id, cancel in states.items():
                if cancel is None:
                    if run_id not in self.finished:
                        self.superseded.add(run_id)
                elif cancel:
                    self.cancelled.add(run_id)

    def lease(self, run_id: str) -> Lease:
        return Lease(self, run_id)


class Lease:
    """One run's view of the shared heartbeat."""

    def __init__(self, heartbeat: Heartbeat, run_id: str) -> None:
        self.heartbeat, self.run_id = heartbeat, run_id

    @property
    def superseded(self) -> bool:
        return self.run_id in self.heartbeat.superseded

    @property
    def cancelled(self) -> bool:
        return self.run_id in self.heartbeat.cancelled

    @property
    def unreachable(self) -> bool:
        return self.heartbeat.unreachable


class DbReporter:
    """Writes progress, points and checkpoints through the run's fencing token."""

    def __init__(self, settings: Settings, storage: Storage, claim: Claim, lease: Lease, abort: bool) -> None:
        self.settings, self.storage, self.claim, self.heartbeat = settings, storage, claim, lease
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
    for key in ("aug_rng", "torch_rng"):  # generator states live on the CPU (aug_rng: format 1 only)
        if key in state:
            state[key] = state[key].cpu()
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
        precision=spec.get("precision", "fp32"),
    )


def pack_size(settings: Settings, device: torch.device) -> int:
    """Runs trained together per task: NORMBENCH_PACK_SIZE, or 32 on a GPU and 4 on a CPU, where
    packing K=4 seeds gives 1.7–2× the model-steps/s of one run at batch 2 (bench/RESULTS.md)."""
    if settings.pack_size > 0:
        return settings.pack_size
    return 32 if device.type == "cuda" else 4


@celery_app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str:
    settings = get_settings()
    device = pick_device()
    with session_scope(settings.resolved_database_url) as s:
        claim = claim_run(s, run_id, worker_name(), settings.lease_seconds, settings.max_attempts)
    if claim is None:
        log.info("run %s is not claimable (finished, cancelled or held by a live worker)", run_id)
        return "skipped"
    claims = [claim]
    size = pack_size(settings, device)
    if size > 1:
        try:
            with session_scope(settings.resolved_database_url) as s:
                claims += claim_pack_mates(s, run_id, worker_name(), settings.lease_seconds, size - 1)
        except Exception:  # train the run alone; queued mates stay queued for other tasks
            log.exception("could not claim pack mates for run %s", run_id)
        if len(claims) > 1:
            log.info("run %s packed with %s", run_id, ", ".join(c.run_id for c in claims[1:]))
    heartbeat = Heartbeat(settings, claims)
    heartbeat.start()
    try:
        return _train_claimed(settings, claims, heartbeat, device)
    finally:
        heartbeat.done.set()


@dataclass
class Packed:
    """One claimed run on its way through training."""

    claim: Claim
    cfg: RunConfig
    env: dict[str, Any]
    resume: dict[str, Any] | None = None
    reporter: DbReporter | None = None
    status: str | None = None  # how it ended, once settled


def _train_claimed(settings: Settings, claims: list[Claim], heartbeat: Heartbeat, device: torch.device) -> str:
    """Train the claimed runs (the task's own run first) and settle each; returns how the first ended."""
    db = settings.resolved_database_url
    storage = open_storage(settings.resolved_storage_url)
    runs: list[Packed] = []
    try:
        with session_scope(db) as s:
            job = dataset = None
            for claim in claims:
                run = s.get(Run, claim.run_id)
                assert run is not None
                job = job or s.get(Job, run.job_id)
                assert job is not None
                cfg = run_config(run, job)
                runs.append(Packed(claim, cfg, {**environment(device), "precision": cfg.precision}))
            assert job is not None
            dataset = s.get(Dataset, job.dataset_id)
            assert dataset is not None
            cancelled = job.cancel_requested
            uri, sha, abort = dataset.storage_uri, dataset.sha256, job.name == settings.fault_abort_job_name
        if cancelled:
            for r in runs:
                with session_scope(db) as s:
                    finish_run(
                        s, r.claim.run_id, r.claim.attempt, "cancelled", error="cancelled by user before it started"
                    )
            return "cancelled"
        data = _cached_data(str(storage.fetch(uri)), sha, json.dumps(runs[0].cfg.budget, sort_keys=True), str(device))
    except Exception as e:  # nothing trained yet: settle every claimed run the same way
        statuses = [_settle(settings, c, environment(device), e) for c in claims]
        return statuses[0]

    live: list[Packed] = []
    for r in runs:
        try:
            r.resume = load_checkpoint(storage, r.claim.checkpoint_uri, device) if r.claim.checkpoint_uri else None
        except Exception as e:  # an unreadable checkpoint fails its run, not the pack
            r.status = _settle(settings, r.claim, r.env, e)
            continue
        if r.resume is not None:
            r.env["resumed_from_step"] = int(r.resume["step"])
        lease = heartbeat.lease(r.claim.run_id)
        r.reporter = DbReporter(
            settings, storage, r.claim, lease, abort=abort and settings.fault_abort_job_name is not None
        )
        live.append(r)

    if len(live) == 1 and device.type == "cpu":
        r = live[0]
        assert r.reporter is not None
        try:
            result: Outcome | BaseException = train(r.cfg, data, device, r.reporter, r.resume)
        except Exception as e:
            result = e
        r.env["engine"] = "single"
        r.status = _settle(settings, r.claim, r.env, result)
    elif live:

        def settle(index: int, result: Outcome | BaseException) -> None:
            r = live[index]
            r.env.update(trainer.execution())
            heartbeat.finished.add(r.claim.run_id)
            r.status = _settle(settings, r.claim, r.env, result)

        try:
            trainer = PackTrainer(
                [r.cfg for r in live],
                data,
                device,
                [r.reporter for r in live if r.reporter is not None],
                [r.resume for r in live],
                on_done=settle,
            )
            trainer.run()
        except Exception as e:  # the pack itself broke (out of memory, a model error): every unsettled run
            log.exception("pack of %d runs stopped", len(live))
            for r in live:
                if r.status is None:
                    r.status = _settle(settings, r.claim, r.env, e)
    return runs[0].status or "failed"


def _settle(settings: Settings, claim: Claim, env: dict[str, Any], result: Outcome | BaseException) -> str:
    """Record how one run ended (its outcome, or the exception that stopped it); returns a status word."""
    if isinstance(result, Outcome):
        return _record_outcome(settings, claim, result, env)
    if isinstance(result, StaleAttempt):
        log.warning("run %s attempt %s was superseded; stopped without further writes", claim.run_id, claim.attempt)
        return "stale"
    if isinstance(result, LeaseLost | OperationalError):
        # The database is unreachable: stop; the lease expires and the reconciler requeues the run.
        log.error("run %s attempt %s stopped: %s", claim.run_id, claim.attempt, result)
        return "lost"
    if isinstance(result, torch.cuda.OutOfMemoryError):
        return _retry_or_fail(settings, claim, f"out of memory: {result}", env)
    # A data or model error: fail the run with its message, no retry.
    log.error("run %s failed", claim.run_id, exc_info=result)
    try:
        with session_scope(settings.resolved_database_url) as s:
            error = f"{type(result).__name__}: {result}"
            finish_run(s, claim.run_id, claim.attempt, "failed", error=error, environment=env)
    except OperationalError as e:
        log.error("run %s attempt %s stopped: %s", claim.run_id, claim.attempt, e)
        return "lost"
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
