"""Job rules: validate a spec against its dataset, expand it into runs, derive status, cancel."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Row, Text, bindparam, cast, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.core import catalogue, memory
from app.core.budget import holdout_size, resolve_budget, total_steps
from app.core.run_states import TERMINAL, RunStatus
from app.errors import Conflict, InvalidSpec, NotFound
from app.queue import publish_train_run
from app.repositories import runs as run_repo
from app.schemas.jobs import ExtendRequest, InputSpec, JobSpec, ModelSpec, VariantSpec
from app.schemas.probes import PROBE_FIRST_BATCH
from app.services import probe_fit, quotas
from app.services.datasets import get_dataset
from app.services.probe_fit import ProbeFit
from app.services.weights import weights_for_job
from app.tables import Dataset, Job, Probe, Run, utcnow

log = logging.getLogger(__name__)


def resolve_arch(spec: JobSpec, dataset: Dataset) -> str:
    if spec.model.arch != "auto":
        return spec.model.arch
    return catalogue.AUTO_ARCH.get(dataset.kind, "cnn")


def validate_network(
    arch: str, dataset: Dataset, model: ModelSpec, variants: list[VariantSpec], feed: InputSpec
) -> tuple[int, ...]:
    """The network's and its variants' checks against the dataset (jobs and probes); the shape it is fed."""
    kinds = catalogue.ARCHS[arch].input_kinds
    if dataset.kind not in kinds:
        fits = sorted(a for a, info in catalogue.ARCHS.items() if dataset.kind in info.input_kinds)
        raise InvalidSpec(
            f"model.arch '{arch}' needs {' or '.join(kinds)} data; dataset '{dataset.id}' is {dataset.kind}: use "
            + " or ".join(f"'{a}'" for a in fits)
        )
    try:
        fed = catalogue.fed_shape(dataset.shape, feed.resize, feed.crop)  # as the network sees it
    except catalogue.CatalogueError as e:
        raise InvalidSpec(f"input: {e}") from None
    try:
        sites = catalogue.norm_sites(
            arch,
            depth=model.depth,
            width=model.width,
            hidden=model.hidden,
            levels=model.levels,
            input_shape=fed,
            layers=model.layers,
            heads=model.heads,
        )
    except catalogue.CatalogueError as e:
        raise InvalidSpec(f"model: {e}") from None
    for i, variant in enumerate(variants):
        for single in variant.expand():
            try:
                catalogue.check_variant(single.norm, single.params(), sites, arch=arch)
            except catalogue.CatalogueError as e:
                raise InvalidSpec(f"variants[{i}]: {e}") from None
    return tuple(fed)


def split_sizes(dataset: Dataset, validation_fraction: float) -> tuple[int, int]:
    """(train, validation) samples: the uploaded `val` split, or a hold-out of the training split."""
    train_total = dataset.split_sizes["train"]
    val_size = dataset.split_sizes.get("val") or holdout_size(train_total, validation_fraction)
    return (train_total if dataset.split_sizes.get("val") else train_total - val_size), val_size


def _validate(
    spec: JobSpec, dataset: Dataset, settings: Settings, fit: ProbeFit | None = None
) -> tuple[str, dict[str, int]]:
    arch = resolve_arch(spec, dataset)
    validate_network(arch, dataset, spec.model, spec.variants, spec.input)
    if dataset.kind not in ("image", "segmentation") and (spec.augment.hflip or spec.augment.crop_padding):
        raise InvalidSpec(f"augment applies to images only; dataset is {dataset.kind}: remove hflip/crop_padding")
    if dataset.kind == "segmentation" and (spec.input.resize or spec.input.crop or spec.init):
        raise InvalidSpec(
            "input resize/crop and init apply to classification images; a segmentation job trains the U-Net from "
            "scratch at the masks' own size: remove them"
        )
    batch_sizes = spec.sizes()
    if spec.budget.epochs > settings.max_epochs:
        raise InvalidSpec(f"budget.epochs {spec.budget.epochs} is over this server's ceiling of {settings.max_epochs}")
    n_runs = len(spec.expanded_variants()) * len(batch_sizes) * len(spec.seeds)
    if n_runs > settings.max_runs_per_job:
        raise InvalidSpec(
            f"the spec expands to {n_runs} runs (variants × batch_sizes × seeds); the limit is {settings.max_runs_per_job}"
        )
    train_size, val_size = split_sizes(dataset, spec.validation_fraction)
    if arch == "mlp" and 1 in batch_sizes:
        batchy = [v.norm for v in spec.expanded_variants() if catalogue.NORMS[v.norm].batch_dependent]
        if batchy:
            raise InvalidSpec(f"batch size 1 gives {batchy[0]} a single value per feature in the MLP: use batch >= 2")
    too_big = [b for b in batch_sizes if b > train_size]
    if too_big:
        raise InvalidSpec(
            f"batch sizes {too_big} exceed the training split ({train_size} samples after validation hold-out)"
        )
    budget = resolve_budget(train_size, val_size, spec.budget.epochs, batch_sizes)
    if budget["total_samples"] * n_runs > settings.max_train_samples_per_job:
        raise InvalidSpec(
            f"the job would train on {budget['total_samples'] * n_runs} samples in all; the limit is "
            f"{settings.max_train_samples_per_job}: lower epochs, seeds or batch sizes"
        )
    _check_memory(spec, dataset, settings, arch, val_size, fit, train_size)
    return arch, budget


def job_pack(spec: JobSpec, settings: Settings) -> int:
    """The most runs one of the job's packs holds: one batch size and training key, `pack_size` at a time."""
    variants = spec.expanded_variants()
    keys = [training_key(v.norm, {k: x for k, x in v.params().items() if x is not None}) for v in variants]
    per_key = max(keys.count(k) for k in keys) * len(spec.seeds)
    return min(spec.pack_size or settings.pack_size, per_key)


