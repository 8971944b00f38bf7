"""HTTP API against the real Postgres and Redis (no worker: runs stay queued)."""

from __future__ import annotations

import re

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.config import Settings
from app.tables import Dataset, Job, Run
from tests.factories import image_npz, job_spec, npz_bytes, upload
from tests.support import stored_files


def count(settings: Settings, table: type) -> int:
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)))


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_digits_is_built_in(client: TestClient) -> None:
    items = client.get("/v1/datasets").json()["items"]
    digits = next(d for d in items if d["id"] == "digits")
    assert digits["builtin"] and digits["kind"] == "image"
    assert digits["shape"] == [1, 8, 8] and digits["num_classes"] == 10 and digits["num_samples"] == 1797


def test_upload_get_list_delete_npz(client: TestClient, settings: Settings) -> None:
    resp = upload(client, "bars.npz", image_npz(), name="bars")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert resp.headers["location"] == f"/v1/datasets/{ds['id']}"
    assert (ds["name"], ds["kind"], ds["shape"], ds["num_classes"], ds["num_samples"]) == (
        "bars",
        "image",
        [1, 8, 8],
        3,
        120,
    )
    assert client.get(f"/v1/datasets/{ds['id']}").json()["sha256"] == ds["sha256"]
    assert ds["id"] in {d["id"] for d in client.get("/v1/datasets").json()["items"]}
    before = len(stored_files(settings))
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert len(stored_files(settings)) == before - 1


def test_tabular_npz_and_csv(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    tab = upload(client, "tab.npz", npz_bytes(x=x, y=y)).json()
    assert (tab["kind"], tab["shape"], tab["num_classes"]) == ("tabular", [5], 2)
    csv = "a,b,species\n" + "\n".join(f"{i},{i * 2},{'cat' if i % 2 else 'dog'}" for i in range(10))
    resp = upload(client, "pets.csv", csv.encode(), label_column="species")
    assert resp.status_code == 201, resp.text
    assert resp.json()["class_names"] == ["cat", "dog"] and resp.json()["shape"] == [2]


def test_bad_upload_is_422_and_leaves_nothing(client: TestClient, settings: Settings) -> None:
    before_files, before_rows = stored_files(settings), count(settings, Dataset)
    x = np.zeros((10, 8, 8), np.uint8)
    resp = upload(client, "bad.npz", npz_bytes(x=x, y=np.zeros(9, np.int64)))
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_dataset" and "10" in resp.json()["detail"] and "9" in resp.json()["detail"]
    resp = upload(client, "notes.txt", b"hello")
    assert resp.status_code == 422 and ".npz" in resp.json()["detail"]
    assert stored_files(settings) == before_files and count(settings, Dataset) == before_rows


def test_upload_over_the_size_cap_is_413(settings: Settings) -> None:
    from app.main import create_app

    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small)) as c:
        before = stored_files(small)
        resp = upload(c, "big.npz", image_npz())
        assert resp.status_code == 413 and "limit" in resp.json()["detail"]
        assert stored_files(small) == before


def test_submit_expands_runs_and_reports_progress(client: TestClient, settings: Settings) -> None:
    resp = client.post("/v1/jobs", json=job_spec("digits", seeds=[0, 1, 2]))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["progress"]["runs_total"] == 2 * 2 * 3 and job["progress"]["counts"]["queued"] == 12
    assert job["budget"]["samples_per_epoch"] % 8 == 0
    runs = client.get(f"/v1/jobs/{job['id']}/runs").json()
    assert sorted({(r["variant"], r["batch_size"], r["seed"]) for r in runs}) == sorted(
        (v, b, s) for v in ("bn", "gn(4)") for b in (2, 8) for s in (0, 1, 2)
    )
    run = client.get(f"/v1/runs/{runs[0]['id']}").json()
    assert run["status"] == "queued" and run["attempt"] == 0
    assert client.get("/v1/jobs").json()["items"][0]["id"] == job["id"]
    results = client.get(f"/v1/jobs/{job['id']}/results").json()
    assert results["complete"] is False and "partial" in results["notes"][0]


