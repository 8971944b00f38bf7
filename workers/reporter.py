"""Where a training run's reports go: progress, metric points and checkpoints, written through the run's
fencing token; and the checkpoint files in storage that a resumed attempt reads back."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from app.config import Settings
from app.core.progress import Point, Progress
from app.db import session_scope
from app.repositories.runs import Claim, StaleAttempt, record_progress
from app.storage import Storage, local_copy
from workers.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from workers.lease import Lease, LeaseLost
from workers.lifecycle import SHUTDOWN


class DbReporter:
    """The engine's `RunReporter` for one claimed run: stores what the run reports and tells it when to stop."""

    def __init__(self, settings: Settings, storage: Storage, claim: Claim, lease: Lease, abort: bool) -> None:
        self.settings, self.storage, self.claim, self.lease = settings, storage, claim, lease
        self.checkpoint_uri = claim.checkpoint_uri
        self.abort = abort

    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
        if self.abort and progress.step > 0:
            os._exit(137)  # fault-injection hook (tests only): die like an OOM-killed process
        uri = None
        if checkpoint is not None and (
            progress.epoch % self.settings.checkpoint_every_epochs == 0
            or SHUTDOWN.is_set()
            or checkpoint.final_metrics is not None
        ):
            uri = save_checkpoint(self.storage, self.claim, progress.step, checkpoint)
        try:
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
        except StaleAttempt:
            # No row points to the file just written (the run was taken over or its job deleted): remove it, or
            # it would stay in storage for good. Not on other errors: a commit may have landed unacknowledged.
            if uri is not None:
                self.storage.delete(uri)
            raise
        if uri is not None:
            if self.checkpoint_uri and self.checkpoint_uri != uri:
                self.storage.delete(self.checkpoint_uri)  # keep only the one the database points to
            self.checkpoint_uri = uri

    def stop_reason(self) -> str | None:
        """`cancelled` or `shutdown` when the run must stop; raises when it may no longer write at all."""
        if self.lease.superseded:
            raise StaleAttempt(f"run {self.claim.run_id} attempt {self.claim.attempt} was taken over")
        if self.lease.unreachable:
            raise LeaseLost(f"could not renew the lease of run {self.claim.run_id} for {self.settings.lease_seconds}s")
        if self.lease.cancelled:
            return "cancelled"
        if SHUTDOWN.is_set():
            return "shutdown"
        return None


def save_checkpoint(storage: Storage, claim: Claim, step: int, ckpt: Checkpoint) -> str:
    """Store the checkpoint under a name of its attempt and step (a stale attempt never overwrites a
    newer one); returns its URI."""
    with tempfile.TemporaryDirectory(prefix="normbench-ckpt-") as tmp:
        path = Path(tmp) / "ckpt.pt"
        write_checkpoint(ckpt, path)
        return storage.put_file(f"checkpoints/{claim.run_id}/attempt{claim.attempt}-step{step}.pt", path)


def load_checkpoint(storage: Storage, uri: str, device: torch.device) -> Checkpoint:
    # Remote storage: streamed to a temporary file, read, and removed.
    with local_copy(storage, uri) as path:
        return read_checkpoint(path, device)
