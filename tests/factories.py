"""Small, learnable datasets generated in memory for tests, helpers to submit and wait, and finished
training fabricated in the database (no worker)."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from app.config import Settings
from app.db import session_factory
from app.repositories.runs import ordered_runs
from app.tables import MetricPoint, Run, utcnow


def pattern_images(
    n_per_class: int = 40, classes: int = 3, size: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×H×W images: class k is a bright bar at row band k, plus noise."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    band = size // classes
    for k in range(classes):
        img = rng.integers(0, 60, size=(n_per_class, size, size))
        img[:, k * band : (k + 1) * band, :] += 150
        xs.append(img)
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).clip(0, 255).astype(np.uint8), np.concatenate(ys).astype(np.int64)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def image_npz(**kw: Any) -> bytes:
    x, y = pattern_images(**kw)
    return npz_bytes(x=x, y=y)


def image_zip(n_per_class: int = 12, classes: int = 3) -> bytes:
    x, y = pattern_images(n_per_class=n_per_class, classes=classes, seed=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            png = io.BytesIO()
            Image.fromarray(img, mode="L").save(png, format="PNG")
            zf.writestr(f"shapes/class_{label}/{i}.png", png.getvalue())
    return buf.getvalue()


def upload(client: TestClient, filename: str, data: bytes, **form: str) -> Any:
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=form)


def job_spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset_id": dataset_id,
        "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 4}],
        "batch_sizes": [2, 8],
        "seeds": [0],
        "budget": {"epochs": 2},
        "model": {"arch": "cnn", "width": 8},
        "log_every_steps": 5,
    }
    spec.update(overrides)
    return spec


def wait_for_job(client: TestClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job = resp.json()
        if job["progress"]["runs_finished"] == job["progress"]["runs_total"]:
            return job  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def run_job(client: TestClient, spec: dict[str, Any], timeout: float = 180) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit `spec` (202), wait until every run has finished; the job and its /results."""
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    job = wait_for_job(client, resp.json()["id"], timeout)
    results = client.get(f"/v1/jobs/{job['id']}/results")
    assert results.status_code == 200, results.text
    return job, results.json()


@dataclass
class FakeRun:
    """What training would have written for one run: its status, other columns of its row, its metric points."""

    status: str
    columns: dict[str, Any] = field(default_factory=dict)
    points: list[tuple[str, int, float, float]] = field(default_factory=list)  # (name, step, epoch, value)

    def per_epoch(self, name: str, steps_per_epoch: int, values: list[float]) -> FakeRun:
        """Add `values` as the metric's epoch-end points from epoch 1 on."""
        self.points += [(name, steps_per_epoch * (e + 1), float(e + 1), v) for e, v in enumerate(values)]
        return self


def finish_job(settings: Settings, job_id: str, fake: Callable[[Run, int], FakeRun]) -> dict[tuple[str, int, int], str]:
    """Write what training would have written for every run of the job: `fake(run, position)` describes each
    run, taken in report order (batch size, variant, seed). Every run gets a start time and, unless it is
    still running, an end time. Returns the run ids by (variant label, batch size, seed)."""
    ids: dict[tuple[str, int, int], str] = {}
    with session_factory(settings.resolved_database_url)() as s:
        for position, run in enumerate(s.scalars(ordered_runs(job_id)).all()):
            ids[(run.variant, run.batch_size, run.seed)] = run.id
            made = fake(run, position)
            now = utcnow()
            times = {"started_at": now} | ({} if made.status == "running" else {"finished_at": now})
            s.execute(update(Run).where(Run.id == run.id).values(status=made.status, **(times | made.columns)))
            s.add_all(
                MetricPoint(run_id=run.id, name=name, step=step, epoch=epoch, value=value)
                for name, step, epoch, value in made.points
            )
        s.commit()
    return ids
