"""What a succeeded probe says about a job's memory: the measured per-run bytes of each variant and batch size,
interpolated between measured batch sizes (memory is affine in the batch), for the job's own pack. Admission
prefers this to the torch-free estimate (app.core.memory) whenever the probe measured the job's variants."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.units import human_bytes
from app.errors import InvalidSpec
from app.schemas.jobs import JobSpec
from app.schemas.probes import PROBE_FIRST_BATCH, ProbeRequest
from app.tables import Probe


@dataclass(frozen=True)
class ProbeFit:
    probe_id: str
    device: str
    limit: int
    margin: float
    resident: int
    # variant → sorted (batch size, run bytes) that ran; and the smallest batch size whose step failed
    measured: dict[str, list[tuple[int, int]]]
    failed_at: dict[str, int]

    @classmethod
    def of(cls, probe_id: str, result: dict[str, Any]) -> ProbeFit:
        measured: dict[str, list[tuple[int, int]]] = {}
        failed: dict[str, int] = {}
        for m in result["measurements"]:
            if m.get("run_bytes") is None:
                failed[m["variant"]] = min(failed.get(m["variant"], m["batch_size"]), m["batch_size"])
            else:
                measured.setdefault(m["variant"], []).append((int(m["batch_size"]), int(m["run_bytes"])))
        return cls(
            probe_id,
            str(result["device"]),
            int(result["memory_limit_bytes"]),
            float(result["memory_margin"]),
            int(result["resident_bytes"]),
            {v: sorted(points) for v, points in measured.items()},
            failed,
        )

    @property
    def allowed(self) -> int:
        return int(self.limit * (1 - self.margin))

    def run_bytes(self, variant: str, batch: int) -> float | None:
        """One run's bytes at `batch`: measured, interpolated between measured batch sizes, or extrapolated
        from the last two; inf at or past a batch size whose step failed; None when the probe cannot say."""
        if batch >= self.failed_at.get(variant, math.inf):
            return math.inf
        points = self.measured.get(variant, [])
        for (b0, y0), (b1, y1) in zip(points, points[1:], strict=False):
            if b0 <= batch <= b1:
                return y0 + (y1 - y0) * (batch - b0) / (b1 - b0)
        if len(points) == 1 and points[0][0] == batch:
            return points[0][1]
        if len(points) >= 2 and batch > points[-1][0]:
            (b0, y0), (b1, y1) = points[-2], points[-1]
            return y1 + (y1 - y0) * (batch - b1) / (b1 - b0)
        return None

    def need(self, variants: Sequence[str], batch: int, pack: int) -> float | None:
        """The worker's memory for a pack of `pack` runs of the hungriest variant at `batch`, or None."""
        per_run = [self.run_bytes(v, batch) for v in variants]
        if any(r is None for r in per_run):
            return None
        return self.resident + pack * max(r for r in per_run if r is not None)

    def affordable(self, variants: Sequence[str], pack: int, cap: int) -> int:
        """The largest measured power of two (≤ cap) at which every variant fits; 0 when none does."""
        best, batch = 0, PROBE_FIRST_BATCH
        while batch <= cap:
            if any(batch not in dict(self.measured.get(v, [])) for v in variants):
                break
            need = self.need(variants, batch, pack)
            if need is None or need > self.allowed:
                break
            best, batch = batch, batch * 2
        return best

    def refusal(self, variants: Sequence[str], batches: Sequence[int], pack: int, cap: int) -> str | None:
        """Why the job's largest batch does not fit per this probe; None when it fits (or the probe cannot say)."""
        batch = max(batches)
        need = self.need(variants, batch, pack)
        if need is None or need <= self.allowed:
            return None
        shown = (
            "more than the device has (a measured step ran out of memory)"
            if math.isinf(need)
            else human_bytes(int(need))
        )
        largest = self.affordable(variants, pack, cap)
        runs = f"{pack} runs trained together" if pack > 1 else "one run"
        return (
            f"probe '{self.probe_id}' measured on {self.device}: {runs} at batch size {batch} need about {shown}, "
            f"over the {human_bytes(self.allowed)} allowed ({human_bytes(self.limit)} less its "
            f"{self.margin:.0%} margin). "
            + (
                f"The largest batch size that fits every variant is {largest} (measured)."
                if largest
                else "No measured batch size fits every variant."
            )
        )


def mismatch(probe: Probe, spec: JobSpec, arch: str, dataset_id: str) -> str | None:
    """What differs between what the probe measured and what the job trains; None when it covers the job."""
    measured = ProbeRequest.model_validate(probe.spec)
    if probe.dataset_id != dataset_id:
        return f"it measured dataset '{probe.dataset_id}', the job trains on '{dataset_id}'"
    job_model = {**spec.model.model_dump(mode="json"), "arch": arch}
    if measured.model.model_dump(mode="json") != job_model:
        return f"it measured model {measured.model.model_dump(mode='json')}, the job has {job_model}"
    if measured.input != spec.input or measured.precision != spec.precision:
        return "its input (resize/crop) or precision differs from the job's"
    missing = sorted({v.key() for v in spec.expanded_variants()} - {v.key() for v in measured.expanded_variants()})
    if missing:
        return f"it did not measure variants {', '.join(missing)}"
    return None


def probe_for_job(session: Session, owner: str, spec: JobSpec, arch: str, dataset_id: str) -> Probe:
    """The caller's succeeded probe a job uses: the one it names, or with `"auto"` the newest that covers it."""
    if spec.probe_id is not None:
        probe = session.scalars(select(Probe).where(Probe.id == spec.probe_id, Probe.owner == owner)).first()
        if probe is None:
            raise InvalidSpec(f"probe_id: probe '{spec.probe_id}' not found; POST /v1/probes measures one")
        if probe.status != "succeeded":
            why = f" ({probe.error})" if probe.error else ""
            raise InvalidSpec(
                f"probe_id: probe '{probe.id}' is {probe.status}{why}; submit once GET /v1/probes/{probe.id} "
                "says succeeded"
            )
        why_not = mismatch(probe, spec, arch, dataset_id)
        if why_not:
            raise InvalidSpec(f"probe_id: probe '{probe.id}' does not cover this job: {why_not}")
        return probe
    rows = session.scalars(
        select(Probe).where(Probe.owner == owner, Probe.dataset_id == dataset_id).order_by(Probe.created_at.desc())
    )
    pending = None
    for probe in rows:
        if mismatch(probe, spec, arch, dataset_id) is not None:
            continue
        if probe.status == "succeeded":
            return probe
        if probe.status in ("queued", "running") and pending is None:
            pending = probe
    if pending is not None:
        raise InvalidSpec(
            f"batch_sizes \"auto\": probe '{pending.id}' of this job is still {pending.status}; submit again once "
            f"GET /v1/probes/{pending.id} says succeeded"
        )
    raise InvalidSpec(
        'batch_sizes "auto" needs a succeeded probe of this dataset, network, input and precision that measured '
        "every variant: POST /v1/probes with the job's dataset_id, model, variants, input and precision (or "
        "`normbench probe`), then submit again once it has succeeded"
    )
