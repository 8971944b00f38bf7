"""Admission by memory (issue 15 item 1): the torch-free estimate against the real models, the 422 that says what
would fit, failure classes and retry's confirmation for out-of-memory runs, and streamed dataset statistics."""

from __future__ import annotations

import tracemalloc
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from torch.profiler import ProfilerActivity, profile

from app.config import Settings
from app.core import catalogue, memory
from app.core.budget import resolve_budget
from app.core.dataset_format import CanonicalDataset, save_canonical
from app.db import session_scope
from app.main import create_app
from app.repositories.runs import Claim, FailureClass, finish_run
from app.tables import Run
from models.nets import build_model
from tests.factories import job_spec
from workers import packing
from workers.data import ResidentData, channel_stats, load_device_data
from workers.outcomes import settle

# (arch, input shape, keyword arguments): odd sizes too, so every stride's rounding is exercised.
NETS: list[tuple[str, tuple[int, ...], dict[str, Any]]] = [
    ("mlp", (64,), {"hidden": [256, 128]}),
    ("mlp", (3, 7, 9), {"hidden": [33]}),
    ("cnn", (3, 16, 16), {"width": 16}),
    ("cnn", (1, 9, 7), {"width": 8}),
    ("resnet", (3, 16, 16), {"depth": 8, "width": 8}),
    ("resnet", (3, 11, 13), {"depth": 14, "width": 16}),
]


def norms_for(arch: str) -> list[str]:
    return [n for n, info in catalogue.NORMS.items() if arch != "mlp" or not info.needs_spatial]


@pytest.mark.parametrize(("arch", "shape", "kw"), NETS)
def test_parameter_counts_equal_the_real_models(arch: str, shape: tuple[int, ...], kw: dict[str, Any]) -> None:
    net = memory.network(arch, shape, 7, **kw)
    for norm in norms_for(arch):
        model = build_model(arch, shape, 7, norm, {}, **kw)
        assert net.parameters(norm) == sum(p.numel() for p in model.parameters()), norm
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        assert net.buffer_bytes(norm) == buffers, norm


def peak_bytes(fn: Callable[[], None]) -> int:
    """The most CPU memory torch held at once while `fn` ran, beyond what it held before (its profiler's
    allocation and free events, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("arch", "shape", "kw"), [NETS[0], NETS[2], NETS[4]])
def test_activation_estimate_bounds_the_measured_peak(arch: str, shape: tuple[int, ...], kw: dict[str, Any]) -> None:
    """Training (forward, loss, gradients of every parameter) and evaluation (forward only) at batch 32: the
    estimate is at least torch's measured peak and at most ACTIVATION_BOUND_FACTOR times it."""
    torch.manual_seed(0)
    batch, net = 32, memory.network(arch, shape, 10, **kw)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    for norm in norms_for(arch):
        model = build_model(arch, shape, 10, norm, {}, **kw)
        params = list(model.parameters())

        def train() -> None:
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # noqa: B023
            del grads

        def evaluate() -> None:
            with torch.no_grad():
                model.eval()  # noqa: B023
                model(x)  # noqa: B023
                model.train()  # noqa: B023

        train()  # warm: one-time allocations are not the step's
        measured = peak_bytes(train)
        estimate = batch * net.train_bytes_per_sample(norm) + net.fixed_train_bytes(norm) + 4 * net.parameters(norm)
        assert measured <= estimate <= memory.ACTIVATION_BOUND_FACTOR * measured, (norm, measured, estimate)
        measured = peak_bytes(evaluate)
        estimate = batch * net.eval_bytes_per_sample(norm) + net.fixed_eval_bytes(norm)
        assert measured <= estimate <= memory.ACTIVATION_BOUND_FACTOR * measured, (norm, measured, estimate)


def test_the_evaluation_chunk_is_the_engines() -> None:
    assert memory.EVAL_BATCH == packing.EVAL_BATCH


def test_the_estimate_grows_with_batch_pack_and_width() -> None:
    net = memory.network("cnn", (3, 32, 32), 10, width=16)
    job = memory.JobShape(net, ("bn", "gn"), pack=4, batch_size=64, val_size=16, dataset_bytes=10**6)
    base = memory.estimate(job).total
    assert memory.estimate(replace(job, batch_size=128)).total > base
    assert memory.estimate(replace(job, pack=8)).total > base
    assert memory.estimate(replace(job, net=memory.network("cnn", (3, 32, 32), 10, width=32))).total > base
    limit = memory.estimate(replace(job, batch_size=40)).total
    assert memory.largest_batch(job, limit) == 40


