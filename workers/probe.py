"""The affordable-batch probe: a short measured training run per variant and batch size on this worker's device.

Each measurement builds the run exactly as the engine does (`workers.packing.PackGroup`, a pack of one, CUDA
graphs on a GPU) and times `steps` training steps after an untimed first one. Memory:

- GPU: `torch.cuda.max_memory_allocated` over building the run and its steps, less what was allocated before
  (the dataset); the limit is the device's total memory.
- CPU: there is no allocator counter, so the peak of live tensor storage bytes is traced op by op
  (`LiveTensorBytes`, a TorchDispatchMode) over building the run and its first step; the limit is the configured
  worker budget (NORMBENCH_WORKER_MEMORY_BYTES), and the process's resident set counts as already used.

A batch fits when resident + pack_size × run bytes ≤ (1 − margin) × limit; a variant stops at the first batch
size that does not fit (or whose step runs out of memory)."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from app.config import Settings, get_settings
from app.core.budget import resolve_budget
from app.core.progress import Point, Progress
from app.db import session_scope
from app.queue import PROBE_TASK
from app.repositories.probes import claim_probe, finish_probe
from app.schemas.jobs import AugmentSpec, OptimizerSpec, VariantSpec
from app.schemas.probes import PROBE_FIRST_BATCH, ProbeRequest
from app.storage import DatasetCache, settings_storage
from app.tables import Dataset, Probe
from workers.celery_app import celery_app
from workers.checkpoint import Checkpoint
from workers.data import DeviceData, load_device_data
from workers.engine import environment
from workers.graphs import graphs_unavailable
from workers.packing import Member, PackGroup
from workers.run_config import RunConfig
from workers.schedule import Schedule
from workers.tasks import pick_device, worker_name

log = logging.getLogger(__name__)


class LiveTensorBytes(TorchDispatchMode):
    """The peak of live tensor storage bytes while active: every op's new output storages are counted until
    they are freed (weak references, swept at each op). Views and in-place results share an input's storage and
    add nothing; tensors that existed before (the dataset) are not counted. Allocator slack and an op's internal
    workspace are not seen: a lower bound of the process's growth, exact for what tensors hold."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for dead in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(dead)[1]
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key is None or key in inputs or key in self.live:
                continue
            storage = t.untyped_storage()
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # a tensor without storage
        return None


class _Silent:
    """A reporter for the probe's runs: nothing is recorded, nothing stops them."""

    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
        return None

    def stop_reason(self) -> str | None:
        return None


def resident_bytes(device: torch.device) -> int:
    """What the worker holds before a run: device tensors on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:  # Linux: pages resident is the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_run(cfg: RunConfig, data: DeviceData, device: torch.device, steps: int) -> tuple[int, float]:
    """(peak bytes of one run over what was allocated before it, seconds per training step)."""
    member = Member(0, cfg, Schedule.of(cfg), _Silent(), None)
    cuda = device.type == "cuda"
    tracer = LiveTensorBytes()
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        group = PackGroup([member], data, device, graphs_unavailable(device))
        group.launch()  # the first step (a GPU captures its graph here): untimed
    else:
        with tracer:
            group = PackGroup([member], data, device, graphs_unavailable(device))
            group.launch()
    group.join()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        group.launch()
        group.join()
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    run_bytes = int(torch.cuda.max_memory_allocated(device)) - before if cuda else tracer.peak
    return run_bytes, step_s


def _run_config(spec: ProbeRequest, norm: str, params: dict[str, Any], batch: int, budget: dict[str, int]) -> RunConfig:
    return RunConfig(
        arch=spec.model.arch,
        norm=norm,
        norm_params=params,
        batch_size=batch,
        seed=0,
        budget=resolve_budget(budget["train_size"], budget["val_size"], 1, [batch]),
        model=spec.model.model_dump(),
        optimizer=OptimizerSpec().model_dump(),
        augment=AugmentSpec().model_dump(),
        precision=spec.precision,
        input=spec.input.model_dump(),
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Limits:
    """The memory a batch must fit in and what the worker already holds."""

    limit: int
    source: str
    resident: int
    margin: float
    pack: int
    deadline: float
    skipped: list[str] = field(default_factory=list)

    def need(self, run_bytes: int) -> int:
        return self.resident + self.pack * run_bytes

    def fits(self, run_bytes: int) -> bool:
        return self.need(run_bytes) <= (1 - self.margin) * self.limit


def measure_variant(
    spec: ProbeRequest,
    variant: VariantSpec,
    budget: dict[str, int],
    data: DeviceData,
    device: torch.device,
    limits: Limits,
) -> list[dict[str, Any]]:
    """One variant at batch sizes 2, 4, 8, … up to the cap, until one does not fit (or runs out of memory)."""
    label, norm = variant.key(), variant.norm
    params = {k: v for k, v in variant.params().items() if v is not None}
    out: list[dict[str, Any]] = []
    batch = PROBE_FIRST_BATCH
    while batch <= min(spec.max_batch_size, budget["train_size"]):
        if time.monotonic() > limits.deadline:
            limits.skipped.append(f"{label}@{batch}")
            batch *= 2
            continue
        row: dict[str, Any] = {"variant": label, "batch_size": batch, "fits": False, "error": None}
        row.update(run_bytes=None, need_bytes=None, step_s=None, images_per_s=None)
        out.append(row)
        try:
            run_bytes, step_s = measure_run(_run_config(spec, norm, params, batch, budget), data, device, spec.steps)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            break
        finally:
            _free(device)
        row.update(fits=limits.fits(run_bytes), run_bytes=run_bytes, need_bytes=limits.need(run_bytes))
        row.update(step_s=round(step_s, 6), images_per_s=round(batch / step_s, 2) if step_s > 0 else None)
        if not row["fits"]:
            break
        batch *= 2
    return out


def summarize(spec: ProbeRequest, rows: list[dict[str, Any]], limits: Limits) -> dict[str, Any]:
    """Per variant the largest measured batch that fits; the largest that fits every variant; `auto`'s sizes."""
    labels = [v.key() for v in spec.expanded_variants()]
    largest = {v: max((r["batch_size"] for r in rows if r["variant"] == v and r["fits"]), default=0) for v in labels}
    affordable, batch = 0, PROBE_FIRST_BATCH
    while all(any(r["variant"] == v and r["batch_size"] == batch and r["fits"] for r in rows) for v in labels):
        affordable, batch = batch, batch * 2
    return {
        "memory_limit_bytes": limits.limit,
        "memory_limit_source": limits.source,
        "memory_margin": limits.margin,
        "resident_bytes": limits.resident,
        "pack_size": limits.pack,
        "measurements": rows,
        "largest_batch_size": largest,
        "affordable_batch_size": affordable,
        "auto_batch_sizes": [2**i for i in range(1, affordable.bit_length())],
        "skipped": limits.skipped,
    }


