"""End to end: API → Redis → a real Celery worker process → Postgres → results and curves."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from tests.factories import image_npz, image_zip, job_spec, upload, wait_for_job
from tests.support import WorkerProcess

pytestmark = pytest.mark.e2e


def check_finished_job(client: TestClient, job_id: str, epochs: int) -> dict:
    job = wait_for_job(client, job_id)
    results = client.get(f"/v1/jobs/{job_id}/results").json()
    assert job["status"] == "succeeded", results["runs"]
    assert results["complete"] and results["budget_equal"]
    assert all(r["status"] == "succeeded" for r in results["runs"])
    assert len({r["samples_seen"] for r in results["runs"]}) == 1
    for r in results["runs"]:
        assert 0.0 <= r["val_acc"] <= 1.0 and r["val_loss"] > 0 and r["train_loss"] > 0
        assert r["steps"] * r["batch_size"] == r["samples_seen"]
        assert r["device"] == "cpu" and r["torch_version"] and r["images_per_s"] > 0
    for cell in results["cells"]:
        assert cell["n"] == 1 and cell["val_acc"]["mean"] is not None
    for metric in ("val_acc", "val_loss", "train_loss", "lr"):
        curves = client.get(f"/v1/jobs/{job_id}/curves", params={"metric": metric}).json()
        assert len(curves["series"]) == len(results["runs"])
        assert all(len(s["points"]) == epochs for s in curves["series"]), metric
        assert all([p["epoch"] for p in s["points"]] == [1.0, 2.0] for s in curves["series"])
    step_curves = client.get(f"/v1/jobs/{job_id}/curves", params={"metric": "train_loss_step", "max_points": 3}).json()
    assert all(len(s["points"]) == min(3, s["total_points"]) for s in step_curves["series"])
    assert any(s["total_points"] > 3 for s in step_curves["series"])
    return results


def test_npz_and_zip_datasets_train_to_results(client: TestClient, worker: WorkerProcess) -> None:
    npz = upload(client, "bars.npz", image_npz()).json()
    zipped = upload(client, "shapes.zip", image_zip())
    assert zipped.status_code == 201, zipped.text
    assert zipped.json()["class_names"] == ["class_0", "class_1", "class_2"]
    jobs = [client.post("/v1/jobs", json=job_spec(ds["id"])).json()["id"] for ds in (npz, zipped.json())]
    results = check_finished_job(client, jobs[0], epochs=2)
    assert {(c["variant"], c["batch_size"]) for c in results["cells"]} == {
        ("bn", 2),
        ("gn(4)", 2),
        ("bn", 8),
        ("gn(4)", 8),
    }
    check_finished_job(client, jobs[1], epochs=2)
    run = client.get(f"/v1/runs/{results['runs'][0]['run_id']}").json()
    assert run["attempt"] == 1 and run["worker"] and run["environment"]["torch"]
    metrics = client.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
    assert [p["epoch"] for p in metrics["val_acc"]] == [1.0, 2.0]


def test_diverging_run_ends_diverged_with_the_step(client: TestClient, worker: WorkerProcess) -> None:
    spec = job_spec(
        "digits",
        model={"arch": "mlp"},
        variants=[{"norm": "none"}],
        batch_sizes=[8],
        optimizer={"lr": 10.0, "momentum": 0.9, "warmup_epochs": 0, "lr_scaling": "none"},
    )
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    job = wait_for_job(client, job_id)
    run = client.get(f"/v1/jobs/{job_id}/runs").json()[0]
    assert run["status"] == "diverged", run
    assert "non-finite" in run["error"] and "step" in run["error"]
    assert job["status"] == "succeeded"  # a diverged run is a result, not an infrastructure failure


def test_cancel_stops_a_running_job_within_seconds(client: TestClient, worker: WorkerProcess) -> None:
    spec = job_spec("digits", model={"arch": "mlp"}, batch_sizes=[2], budget={"epochs": 40})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["counts"]["running"] == 0:
        assert time.monotonic() < deadline, "no run started"
        time.sleep(0.2)
    cancelled_at = time.monotonic()
    client.post(f"/v1/jobs/{job_id}/cancel")
    job = wait_for_job(client, job_id, timeout=30)
    assert time.monotonic() - cancelled_at < 10
    assert job["status"] == "cancelled"
    assert job["progress"]["counts"]["cancelled"] == 2