# --- the API refuses what cannot fit ---------------------------------------------------------------------


def digits_job(**overrides: Any) -> dict[str, Any]:
    return job_spec("digits", **{"variants": [{"norm": "bn"}], "seeds": [0], **overrides})


def test_a_job_that_cannot_fit_is_refused_with_the_largest_batch_that_fits(settings: Settings) -> None:
    """The worker memory is set so that batch 100 fits and 1,000 does not: the 422 names the largest batch size
    that fits, that one is accepted and one more is refused."""
    model = {"arch": "resnet", "depth": 8, "width": 32}
    with TestClient(create_app(settings)) as api:
        digits = api.get("/v1/datasets/digits").json()
    budget_val = round(digits["split_sizes"]["train"] * 0.1)
    net = memory.network("resnet", digits["shape"], digits["num_classes"], depth=8, width=32)
    ds_bytes = memory.dataset_bytes(digits["kind"], digits["shape"], digits["split_sizes"])
    job = memory.JobShape(net, ("bn",), pack=1, batch_size=1000, val_size=budget_val, dataset_bytes=ds_bytes)
    limit = memory.estimate(replace(job, batch_size=100)).total + 12345
    fits = memory.largest_batch(job, limit)
    assert 100 <= fits < 1000
    capped = settings.model_copy(update={"worker_memory_bytes": limit})
    with TestClient(create_app(capped)) as api:
        resp = api.post("/v1/jobs", json=digits_job(model=model, batch_sizes=[8, 1000]))
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert f"The largest batch size that fits is {fits}." in detail and "NORMBENCH_WORKER_MEMORY_BYTES" in detail
        assert api.post("/v1/jobs", json=digits_job(model=model, batch_sizes=[fits])).status_code == 202
        assert api.post("/v1/jobs", json=digits_job(model=model, batch_sizes=[fits + 1])).status_code == 422


def test_an_mlp_too_wide_is_refused_with_the_width_that_fits(settings: Settings) -> None:
    """The issue's case in small: an MLP whose state alone is over the worker's memory at any batch size."""
    capped = settings.model_copy(update={"worker_memory_bytes": 2**30})
    with TestClient(create_app(capped)) as api:
        resp = api.post("/v1/jobs", json=digits_job(model={"arch": "mlp", "hidden": [4096] * 4}, batch_sizes=[512]))
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert "No batch size fits" in detail and "MLP hidden widths up to" in detail
        width = int(detail.split("MLP hidden widths up to ")[1].split(" ")[0])
        assert 256 <= width < 4096
        ok = api.post("/v1/jobs", json=digits_job(model={"arch": "mlp", "hidden": [width] * 4}, batch_sizes=[512]))
        assert ok.status_code == 202, ok.text


def test_a_network_over_the_parameter_bound_is_refused(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json=digits_job(model={"arch": "resnet", "depth": 110, "width": 256}))
    assert resp.status_code == 422
    assert f"more than the limit of {catalogue.MAX_PARAMETERS:,}" in resp.json()["detail"]


# --- failure classes, and retry's confirmation ----------------------------------------------------------


def running_run(client: TestClient, settings: Settings) -> tuple[str, str]:
    job_id = client.post("/v1/jobs", json=digits_job(batch_sizes=[8])).json()["id"]
    run_id = client.get(f"/v1/jobs/{job_id}/runs").json()[0]["id"]
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Run).where(Run.id == run_id).values(status="running", attempt=1))
    return job_id, run_id


def failure(settings: Settings, run_id: str) -> tuple[str, str | None, str | None]:
    with session_scope(settings.resolved_database_url) as s:
        row = s.execute(select(Run.status, Run.failure_class, Run.error).where(Run.id == run_id)).one()
    return row[0], row[1], row[2]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (MemoryError("Unable to allocate 1.00 GiB"), "resource"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8192000000 bytes"),
            "resource",
        ),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "resource"),
        (ValueError("labels out of range"), "data"),
    ],
)
def test_settle_records_the_failure_class(
    client: TestClient, settings: Settings, error: BaseException, kind: str
) -> None:
    _, run_id = running_run(client, settings)
    assert settle(settings, Claim(run_id, 1, None), {}, error) == "failed"
    status, failure_class, message = failure(settings, run_id)
    assert (status, failure_class) == ("failed", kind)
    assert message is not None and message.startswith("out of memory" if kind == "resource" else "ValueError")