def test_cancel_moves_queued_runs_to_cancelled(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=job_spec("digits")).json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "cancelled" and resp.json()["progress"]["counts"]["cancelled"] == 4


def test_dataset_in_use_cannot_be_deleted(client: TestClient) -> None:
    ds = upload(client, "bars.npz", image_npz()).json()
    client.post("/v1/jobs", json=job_spec(ds["id"]))
    resp = client.delete(f"/v1/datasets/{ds['id']}")
    assert resp.status_code == 409 and "job" in resp.json()["detail"]
    assert client.delete("/v1/datasets/digits").status_code == 409


def assert_422(client: TestClient, spec: dict, *needles: str) -> None:
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert set(body) == {"error", "detail"}
    for needle in needles:
        assert needle in body["detail"], body["detail"]


def test_bad_specs_are_422_with_actionable_messages(client: TestClient, settings: Settings) -> None:
    assert_422(client, job_spec("digits", variants=[{"norm": "batchnorm"}]), "unknown norm 'batchnorm'", "bn, gn")
    assert_422(client, job_spec("digits", variants=[{"norm": "gn", "groups": 3}]), "groups=3", "8 channels")
    assert_422(client, job_spec("digits", variants=[{"norm": "bn", "groups": 3}]), "does not take groups")
    assert_422(client, job_spec("digits", model={"arch": "mlp"}, variants=[{"norm": "in"}]), "spatial")
    assert_422(client, job_spec("digits", batch_sizes=[4096]), "exceed the training split")
    assert_422(client, job_spec("digits", budget={"epochs": 51}), "ceiling of 50")
    assert_422(client, job_spec("digits", model={"arch": "resnet", "depth": 10}), "6n+2")
    assert_422(client, job_spec("nope"), "dataset 'nope' not found")
    assert_422(client, {**job_spec("digits"), "colour": "red"}, "colour", "Extra inputs")
    assert_422(client, job_spec("digits", batch_sizes=[2, 2]), "distinct")
    assert_422(client, job_spec("digits", variants=[]), "variants")
    assert count(settings, Job) == 0 and count(settings, Run) == 0


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in (
        "/v1/jobs/missing",
        "/v1/jobs/missing/results",
        "/v1/jobs/missing/curves",
        "/v1/runs/missing",
        "/v1/runs/missing/metrics",
        "/v1/datasets/missing",
    ):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert resp.json()["error"] == "not_found"
    assert client.post("/v1/jobs/missing/cancel").status_code == 404


def test_openapi_describes_every_field(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    missing = [
        f"{name}.{field}"
        for name, schema in doc["components"]["schemas"].items()
        if not name.startswith(("HTTPValidationError", "ValidationError", "Body_"))
        for field, prop in schema.get("properties", {}).items()
        if "description" not in prop
    ]
    assert missing == []
    assert client.get("/docs").status_code == 200


def test_docs_pages_load_only_assets_this_server_serves(client: TestClient) -> None:
    """/docs (Swagger UI) and /redoc work without internet: no CDN, every file they name is served here."""
    for page, kinds in (("/docs", {"javascript", "css", "png"}), ("/redoc", {"javascript", "png"})):
        resp = client.get(page)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        html = resp.text
        assert "http://" not in html and "https://" not in html, f"{page} names another origin"
        assets = re.findall(r'(?:src|href)="([^"]*)"', html)
        spec_urls = re.findall(r"""(?:url: '|spec-url=")([^'"]*)""", html)
        assert spec_urls == ["/openapi.json"], page
        served = set()
        for url in assets:
            assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url!r} from elsewhere"
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, url
            served |= {k for k in kinds if k in asset.headers["content-type"]}
        assert served == kinds, f"{page} is missing some of {kinds}: {assets}"
    assert client.get("/openapi.json").status_code == 200