def _check_memory(
    spec: JobSpec,
    dataset: Dataset,
    settings: Settings,
    arch: str,
    val_size: int,
    fit: ProbeFit | None = None,
    train_size: int = 0,
) -> None:
    """Refuse a job whose largest pack cannot fit in a worker's memory (or whose network is over the size bound),
    saying which batch size (and, for the MLP, which width) would: by the probe's measurements when it has
    them for the job's variants and batch sizes, else by the estimate of app.core.memory."""
    variants = spec.expanded_variants()
    if fit is not None:
        labels = [v.key() for v in variants]
        if fit.need(labels, max(spec.sizes()), job_pack(spec, settings)) is not None:
            why = fit.refusal(labels, spec.sizes(), job_pack(spec, settings), train_size)
            if why is not None:
                raise InvalidSpec(f"batch_sizes: {why}")
            return
    fed = catalogue.fed_shape(dataset.shape, spec.input.resize, spec.input.crop)  # checked by _validate
    shape = memory.JobShape(
        net=memory.network(
            arch,
            fed,
            dataset.num_classes,
            depth=spec.model.depth,
            width=spec.model.width,
            hidden=spec.model.hidden,
            layers=spec.model.layers,
            heads=spec.model.heads,
            levels=spec.model.levels,
        ),
        norms=tuple(sorted({v.norm for v in variants})),
        pack=job_pack(spec, settings),
        batch_size=max(spec.sizes()),
        val_size=val_size,
        dataset_bytes=memory.dataset_bytes(dataset.kind, dataset.shape, dataset.split_sizes),
    )
    mlp = memory.MlpBuilder(fed, dataset.num_classes) if arch == "mlp" else None
    try:
        memory.check_fits(shape, settings.worker_memory_bytes, mlp=mlp, hidden=spec.model.hidden)
    except catalogue.CatalogueError as e:
        raise InvalidSpec(f"model: {e}") from None


