"""Results of a job: per-run finals, per-cell summaries, and curves."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas.runs import MetricPointOut


class RunResult(BaseModel):
    run_id: str = Field(description="Run id.")
    variant: str = Field(description="Variant label.")
    batch_size: int = Field(description="Training batch size.")
    seed: int = Field(description="Seed.")
    status: str = Field(description="Run status.")
    val_acc: float | None = Field(description="Final validation accuracy, 0..1.")
    val_loss: float | None = Field(description="Final validation cross-entropy.")
    train_loss: float | None = Field(description="Mean training loss over the last epoch.")
    steps: int = Field(description="Optimizer steps taken.")
    samples_seen: int = Field(description="Training samples consumed.")
    wall_time_s: float | None = Field(description="Training wall time in seconds.")
    images_per_s: float | None = Field(description="Training throughput, samples per second.")
    device: str | None = Field(description="Device the run trained on, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.")
    torch_version: str | None = Field(description="PyTorch version used.")
    error: str | None = Field(description="Reason for a failed, diverged or cancelled run.")


class Stat(BaseModel):
    mean: float | None = Field(description="Mean over the cell's finished seeds.")
    std: float | None = Field(description="Sample standard deviation over seeds (null with fewer than 2).")


class CellSummary(BaseModel):
    variant: str = Field(description="Variant label.")
    batch_size: int = Field(description="Batch size.")
    n: int = Field(description="Seeds with a final result (succeeded runs).")
    n_total: int = Field(description="Seeds requested.")
    diverged: int = Field(description="Seeds whose training diverged.")
    val_acc: Stat = Field(description="Final validation accuracy over seeds.")
    val_loss: Stat = Field(description="Final validation loss over seeds.")
    train_loss: Stat = Field(description="Final-epoch training loss over seeds.")


class Results(BaseModel):
    job_id: str = Field(description="Job id.")
    status: str = Field(description="Job status.")
    complete: bool = Field(description="False while runs are still queued or running: the numbers are partial.")
    variants: list[str] = Field(description="Variant labels in spec order.")
    batch_sizes: list[int] = Field(description="Batch sizes in spec order.")
    budget_equal: bool = Field(description="True when every succeeded run consumed the same number of samples.")
    notes: list[str] = Field(description="Caveats a reader should know (partial results, unequal budgets...).")
    runs: list[RunResult] = Field(description="One entry per run.")
    cells: list[CellSummary] = Field(description="Per (variant, batch size) mean and std over seeds.")


class CurveSeries(BaseModel):
    run_id: str = Field(description="Run id.")
    variant: str = Field(description="Variant label.")
    batch_size: int = Field(description="Batch size.")
    seed: int = Field(description="Seed.")
    total_points: int = Field(description="Points recorded before downsampling.")
    points: list[MetricPointOut] = Field(description="The (possibly downsampled) series in step order.")


class Curves(BaseModel):
    job_id: str = Field(description="Job id.")
    metric: str = Field(description="Metric name: val_acc, val_loss, train_loss, train_loss_step, lr, ...")
    series: list[CurveSeries] = Field(description="One series per run that has points.")