def test_a_diverged_run_is_class_divergence(client: TestClient, settings: Settings) -> None:
    _, run_id = running_run(client, settings)
    with session_scope(settings.resolved_database_url) as s:
        assert finish_run(s, run_id, 1, "diverged", error="loss became nan")  # type: ignore[arg-type]
    assert failure(settings, run_id)[:2] == ("diverged", FailureClass.DIVERGENCE)


def test_retry_refuses_resource_failures_unless_forced(client: TestClient, settings: Settings) -> None:
    job_id, run_id = running_run(client, settings)
    settle(settings, Claim(run_id, 1, None), {}, MemoryError("Unable to allocate 8.00 GiB"))
    refused = client.post(f"/v1/jobs/{job_id}/retry")
    assert refused.status_code == 409
    assert "out of memory" in refused.json()["detail"] and "force=true" in refused.json()["detail"]
    assert failure(settings, run_id)[0] == "failed"
    forced = client.post(f"/v1/jobs/{job_id}/retry", params={"force": "true"})
    assert forced.status_code == 202, forced.text
    assert failure(settings, run_id)[:2] == ("queued", None)


# --- dataset statistics stream in chunks ----------------------------------------------------------------


def test_channel_stats_match_the_whole_array() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (301, 3, 5, 7), dtype=np.uint8)
    mean, std = channel_stats(images, image=True)
    whole = images.astype(np.float64)
    np.testing.assert_allclose(mean.ravel(), whole.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std.ravel(), whole.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    assert mean.shape == std.shape == (1, 3, 1, 1)
    features = (rng.normal(size=(257, 11)) * 3 + 1e4).astype(np.float32)  # a large offset: no cancellation
    mean, std = channel_stats(features, image=False)
    np.testing.assert_allclose(mean.ravel(), features.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std.ravel(), features.astype(np.float64).std(axis=0, ddof=1), rtol=1e-5)


# Loading holds the stored arrays, their train/validation copies and one statistics chunk: about 2×, never the
# 4× of a float32 copy (6× counting the worker).
LOAD_BOUND = 2.5


def test_loading_a_dataset_needs_about_twice_its_stored_size(tmp_path: Path) -> None:
    n, shape = 3000, (3, 64, 64)
    rng = np.random.default_rng(1)
    ds = CanonicalDataset(
        kind="image",
        x=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        y=rng.integers(0, 10, n).astype(np.int64),
        class_names=[str(i) for i in range(10)],
    )
    path = tmp_path / "data.npz"
    save_canonical(ds, path)
    stored = ds.x.nbytes + ds.y.nbytes
    del ds
    budget = resolve_budget(n - 300, 300, 1, [10])
    tracemalloc.start()
    try:
        torch_peak = peak_bytes(lambda: load_device_data(path, budget, torch.device("cpu")))
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy's allocations (tracemalloc) and torch's (its profiler), each at its own peak: an upper bound.
    assert numpy_peak + torch_peak <= LOAD_BOUND * stored, (numpy_peak, torch_peak, stored)


def test_a_worker_holds_one_dataset_releasing_the_last_before_it_loads_the_next(tmp_path: Path) -> None:
    """The estimate counts one resident dataset: a worker must never hold the last job's beside the next one's."""
    alive_at_load: list[int] = []
    loaded: list[weakref.ref[Any]] = []

    class Held:  # stands in for the device tensors; only whether it is still referenced matters
        pass

    def load(path: Path, budget: dict[str, int], device: torch.device) -> Any:
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        held = Held()
        loaded.append(weakref.ref(held))
        return held

    resident = ResidentData(load)
    cpu, budget = torch.device("cpu"), {"train_size": 10, "val_size": 2}
    first = resident.get(tmp_path / "a.npz", "a" * 64, budget, cpu)
    assert resident.get(tmp_path / "a.npz", "a" * 64, budget, cpu) is first  # runs of a job share it
    del first
    resident.get(tmp_path / "b.npz", "b" * 64, budget, cpu)
    resident.get(tmp_path / "b.npz", "b" * 64, {**budget, "val_size": 3}, cpu)  # another split: another load
    assert alive_at_load == [0, 0, 0]
    assert [ref() is not None for ref in loaded] == [False, False, True]