def test_gn_group_sweep_expands_into_variants(client: TestClient) -> None:
    spec = job_spec(
        "digits", variants=[{"norm": "bn"}, {"norm": "gn", "groups": [1, 2, 8]}, {"norm": "gn", "group_size": [4]}]
    )
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    runs = client.get(f"/v1/jobs/{resp.json()['id']}/runs").json()
    assert [r["variant"] for r in runs if r["batch_size"] == 2] == ["bn", "gn(1)", "gn(2)", "gn(8)", "gn(size=4)"]
    assert_422(client, job_spec("digits", variants=[{"norm": "gn", "groups": [2, 3]}]), "groups=3", "8 channels")
    assert_422(client, job_spec("digits", variants=[{"norm": "gn", "groups": [2, 2]}]), "distinct", "gn(2)")


def test_retry_requeues_failed_and_cancelled_runs_only(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=job_spec("digits", seeds=[0, 1])).json()
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 409  # runs are still queued
    client.post(f"/v1/jobs/{job['id']}/cancel")
    runs = client.get(f"/v1/jobs/{job['id']}/runs").json()
    engine = create_engine(settings.resolved_database_url)
    with engine.begin() as conn:  # one run had finished before the cancel: it must stay as it is
        conn.execute(Run.__table__.update().where(Run.id == runs[0]["id"]).values(status="succeeded"))
    resp = client.post(f"/v1/jobs/{job['id']}/retry")
    assert resp.status_code == 202, resp.text
    assert resp.json()["progress"]["counts"]["queued"] == 7 and resp.json()["progress"]["counts"]["cancelled"] == 0
    after = {r["id"]: r for r in client.get(f"/v1/jobs/{job['id']}/runs").json()}
    assert after[runs[0]["id"]]["status"] == "succeeded"
    assert all(r["error"] is None for i, r in after.items() if i != runs[0]["id"])
    assert client.post("/v1/jobs/missing/retry").status_code == 404


def test_prometheus_metrics_count_runs_by_status(client: TestClient) -> None:
    client.post("/v1/jobs", json=job_spec("digits"))
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in resp.text.splitlines() if not line.startswith("#"))
    assert lines['normbench_runs{status="queued"}'] == "4"
    assert lines["normbench_jobs"] == "1" and int(lines["normbench_datasets"]) >= 1


def test_job_list_shows_each_jobs_own_progress_in_one_query(client: TestClient, settings: Settings) -> None:
    """The list is the same JobOut per job as its own GET (progress from one grouped count query, not one per
    job), newest first, cut at `limit`."""
    from sqlalchemy import event, update
    from sqlalchemy.engine import Engine

    ids = [
        client.post("/v1/jobs", json=job_spec("digits", seeds=seeds)).json()["id"] for seeds in ([0], [0, 1], [0, 1, 2])
    ]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    with create_engine(settings.resolved_database_url).begin() as conn:  # a run of the first job part-way through
        run_id = conn.scalar(select(Run.id).where(Run.job_id == ids[0]).limit(1))
        conn.execute(update(Run).where(Run.id == run_id).values(status="running", steps_done=5, attempt=1))
    statements: list[str] = []
    engine = Engine  # every engine: the API's own pools
    listen = lambda *args: statements.append(args[2])  # noqa: E731 (conn, cursor, statement, ...)
    event.listen(engine, "before_cursor_execute", listen)
    try:
        listed = client.get("/v1/jobs").json()["items"]
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    mine = [item for item in listed if item["id"] in ids]
    assert [item["id"] for item in mine] == ids[::-1]
    for item in mine:
        own = client.get(f"/v1/jobs/{item['id']}").json()
        assert item["status"] == own["status"] and item["progress"] == own["progress"], item["id"]
    assert {item["status"] for item in mine} == {"queued", "cancelled", "running"}
    assert sum("FROM runs" in s for s in statements) == 1, statements
    assert [item["id"] for item in client.get("/v1/jobs?limit=2").json()["items"]] == ids[:0:-1]
    assert client.get("/v1/jobs?limit=0").status_code == 422