def _check_init(session: Session, owner: str, spec: JobSpec, arch: str) -> str | None:
    """The id of the weights a fine-tuning job starts from: the caller's, for the job's architecture (422
    otherwise, also for another owner's id); share-locked until the job commits, so no delete can race it."""
    if spec.init is None:
        return None
    row = weights_for_job(session, owner, spec.init.weights_id, arch)
    needy = sorted({v.norm for v in spec.variants if catalogue.NORMS[v.norm].needs_init})
    if needy and not row.has_bn_stats:
        raise InvalidSpec(
            f"variants: {', '.join(needy)} keep pretrained BatchNorm statistics, and weights '{row.id}' have none "
            "(trained without BatchNorm): drop those variants or upload BatchNorm weights"
        )
    return row.id


def create_job(session: Session, settings: Settings, owner: str, spec: JobSpec) -> Job:
    # In the transaction that inserts the job: the per-owner lock holds until commit.
    quotas.check_active_jobs(session, settings, owner)
    try:
        dataset = get_dataset(session, owner, spec.dataset_id, for_use=True)  # locked: no delete can race the job
    except NotFound as e:
        raise InvalidSpec(f"dataset_id: {e.detail}") from None
    spec, fit = _resolve_probe(session, settings, owner, spec, dataset)
    arch, budget = _validate(spec, dataset, settings, fit)
    weights_id = _check_init(session, owner, spec, arch)
    stored_spec = spec.model_dump(mode="json")
    stored_spec["model"]["arch"] = arch
    stored_spec["pack_size"] = spec.pack_size or settings.pack_size  # fixed now: the packs are part of the job
    job = Job(
        owner=owner, dataset_id=dataset.id, weights_id=weights_id, name=spec.name, spec=stored_spec, budget=budget
    )
    session.add(job)
    session.flush()
    runs = expand_runs(job, spec, spec.seeds, stored_spec["pack_size"])
    session.add_all(runs)
    session.commit()
    publish_committed(session, settings, [r.id for r in runs])
    return job


def _resolve_probe(
    session: Session, settings: Settings, owner: str, spec: JobSpec, dataset: Dataset
) -> tuple[JobSpec, ProbeFit | None]:
    """The probe a job uses (named, or with `"auto"` the newest matching one) and the spec with `"auto"`
    resolved: the powers of two from 2 up to the largest measured batch size that fits every variant at the
    job's pack (and the training split)."""
    auto = spec.batch_sizes == "auto"
    if not auto and spec.probe_id is None:
        return spec, None
    arch = resolve_arch(spec, dataset)
    probe = probe_fit.probe_for_job(session, owner, spec, arch, dataset.id)
    fit = ProbeFit.of(probe.id, probe.result or {})
    if not auto:
        return spec, fit
    labels = [v.key() for v in spec.expanded_variants()]
    train_size, _ = split_sizes(dataset, spec.validation_fraction)
    pack = job_pack(spec.model_copy(update={"batch_sizes": [2]}), settings)
    largest = fit.affordable(labels, pack, train_size)
    if largest < PROBE_FIRST_BATCH:
        why = fit.refusal(labels, [PROBE_FIRST_BATCH], pack, train_size) or "no batch size was measured to fit"
        raise InvalidSpec(f'batch_sizes "auto": {why}')
    sizes = [2**i for i in range(1, largest.bit_length()) if 2**i <= largest]
    return spec.model_copy(update={"batch_sizes": sizes, "probe_id": probe.id}), fit


def training_key(norm: str, params: dict[str, Any]) -> str:
    """Variants with one training key train the same computation, so they share packs: `bn_precise` trains
    exactly as `bn` (only its evaluation statistics differ). The torch-free twin of
    `workers.packing.train_signature`, which groups a pack's runs into vmapped groups the same way."""
    params = {k: v for k, v in params.items() if v is not None}
    if norm == "bn_precise":
        norm = "bn"
        params.pop("precise_samples", None)
    return catalogue.variant_label(norm, params)


