"""The Celery task: claim a run (and, with NORMBENCH_PACK_SIZE > 1, up to that many compatible queued runs
of its job to train in one pack), train the claimed runs through the engine and settle each one."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.core.run_states import CANCELLED_BEFORE_START, RunStatus
from app.db import session_scope
from app.queue import TRAIN_RUN_TASK
from app.repositories.runs import Claim, claim_pack_mates, claim_run, finish_run
from app.schemas.jobs import JobSpec
from app.storage import Storage, open_storage
from app.tables import Dataset, Job, Run
from workers.celery_app import celery_app
from workers.checkpoint import Checkpoint
from workers.data import DeviceData, load_device_data
from workers.engine import Outcome, PackTrainer, RunConfig, environment
from workers.lease import Heartbeat
from workers.outcomes import settle
from workers.reporter import DbReporter, load_checkpoint

log = logging.getLogger(__name__)
SKIPPED = "skipped"  # the task's run was not claimable: finished, cancelled or held by a live worker


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@lru_cache(maxsize=2)
def _cached_data(path: str, sha256: str, budget_json: str, device: str) -> DeviceData:
    # Runs of one job share their dataset; keep the last couple resident on the device.
    return load_device_data(Path(path), json.loads(budget_json), torch.device(device))


def run_config(run: Run, spec: JobSpec, budget: dict[str, int]) -> RunConfig:
    """What one run of the job trains, from the validated spec: every default is the schema's."""
    if spec.model.arch == "auto":  # the API resolves it at submit; a stored spec always names the network
        raise ValueError(f"job of run {run.id} has no resolved model.arch")
    return RunConfig(
        arch=spec.model.arch,
        norm=run.norm,
        norm_params=dict(run.norm_params),
        batch_size=run.batch_size,
        seed=run.seed,
        budget=dict(budget),
        model=spec.model.model_dump(),
        optimizer=spec.optimizer.model_dump(),
        augment=spec.augment.model_dump(),
        log_every_steps=spec.log_every_steps,
        precision=spec.precision,
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
        return SKIPPED
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
class ClaimedRun:
    """One run this task claimed, on its way through training."""

    claim: Claim
    cfg: RunConfig
    env: dict[str, Any]  # recorded with the run: versions, device, precision, how the pack ran
    resume: Checkpoint | None = None
    reporter: DbReporter | None = None
    status: str | None = None  # how it ended, once settled


@dataclass
class JobInputs:
    """What the claimed runs share, read once: their job's data and whether it is being cancelled."""

    dataset_uri: str
    dataset_sha256: str
    cancelled: bool
    abort: bool  # fault injection (tests only): the worker dies at the first report


T = TypeVar("T", Run, Job, Dataset)


def _row(session: Session, table: type[T], key: str) -> T:
    row = session.get(table, key)
    if row is None:
        raise LookupError(f"{table.__tablename__} {key} was deleted while its runs were claimed")
    return row


def _load_claimed(settings: Settings, claims: list[Claim], device: torch.device) -> tuple[list[ClaimedRun], JobInputs]:
    """Each claimed run's config from its job's spec, validated once, and what the runs share."""
    with session_scope(settings.resolved_database_url) as s:
        runs = [_row(s, Run, c.run_id) for c in claims]
        job = _row(s, Job, runs[0].job_id)  # claimed runs are all of one job
        dataset = _row(s, Dataset, job.dataset_id)
        spec = JobSpec.model_validate(job.spec)
        claimed = []
        for claim, run in zip(claims, runs, strict=True):
            cfg = run_config(run, spec, job.budget)
            claimed.append(ClaimedRun(claim, cfg, {**environment(device), "precision": cfg.precision}))
        fault = settings.fault_abort_job_name
        abort = fault is not None and job.name == fault
        return claimed, JobInputs(dataset.storage_uri, dataset.sha256, job.cancel_requested, abort)


def _train_claimed(settings: Settings, claims: list[Claim], heartbeat: Heartbeat, device: torch.device) -> str:
    """Train the claimed runs (the task's own run first) as one pack and settle each; returns how the first ended."""
    storage = open_storage(settings.resolved_storage_url)
    try:
        runs, inputs = _load_claimed(settings, claims, device)
        if inputs.cancelled:
            for r in runs:
                with session_scope(settings.resolved_database_url) as s:
                    finish_run(s, r.claim.run_id, r.claim.attempt, RunStatus.CANCELLED, error=CANCELLED_BEFORE_START)
            return RunStatus.CANCELLED
        budget = json.dumps(runs[0].cfg.budget, sort_keys=True)
        data = _cached_data(str(storage.fetch(inputs.dataset_uri)), inputs.dataset_sha256, budget, str(device))
    except Exception as e:  # nothing trained yet: settle every claimed run the same way
        statuses = [settle(settings, c, environment(device), e) for c in claims]
        return statuses[0]
    live = _prepare(settings, storage, runs, heartbeat, device, inputs.abort)
    if live:
        _train_pack(settings, live, heartbeat, data, device)
    return runs[0].status or RunStatus.FAILED


def _prepare(
    settings: Settings,
    storage: Storage,
    runs: list[ClaimedRun],
    heartbeat: Heartbeat,
    device: torch.device,
    abort: bool,
) -> list[ClaimedRun]:
    """Give each run its checkpoint to resume from and its reporter; returns those ready to train."""
    live = []
    for r in runs:
        try:
            r.resume = load_checkpoint(storage, r.claim.checkpoint_uri, device) if r.claim.checkpoint_uri else None
        except Exception as e:  # an unreadable checkpoint fails its run, not the pack
            r.status = settle(settings, r.claim, r.env, e)
            continue
        if r.resume is not None:
            r.env["resumed_from_step"] = r.resume.step
        r.reporter = DbReporter(settings, storage, r.claim, heartbeat.lease(r.claim.run_id), abort=abort)
        live.append(r)
    return live


def _train_pack(
    settings: Settings, live: list[ClaimedRun], heartbeat: Heartbeat, data: DeviceData, device: torch.device
) -> None:
    """Every claimed run set trains through the one engine (a pack of one included); each run is
    settled the moment it ends, so its lease stops being renewed."""

    def on_done(index: int, result: Outcome | BaseException) -> None:
        r = live[index]
        r.env.update(trainer.execution())
        heartbeat.finished.add(r.claim.run_id)
        r.status = settle(settings, r.claim, r.env, result)

    try:
        trainer = PackTrainer(
            [r.cfg for r in live],
            data,
            device,
            [r.reporter for r in live if r.reporter is not None],
            [r.resume for r in live],
            on_done=on_done,
        )
        trainer.run()
    except Exception as e:  # the pack itself broke (out of memory, a model error): every unsettled run
        log.exception("pack of %d runs stopped", len(live))
        for r in live:
            if r.status is None:
                r.status = settle(settings, r.claim, r.env, e)
