"""The Celery task: claim a run with the rest of its pack (the runs that share its `pack_key`, planned at
submit), train the claimed runs through the engine as one pack and settle each one."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.core.run_states import CANCELLED_BEFORE_START, RunStatus
from app.db import session_scope
from app.queue import TRAIN_RUN_TASK
from app.repositories.runs import Claim, claim_pack, finish_run
from app.schemas.jobs import JobSpec
from app.storage import DatasetCache, Storage, settings_storage
from app.tables import Dataset, Job, Run, Weights
from workers.celery_app import celery_app
from workers.checkpoint import Checkpoint
from workers.data import DeviceData, ResidentData
from workers.engine import Outcome, PackTrainer, RunConfig, environment
from workers.lease import Heartbeat
from workers.outcomes import settle
from workers.peak_memory import PeakMemory
from workers.reporter import DbReporter, load_checkpoint

log = logging.getLogger(__name__)
SKIPPED = "skipped"  # the task's run was not claimable: finished, cancelled or held by a live worker


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# The dataset this worker process holds on its device between tasks (one, as the admission estimate counts).
_RESIDENT = ResidentData()


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
        input=spec.input.model_dump(),
        # The local copy of the weights file (`path`) is added once it is on this machine.
        init=None if spec.init is None else spec.init.model_dump(),
    )


@celery_app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str:
    settings = get_settings()
    device = pick_device()
    with session_scope(settings.resolved_database_url) as s:
        claims = claim_pack(s, run_id, worker_name(), settings.lease_seconds, settings.max_attempts)
    if not claims:
        log.info("run %s is not claimable (finished, cancelled or held by a live worker)", run_id)
        return SKIPPED
    if len(claims) > 1:
        log.info("run %s packed with %s", run_id, ", ".join(c.run_id for c in claims if c.run_id != run_id))
    heartbeat = Heartbeat(settings, claims)
    heartbeat.start()
    try:
        return _train_claimed(settings, claims, heartbeat, device, run_id)
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
    weights_uri: str | None = None  # fine-tuning: the uploaded weights the runs start from
    weights_sha256: str | None = None


T = TypeVar("T", Run, Job, Dataset, Weights)


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
        planned = _planned_sizes(s, job.id, {r.pack_key for r in runs if r.pack_key is not None})
        claimed = []
        for claim, run in zip(claims, runs, strict=True):
            cfg = run_config(run, spec, job.budget)
            env = {**environment(device), "precision": cfg.precision}
            # The pack planned at submit; the engine adds the one that actually ran (`pack_runs`), which is
            # smaller when a run was requeued alone (a lost lease, a retry): the report points those out.
            env["pack_planned"] = planned.get(run.pack_key, 1) if run.pack_key else 1
            claimed.append(ClaimedRun(claim, cfg, env))
        fault = settings.fault_abort_job_name
        abort = fault is not None and job.name == fault
        inputs = JobInputs(dataset.storage_uri, dataset.sha256, job.cancel_requested, abort)
        if job.weights_id is not None:
            weights = _row(s, Weights, job.weights_id)
            inputs.weights_uri, inputs.weights_sha256 = weights.storage_uri, weights.sha256
        return claimed, inputs


def _planned_sizes(session: Session, job_id: str, pack_keys: set[str]) -> dict[str, int]:
    """How many runs each of these packs of the job was planned with."""
    if not pack_keys:
        return {}
    rows = session.execute(
        select(Run.pack_key, func.count())
        .where(Run.job_id == job_id, Run.pack_key.in_(pack_keys))
        .group_by(Run.pack_key)
    )
    return {str(key): int(n) for key, n in rows}


def _train_claimed(
    settings: Settings, claims: list[Claim], heartbeat: Heartbeat, device: torch.device, run_id: str
) -> str:
    """Train the claimed runs as one pack, in the pack's planned order, and settle each; returns how the
    task's own run (`run_id`) ended."""
    storage = settings_storage(settings)
    try:
        runs, inputs = _load_claimed(settings, claims, device)
        if inputs.cancelled:
            for r in runs:
                with session_scope(settings.resolved_database_url) as s:
                    finish_run(s, r.claim.run_id, r.claim.attempt, RunStatus.CANCELLED, error=CANCELLED_BEFORE_START)
            return RunStatus.CANCELLED
        # Remote storage: a local copy by content hash, downloaded once per worker machine.
        cache = DatasetCache.for_settings(settings)
        local = cache.path(storage, inputs.dataset_uri, inputs.dataset_sha256)
        data = _RESIDENT.get(local, inputs.dataset_sha256, runs[0].cfg.budget, device)
        if inputs.weights_uri is not None and inputs.weights_sha256 is not None:
            # Weights are blobs like datasets: the same local copy by content hash (safetensors, read by the engine).
            weights = cache.path(storage, inputs.weights_uri, inputs.weights_sha256)
            for r in runs:
                r.cfg = replace(r.cfg, init={**(r.cfg.init or {}), "path": str(weights)})
    except Exception as e:  # nothing trained yet: settle every claimed run the same way
        statuses = {c.run_id: settle(settings, c, environment(device), e) for c in claims}
        return statuses[run_id]
    live = _prepare(settings, storage, runs, heartbeat, device, inputs.abort)
    if live:
        _train_pack(settings, live, heartbeat, data, device)
    return next((r.status for r in runs if r.claim.run_id == run_id), None) or RunStatus.FAILED


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
        r.env.update(trainer.execution(index))
        r.env["peak_memory"] = peak.read()
        heartbeat.finished.add(r.claim.run_id)
        r.status = settle(settings, r.claim, r.env, result)

    peak = PeakMemory(device, len(live))
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