def expand_runs(job: Job, spec: JobSpec, seeds: list[int], pack_size: int) -> list[Run]:
    """The runs of `seeds` (variants × batch sizes × seeds), each with its pack key: the runs of one batch
    size and training key, in seed order (then variant order), `pack_size` at a time. A function of the
    spec alone, so which runs share a pack never depends on which worker claims what when. Each pack's
    key names its batch size, training key and first run; keys are unique within the job (seeds are)."""
    variants = list(enumerate(spec.expanded_variants()))
    runs: list[Run] = []
    for b in spec.sizes():
        by_key: dict[str, list[Run]] = {}
        for s in sorted(seeds):
            for vi, v in variants:
                params = {k: val for k, val in v.params().items() if val is not None}
                run = Run(
                    job_id=job.id,
                    owner=job.owner,
                    variant=catalogue.variant_label(v.norm, v.params()),
                    variant_index=vi,
                    norm=v.norm,
                    norm_params=params,
                    batch_size=b,
                    seed=s,
                    status=RunStatus.QUEUED,
                )
                by_key.setdefault(training_key(v.norm, params), []).append(run)
        for key, members in by_key.items():
            for start in range(0, len(members), pack_size):
                pack = members[start : start + pack_size]
                first = pack[0]
                for run in pack:
                    run.pack_key = f"b{b}/{key}/s{first.seed}v{first.variant_index}"
                runs += pack
    return runs


def publish_committed(session: Session, settings: Settings, run_ids: list[str]) -> None:
    """Publish runs already committed as queued. Postgres is the referee: a run left unpublished
    (broker down, process killed here) keeps published_at NULL and a worker's reconciler publishes it."""
    published = []
    for run_id in run_ids:
        try:
            publish_train_run(settings, run_id)
        except Exception:
            log.exception("could not publish run %s; the reconciler will", run_id)
            break
        published.append(run_id)
    if published:
        run_repo.mark_published(session, published, utcnow())
        session.commit()


def get_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.scalars(select(Job).where(Job.id == job_id, Job.owner == owner)).first()
    if job is None:
        raise NotFound(f"job '{job_id}' not found; GET /v1/jobs lists your jobs")
    return job


def list_jobs(session: Session, owner: str, limit: int = 100) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.owner == owner).order_by(Job.created_at.desc()).limit(limit)))


@dataclass
class JobState:
    status: str
    counts: dict[str, int]
    runs_total: int
    runs_finished: int
    fraction: float
    started_at: datetime | None
    finished_at: datetime | None


def job_state(session: Session, job: Job) -> JobState:
    return job_states(session, [job])[job.id]


def job_states(session: Session, jobs: Sequence[Job]) -> dict[str, JobState]:
    """Each job's state from its run counts per (status, batch size): runs, steps done, first start, last
    finish; one grouped statement for all of them (ix_runs_job_id_status), so a list page is one query."""
    rows: dict[str, list[tuple[Any, ...]]] = {job.id: [] for job in jobs}
    if rows:
        query = (
            select(
                Run.job_id,
                Run.status,
                Run.batch_size,
                func.count(),
                func.sum(Run.steps_done),
                func.min(Run.started_at),
                func.max(Run.finished_at),
            )
            .where(Run.job_id.in_(list(rows)))
            .group_by(Run.job_id, Run.status, Run.batch_size)
        )
        for job_id, *counts in session.execute(query):
            rows[job_id].append(tuple(counts))
    return {job.id: state_from_counts(rows[job.id], job.budget, job.cancel_requested) for job in jobs}


@dataclass(frozen=True)
class JobStatusRow:
    """The job columns a status poll shows, as read by `read_job_status` (the spec still JSON text)."""

    id: str
    name: str | None
    dataset_id: str
    spec_json: str
    budget: dict[str, Any]
    created_at: datetime


