"""The affordable-batch probe: what a caller asks a worker to measure, and what it measured."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from app.schemas.common import SubmittedAt, UtcTimestamp
from app.schemas.jobs import InputSpec, ModelSpec, Strict, VariantSpec

# Powers of two from 2 up to `max_batch_size` (and the training split): what a probe measures, and what a job's
# `batch_sizes: "auto"` sweeps up to the largest that fits.
PROBE_FIRST_BATCH = 2


class ProbeRequest(Strict):
    """Measure, on a worker's own device, each variant's peak memory and step time at increasing batch sizes."""

    dataset_id: str = Field(max_length=64, description="Dataset whose shapes and classes the probe trains on.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network, as in a job's `model`.")
    variants: list[VariantSpec] = Field(
        min_length=1, max_length=32, description="Normalization variants to measure, as in a job's `variants`."
    )
    input: InputSpec = Field(
        default_factory=InputSpec, description="How images are fed (resize, crop), as in a job's `input`."
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training arithmetic, as in a job's `precision`.")
    validation_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Hold-out share when no `val` split was uploaded, as in a job (sizes the cap)."
    )
    max_batch_size: int = Field(
        256,
        ge=PROBE_FIRST_BATCH,
        le=4096,
        description="Largest batch size to measure. The probe measures the powers of two from 2 up to this (and "
        "the training split's size), per variant, and stops a variant at the first batch size that does not fit.",
    )
    steps: int = Field(3, ge=1, le=20, description="Timed training steps per measurement, after one untimed step.")
    memory_margin: float = Field(
        0.1,
        ge=0,
        le=0.9,
        description="Share of the memory limit kept free: a batch fits when the worker's resident memory plus "
        "`pack_size` runs' measured memory is at most (1 − margin) × the limit.",
    )
    pack_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Runs a job trains together, stacked, in one worker (a job's `pack_size`): the probe measures "
        "one run and counts this many for `fits`. Unset: the server's NORMBENCH_PACK_SIZE. A job that uses the "
        "probe recomputes the fit with its own pack.",
    )
    max_seconds: int = Field(
        300, ge=10, le=3600, description="Time limit of the probe on the worker; later measurements are skipped."
    )

    def expanded_variants(self) -> list[VariantSpec]:
        return [v for variant in self.variants for v in variant.expand()]

    @model_validator(mode="after")
    def _distinct_variants(self) -> ProbeRequest:
        keys = [v.key() for v in self.expanded_variants()]
        if len(set(keys)) != len(keys) or len(keys) > 32:
            raise ValueError("variants must be distinct and expand (sweeps included) to at most 32")
        return self


class ProbeMeasurement(BaseModel):
    variant: str = Field(description="Variant label, as in a job's results.")
    batch_size: int = Field(description="Batch size measured.")
    fits: bool = Field(
        description="resident + pack_size × run_bytes ≤ (1 − memory_margin) × memory_limit_bytes, and the step ran."
    )
    run_bytes: int | None = Field(
        description="Peak memory of one run over the worker's resident memory: its network state, optimizer and "
        "the activations of one training step (see `memory_method`); null when the step failed."
    )
    need_bytes: int | None = Field(description="resident_bytes + pack_size × run_bytes: what the pack would need.")
    step_s: float | None = Field(description="Seconds per training step (mean of `steps` timed steps).")
    images_per_s: float | None = Field(description="batch_size / step_s: training throughput of one run.")
    error: str | None = Field(None, description="Why the step failed (out of memory, …); null when it ran.")


class ProbeResult(BaseModel):
    device: str = Field(description="The worker's device, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.")
    threads: int = Field(description="Torch threads the worker used (CPU timings depend on them).")
    memory_method: Literal["cuda_max_memory_allocated", "traced_tensor_bytes"] = Field(
        description="How `run_bytes` was measured: on a GPU, torch.cuda.max_memory_allocated over building the "
        "run and its steps; on a CPU, the peak of live tensor storage bytes traced op by op (a TorchDispatchMode) "
        "over building the run and one training step — tensors only, not allocator slack."
    )
    memory_limit_bytes: int = Field(description="The memory a batch must fit in (before the margin).")
    memory_limit_source: str = Field(
        description="Where the limit comes from: the GPU's total memory, or on a CPU the configured worker budget "
        "NORMBENCH_WORKER_MEMORY_BYTES."
    )
    memory_margin: float = Field(description="Share of the limit kept free.")
    resident_bytes: int = Field(
        description="The worker's memory before any run: on a GPU, tensors allocated on the device (the dataset); "
        "on a CPU, the process's resident set (torch, Celery, the dataset)."
    )
    pack_size: int = Field(description="Runs counted per pack in `need_bytes` and `fits`.")
    measurements: list[ProbeMeasurement] = Field(description="One per variant and batch size measured.")
    largest_batch_size: dict[str, int] = Field(
        description="Per variant, the largest measured batch size that fits (0: none)."
    )
    affordable_batch_size: int = Field(
        description="The largest measured batch size that fits every variant (0: none): what `batch_sizes: "
        '"auto"` sweeps up to.'
    )
    auto_batch_sizes: list[int] = Field(
        description='What `batch_sizes: "auto"` resolves to with this probe: the powers of two from 2 up to '
        "`affordable_batch_size` (a job recomputes it with its own pack)."
    )
    skipped: list[str] = Field(description="Measurements left out (time limit), as `variant@batch`.")


class ProbeOut(BaseModel):
    id: str = Field(description="Probe id; a job names it in `probe_id`.")
    status: Literal["queued", "running", "succeeded", "failed"] = Field(description="Where the probe is.")
    dataset_id: str = Field(description="Dataset the probe measured on.")
    spec: ProbeRequest = Field(description="The validated request, with defaults filled and `model.arch` resolved.")
    result: ProbeResult | None = Field(description="The measurements, once succeeded.")
    error: str | None = Field(description="Why the probe failed.")
    created_at: SubmittedAt
    started_at: UtcTimestamp | None = Field(description="When a worker started measuring.")
    finished_at: UtcTimestamp | None = Field(description="When it finished.")
    links: dict[str, str] = Field(description="URLs of this probe.")


class ProbeList(BaseModel):
    items: list[ProbeOut] = Field(description="The caller's probes, newest first.")