def limits_for(settings: Settings, device: torch.device, spec: ProbeRequest, pack: int) -> Limits:
    if device.type == "cuda":
        limit, source = int(torch.cuda.get_device_properties(device).total_memory), "the GPU's total memory"
    else:
        limit, source = settings.worker_memory_bytes, "NORMBENCH_WORKER_MEMORY_BYTES (this CPU worker's budget)"
    deadline = time.monotonic() + spec.max_seconds
    return Limits(limit, source, resident_bytes(device), spec.memory_margin, pack, deadline)


def run_probe(settings: Settings, probe: Probe, dataset: Dataset, device: torch.device) -> dict[str, Any]:
    """Every variant's measurements on `device`, as a ProbeResult's fields."""
    spec = ProbeRequest.model_validate(probe.spec)
    storage = settings_storage(settings)
    local = DatasetCache.for_settings(settings).path(storage, dataset.storage_uri, dataset.sha256)
    data = load_device_data(local, dict(probe.budget), device)
    limits = limits_for(settings, device, spec, int(probe.spec.get("pack_size") or settings.pack_size))
    rows = [r for v in spec.expanded_variants() for r in measure_variant(spec, v, probe.budget, data, device, limits)]
    env = environment(device)
    memory_method = "cuda_max_memory_allocated" if device.type == "cuda" else "traced_tensor_bytes"
    return {
        "device": env["device"],
        "threads": env["threads"],
        "memory_method": memory_method,
        **summarize(spec, rows, limits),
    }


@celery_app.task(name=PROBE_TASK)
def probe_task(probe_id: str) -> str:
    settings = get_settings()
    url = settings.resolved_database_url
    with session_scope(url) as s:
        if not claim_probe(s, probe_id, worker_name()):
            log.info("probe %s is not queued (taken, finished or deleted)", probe_id)
            return "skipped"
        probe = s.get(Probe, probe_id)
        dataset = s.get(Dataset, probe.dataset_id) if probe is not None else None
        if probe is not None:
            s.expunge(probe)
        if dataset is not None:
            s.expunge(dataset)
    result, error = None, None
    try:
        if probe is None or dataset is None:
            raise LookupError("the probe or its dataset was deleted while it was queued")
        result = run_probe(settings, probe, dataset, pick_device())
    except Exception as e:  # recorded on the probe: the caller sees why
        log.exception("probe %s failed", probe_id)
        error = f"{type(e).__name__}: {e}"
    with session_scope(url) as s:
        finish_probe(s, probe_id, result=result, error=error)
    return "failed" if error else "succeeded"
