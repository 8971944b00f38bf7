"""Probe rules: validate a request against its dataset like a job's network, store it queued, publish the
worker task by name (app.queue), read it back owner-isolated."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.core import catalogue
from app.errors import InvalidSpec, NotFound, QuotaExceeded
from app.queue import publish_probe
from app.repositories import publishing
from app.repositories.probes import fail_queued, fail_stale
from app.schemas.probes import PROBE_FIRST_BATCH, ProbeRequest
from app.services import quotas
from app.services.datasets import get_dataset
from app.services.jobs import split_sizes, validate_network
from app.tables import Probe, utcnow

log = logging.getLogger(__name__)


def create_probe(session: Session, settings: Settings, owner: str, request: ProbeRequest) -> Probe:
    quotas.lock_owner(session, owner, "probes")
    fail_stale(session, utcnow(), owner=owner)  # a probe whose worker died holds no quota; committed below
    active = session.scalar(select(func.count()).where(Probe.owner == owner, Probe.status.in_(("queued", "running"))))
    limit = settings.max_active_probes_per_owner
    if (active or 0) >= limit:
        raise QuotaExceeded(
            f"you have {active} probes queued or running (the limit is {limit}); wait for one to "
            "finish (GET /v1/probes/{id})"
        )
    try:
        dataset = get_dataset(session, owner, request.dataset_id, for_use=True)
    except NotFound as e:
        raise InvalidSpec(f"dataset_id: {e.detail}") from None
    arch = request.model.arch if request.model.arch != "auto" else catalogue.AUTO_ARCH.get(dataset.kind, "cnn")
    validate_network(arch, dataset, request.model, request.variants, request.input)
    train_size, val_size = split_sizes(dataset, request.validation_fraction)
    if train_size < PROBE_FIRST_BATCH:
        raise InvalidSpec(f"the training split has {train_size} samples; a probe needs at least {PROBE_FIRST_BATCH}")
    spec = request.model_dump(mode="json")
    spec["model"]["arch"] = arch
    spec["pack_size"] = request.pack_size or settings.pack_size
    probe = Probe(
        owner=owner,
        dataset_id=dataset.id,
        spec=spec,
        budget={"train_size": train_size, "val_size": val_size},
        status="queued",
    )
    session.add(probe)
    session.commit()
    try:
        publish_probe(settings, probe.id)
    except Exception:
        log.exception("could not publish probe %s", probe.id)
        fail_queued(session, probe.id, "the task queue could not be reached to start the probe; POST it again")
    else:  # from now on the reconciler sends it again if the broker loses it
        publishing.mark_published(session, Probe, [probe.id], utcnow())
        session.commit()
    session.refresh(probe)
    return probe


def get_probe(session: Session, owner: str, probe_id: str) -> Probe:
    probe = session.scalars(select(Probe).where(Probe.id == probe_id, Probe.owner == owner)).first()
    if probe is None:
        raise NotFound(f"probe '{probe_id}' not found; GET /v1/probes lists your probes")
    if probe.status == "running" and fail_stale(session, utcnow(), probe_ids=[probe.id]):
        session.commit()
        session.refresh(probe)
    return probe


def list_probes(session: Session, owner: str, limit: int = 50) -> list[Probe]:
    if fail_stale(session, utcnow(), owner=owner):
        session.commit()
    return list(
        session.scalars(select(Probe).where(Probe.owner == owner).order_by(Probe.created_at.desc()).limit(limit))
    )
