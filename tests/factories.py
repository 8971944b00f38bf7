"""Small, learnable datasets generated in memory for tests, and helpers to submit and wait."""

from __future__ import annotations

import io
import time
import zipfile
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image


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
