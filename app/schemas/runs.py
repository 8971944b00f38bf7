"""Run resources and their metric points."""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from pydantic import BaseModel, Field

from app.schemas.common import UtcTimestamp

# Fields of a run that several run-level models share, with one meaning and one description.
RunId = Annotated[str, Field(description="Run id.")]
TrainingBatchSize = Annotated[int, Field(description="Training batch size.")]
RunSeed = Annotated[int, Field(description="Seed for initial weights and data order.")]
StepsTaken = Annotated[int, Field(description="Optimizer steps taken.")]
WallTime = Annotated[float | None, Field(description="Training wall time in seconds.")]


class RunKey(BaseModel):
    """Which run an item is about: the fields every per-run result, curve and event starts with."""

    run_id: RunId
    variant: str = Field(description="Variant label, e.g. `bn` or `gn(32)`.")
    batch_size: TrainingBatchSize
    seed: RunSeed


class KeyedRun(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def seed(self) -> int: ...


def run_key(run: KeyedRun) -> dict[str, Any]:
    """A run row's RunKey fields, to build any model that starts with them: `RunResult(**run_key(run), ...)`."""
    return {"run_id": run.id, "variant": run.variant, "batch_size": run.batch_size, "seed": run.seed}


class RunOut(BaseModel):
    id: RunId
    job_id: str = Field(description="Job the run belongs to.")
    variant: str = Field(description="Variant label, e.g. `bn` or `gn(16)`.")
    norm: str = Field(description="Normalization layer name.")
    norm_params: dict[str, Any] = Field(description="Parameters of the norm (`groups`/`group_size` for `gn`).")
    batch_size: TrainingBatchSize
    seed: RunSeed
    status: str = Field(description="queued, running, succeeded, failed, diverged or cancelled.")
    attempt: int = Field(description="How many times a worker claimed this run.")
    worker: str | None = Field(description="Worker that holds or last held the run.")
    created_at: UtcTimestamp = Field(description="When the run was created.")
    started_at: UtcTimestamp | None = Field(description="When training started.")
    finished_at: UtcTimestamp | None = Field(description="When the run reached a terminal state.")
    steps_done: int = Field(description="Optimizer steps taken so far.")
    samples_seen: int = Field(description="Training samples consumed so far.")
    epochs_done: int = Field(description="Epochs completed.")
    wall_time_s: WallTime
    final_metrics: dict[str, Any] | None = Field(description="Final metrics once the run ended.")
    environment: dict[str, Any] | None = Field(description="torch version, device, CUDA, threads.")
    error: str | None = Field(description="Why the run failed, diverged or was cancelled.")


class MetricPointOut(BaseModel):
    step: int = Field(description="Optimizer step at which the value was recorded.")
    epoch: float = Field(description="Epochs completed at that step (fractional between epochs).")
    value: float = Field(description="The metric's value.")


class RunMetrics(BaseModel):
    run_id: RunId
    metrics: dict[str, list[MetricPointOut]] = Field(description="Every recorded point, per metric name.")