# Built once: constructing a statement of this size costs more CPU than running it.
_STATUS_QUERY = (
    select(
        Job.id,
        Job.name,
        Job.dataset_id,
        cast(Job.spec, Text),
        cast(Job.budget, Text),
        Job.cancel_requested,
        Job.created_at,
        Run.status,
        Run.batch_size,
        func.count(Run.id),
        func.sum(Run.steps_done),
        func.min(Run.started_at),
        func.max(Run.finished_at),
    )
    .select_from(Job)
    .outerjoin(Run, Run.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.owner == bindparam("owner"))
    .group_by(Job.id, Run.status, Run.batch_size)
)


def read_job_status(session: Session | Connection, owner: str, job_id: str) -> tuple[JobStatusRow, JobState]:
    """The status poll's read, one statement: the job's columns beside its run counts per (status, batch size)
    (the job by primary key, its runs by ix_runs_job_id_status). The spec and budget come back as text, so each
    is parsed once rather than once per count row; nothing is loaded into an ORM session."""
    rows = session.execute(_STATUS_QUERY, {"job_id": job_id, "owner": owner}).all()
    if not rows:
        raise NotFound(f"job '{job_id}' not found; GET /v1/jobs lists your jobs")
    first = rows[0]
    budget = json.loads(first[4])
    job = JobStatusRow(
        id=first[0], name=first[1], dataset_id=first[2], spec_json=first[3], budget=budget, created_at=first[6]
    )
    counts = [r[7:] for r in rows if r[7] is not None]  # a job without runs joins one all-NULL row
    return job, state_from_counts(counts, budget, first[5])


def state_from_counts(
    rows: Sequence[Row[Any]] | Sequence[tuple[Any, ...]], budget: dict[str, Any], cancel_requested: bool
) -> JobState:
    counts: dict[str, int] = {}
    done_steps = all_steps = 0
    started: list[datetime] = []
    finished: list[datetime] = []
    for status, batch_size, n, steps, first_start, last_finish in rows:
        counts[status] = counts.get(status, 0) + n
        run_steps = total_steps(budget, batch_size)
        all_steps += run_steps * n
        done_steps += run_steps * n if status in TERMINAL else min(int(steps or 0), run_steps * n)
        if first_start:
            started.append(first_start)
        if last_finish:
            finished.append(last_finish)
    total = sum(counts.values())
    finished_runs = sum(n for s, n in counts.items() if s in TERMINAL)
    return JobState(
        status=_derive_status(counts, total, finished_runs, cancel_requested),
        counts=counts,
        runs_total=total,
        runs_finished=finished_runs,
        fraction=done_steps / all_steps if all_steps else 1.0,
        started_at=min(started) if started else None,
        finished_at=max(finished) if finished and finished_runs == total else None,
    )


def _derive_status(counts: dict[str, int], total: int, finished: int, cancel_requested: bool) -> RunStatus:
    """A job's status, derived from its runs': a diverged run is a result, so its job can still succeed."""
    running = counts.get(RunStatus.RUNNING)
    if finished < total:
        if cancel_requested:
            return RunStatus.RUNNING if running else RunStatus.CANCELLED
        return RunStatus.RUNNING if running or finished else RunStatus.QUEUED
    if counts.get(RunStatus.CANCELLED):
        return RunStatus.CANCELLED
    if counts.get(RunStatus.FAILED):
        return RunStatus.FAILED
    return RunStatus.SUCCEEDED


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """Queued runs end at once; running ones see the flag within seconds and stop."""
    job = get_job(session, owner, job_id)
    job.cancel_requested = True
    run_repo.cancel_queued(session, [job.id])
    session.commit()
    return job


