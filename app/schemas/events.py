"""The events of a job's live progress stream (`GET /v1/jobs/{id}/events`): one model per event name."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from app.schemas.common import JobId
from app.schemas.runs import RunKey, StepsTaken, WallTime

EpochsTotal = Annotated[int, Field(description="Epochs in the job's budget.")]


class RunStarted(RunKey):
    """A worker claimed a run (sent again with a higher `attempt` when the run is retried)."""

    attempt: int = Field(description="Claim number: 1 on the first start, higher when a worker retried the run.")
    epochs_total: EpochsTotal


class EpochDone(RunKey):
    """A run recorded an epoch's metrics; sent once per (run, epoch): epochs a retried attempt redoes from its
    checkpoint are not sent again."""

    epoch: int = Field(description="Epochs completed, 1..`epochs_total`.")
    epochs_total: EpochsTotal
    val_acc: float | None = Field(description="Validation accuracy after this epoch, 0..1.")
    val_loss: float | None = Field(description="Validation cross-entropy after this epoch (null if not finite).")
    train_loss: float | None = Field(description="Mean training loss over this epoch (null if not finite).")


class RunFinished(RunKey):
    """A run reached a terminal state. Follows its `run_started` and `epoch_done` events; the only event of a
    run cancelled before it started."""

    status: str = Field(description="Terminal status: `succeeded`, `failed`, `diverged` or `cancelled`.")
    attempt: int = Field(description="Claim number of the attempt that ended it (0: cancelled before it started).")
    val_acc: float | None = Field(description="Final validation accuracy, 0..1 (null without a result).")
    val_loss: float | None = Field(description="Final validation cross-entropy (null without a finite result).")
    train_loss: float | None = Field(description="Final-epoch training loss (null without a finite result).")
    steps: StepsTaken
    wall_time_s: WallTime
    error: str | None = Field(description="Why a failed, diverged or cancelled run stopped.")


class JobFinished(BaseModel):
    """Every run of the job is terminal. The last event of a stream, which then closes."""

    job_id: JobId
    status: str = Field(description="Final job status: `succeeded`, `failed` or `cancelled` (as GET /v1/jobs/{id}).")
    runs_total: int = Field(description="Runs of the job.")
    runs_finished: int = Field(description="Runs in a terminal state (all of them).")
    counts: dict[str, int] = Field(description="Runs per status.")


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "run_started": RunStarted,
    "epoch_done": EpochDone,
    "run_finished": RunFinished,
    "job_finished": JobFinished,
}


def describe_events() -> str:
    """Markdown for the OpenAPI description: every event and its data fields, from the models."""
    lines = []
    for name, model in EVENT_MODELS.items():
        lines.append(f"- **`{name}`** — " + " ".join((model.__doc__ or "").split()))
        for field, info in model.model_fields.items():
            lines.append(f"    - `{field}`: {info.description}")
    return "\n".join(lines)
