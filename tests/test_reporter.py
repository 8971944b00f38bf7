"""The worker's reporter: a checkpoint file exists in storage only while a run row points to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.core.progress import Progress
from app.db import session_factory
from app.repositories.runs import Claim, StaleAttempt
from app.storage import settings_storage
from app.tables import Run, utcnow
from tests.factories import job_spec
from workers.checkpoint import Checkpoint
from workers.lease import Heartbeat
from workers.reporter import DbReporter


def _checkpoint(step: int) -> Checkpoint:
    return Checkpoint(
        model={"w": torch.zeros(3)},
        optimizer={"state": {}, "param_groups": []},
        epoch=1,
        batch=0,
        step=step,
        epoch_loss=0.0,
        window=[],
        elapsed=1.0,
    )


def _reporter(settings: Settings, run_id: str, attempt: int) -> DbReporter:
    claim = Claim(run_id, attempt, None)
    lease = Heartbeat(settings, [claim]).lease(run_id)  # not started: report() writes through the claim itself
    return DbReporter(settings, settings_storage(settings), claim, lease, abort=False)


def test_a_taken_over_attempt_leaves_no_checkpoint_file_behind(
    client: TestClient, settings: Settings, storage_dir: Path
) -> None:
    job = client.post("/v1/jobs", json=job_spec("digits")).json()
    with session_factory(settings.resolved_database_url)() as s:
        run_id = s.scalars(select(Run.id).where(Run.job_id == job["id"]).order_by(Run.id)).first()
        # Attempt 1's lease ran out and attempt 2 took the run over.
        s.execute(update(Run).where(Run.id == run_id).values(status="running", attempt=2, started_at=utcnow()))
        s.commit()
    files = storage_dir / "checkpoints" / str(run_id)

    with pytest.raises(StaleAttempt):
        _reporter(settings, str(run_id), 1).report([], Progress(40, 1, 80), _checkpoint(40))
    assert not files.exists() or not any(files.iterdir()), sorted(files.iterdir())

    # The holder's checkpoint is kept, and it is the file the row points to.
    _reporter(settings, str(run_id), 2).report([], Progress(40, 1, 80), _checkpoint(40))
    with session_factory(settings.resolved_database_url)() as s:
        uri = s.scalar(select(Run.checkpoint_uri).where(Run.id == run_id))
    assert uri is not None and [p.name for p in files.iterdir()] == ["attempt2-step40.pt"]
    assert uri.endswith("checkpoints/" + str(run_id) + "/attempt2-step40.pt")