def retry_job(session: Session, settings: Settings, owner: str, job_id: str, *, force: bool = False) -> Job:
    """Queue a finished job's failed and cancelled runs again; they resume from their last checkpoint.
    Succeeded and diverged runs are results and stay (a diverged run would diverge again: same seed).
    Runs that failed out of memory would fail again unchanged: only with `force` (the caller confirms)."""
    job = get_job(session, owner, job_id)
    busy = run_repo.count_active(session, job.id)
    if busy:
        raise Conflict(f"job '{job.id}' still has {busy} queued or running runs; retry once they have ended")
    run_ids = run_repo.retryable_runs(session, job.id)
    if not run_ids:
        raise Conflict(f"job '{job.id}' has no failed or cancelled runs to retry")
    out_of_memory = run_repo.resource_failures(session, job.id)
    if out_of_memory and not force:
        run_id, error = out_of_memory[0]
        raise Conflict(
            f"{len(out_of_memory)} of job '{job.id}'s runs failed out of memory (failure class resource; run "
            f"{run_id}: {error}); retried unchanged they would fail again. Submit the job again with a smaller "
            f"batch size, model or pack_size, or POST /v1/jobs/{job.id}/retry?force=true to retry anyway "
            "(e.g. once workers have more memory)"
        )
    quotas.check_active_jobs(session, settings, owner)
    job.cancel_requested = False
    run_repo.retry_runs(session, run_ids)
    session.commit()
    publish_committed(session, settings, run_ids)
    return job


def extend_job(session: Session, settings: Settings, owner: str, job_id: str, request: ExtendRequest) -> Job:
    """Add seeds to a job: one run per variant and batch size for each new seed, on the same budget and
    contract, queued and published. The new runs pack among themselves (their own pack keys: a pack that
    already trained is not reopened), and the stored spec lists the new seeds after the old ones.
    404 for a job that is not the caller's (or was deleted), 409 for a cancelled one (its new runs would be
    cancelled too: retry it first), 422 for seeds the job already has or a job that would outgrow its limits."""
    job = get_job(session, owner, job_id)
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update())  # one extend at a time per job
    session.refresh(job)
    if job.cancel_requested:
        raise Conflict(
            f"job '{job.id}' was cancelled (or is being deleted), so runs added to it would be cancelled too: "
            f"POST /v1/jobs/{job.id}/retry resumes it, then extend it"
        )
    spec = JobSpec.model_validate(job.spec)
    new_seeds = _new_seeds(spec.seeds, request)
    try:
        extended = JobSpec.model_validate({**job.spec, "seeds": [*spec.seeds, *new_seeds]})
    except ValidationError as e:
        problems = (f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise InvalidSpec("; ".join(problems)) from None
    dataset = get_dataset(session, owner, job.dataset_id, for_use=True)
    fit = None
    if extended.probe_id is not None:  # the probe that admitted the job, unless its dataset's probes went
        probe = session.get(Probe, extended.probe_id)
        fit = ProbeFit.of(probe.id, probe.result) if probe is not None and probe.result else None
    _validate(extended, dataset, settings, fit)  # the run and sample ceilings, for the job as extended
    if not run_repo.count_active(session, job.id):
        quotas.check_active_jobs(session, settings, owner)  # a finished job becomes active again
    job.spec = {**job.spec, "seeds": extended.seeds}
    runs = expand_runs(job, extended, new_seeds, spec.pack_size or settings.pack_size)
    session.add_all(runs)
    session.commit()
    publish_committed(session, settings, [r.id for r in runs])
    return job


def _new_seeds(current: list[int], request: ExtendRequest) -> list[int]:
    """The seeds an extend request adds: its own list, checked against the job's, or the smallest unused ones."""
    if request.seeds is None:
        taken, seed = set(current), 0
        out: list[int] = []
        while len(out) < (request.add_seeds or 0):
            if seed not in taken:
                out.append(seed)
            seed += 1
        return out
    repeated = sorted({s for s in request.seeds if s in current or request.seeds.count(s) > 1})
    if repeated:
        raise InvalidSpec(
            f"seeds {repeated} are already in the job (it has {sorted(current)}) or listed twice: give new seeds, "
            "or `add_seeds` to pick unused ones"
        )
    return list(request.seeds)
