"""The affordable-batch probe: the traced CPU memory counter, the torch-free fit rules (interpolation, the
largest batch that fits, refusals), the API's validation and owner isolation, and end to end through a real
worker: a probe measures, then a job with `batch_sizes: "auto"` trains at the batch sizes it found."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, update

from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.services.probe_fit import ProbeFit
from app.tables import Probe, utcnow
from tests.factories import image_npz, job_spec, upload, wait_for_job
from tests.support import WorkerProcess
from workers.reconciler import reconcile_once

MIB = 2**20


def probe_request(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "model": {"arch": "cnn", "width": 8},
        "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 4}],
        "max_batch_size": 8,
        "steps": 1,
    }
    body.update(overrides)
    return body


def count_probes(settings: Settings) -> int:
    with create_engine(settings.resolved_database_url).connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Probe)) or 0)


# --- the CPU memory tracer ------------------------------------------------------------------------------------


def test_traced_bytes_count_new_storages_until_freed_and_not_views() -> None:
    torch = pytest.importorskip("torch")
    from workers.probe import LiveTensorBytes

    existing = torch.zeros(10_000)  # before tracing: never counted
    with LiveTensorBytes() as tracer:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # + 8000 = 12000 live: the peak
        v = a.view(10, 100)  # a view shares a's storage
        assert tracer.current == 12_000
        existing.add_(1)  # in place on an untraced tensor
        del a, v
        c = torch.empty(500)  # 8000 + 2000 live
        assert tracer.current == 10_000
    assert tracer.peak == 12_000
    del b, c


def test_traced_peak_grows_with_the_batch_and_covers_the_backward_pass() -> None:
    torch = pytest.importorskip("torch")
    from app.schemas.probes import ProbeRequest
    from tests.test_torchvision_archs import tiny_data
    from workers.probe import _run_config, measure_run

    data = tiny_data((3, 16, 16), n=32, classes=3)
    spec = ProbeRequest.model_validate(
        {"dataset_id": "x", "model": {"arch": "cnn", "width": 8}, "variants": [{"norm": "bn"}]}
    )
    budget = {"train_size": 32, "val_size": 4}
    small, step_s = measure_run(_run_config(spec, "bn", {}, 2, budget), data, torch.device("cpu"), 1)
    large, _ = measure_run(_run_config(spec, "bn", {}, 16, budget), data, torch.device("cpu"), 1)
    assert step_s > 0 and 0 < small < large
    # 14 extra samples' activations: at least the four conv outputs and their gradients, per sample.
    per_sample = 4 * (8 * 16 * 16 + 16 * 8 * 8 + 32 * 4 * 4)
    assert large - small >= 14 * per_sample


# --- what a probe's result says about a job (torch-free) ------------------------------------------------------


def result(rows: list[tuple[str, int, int | None]], limit: int = 100 * MIB, resident: int = 10 * MIB) -> dict[str, Any]:
    return {
        "device": "cpu",
        "memory_limit_bytes": limit,
        "memory_margin": 0.1,
        "resident_bytes": resident,
        "measurements": [{"variant": v, "batch_size": b, "run_bytes": rb} for v, b, rb in rows],
    }


def test_fit_interpolates_between_measured_batches_and_finds_the_affordable_one() -> None:
    rows = [("bn", 2, 4 * MIB), ("bn", 4, 8 * MIB), ("bn", 8, 16 * MIB), ("gn", 2, 5 * MIB), ("gn", 4, 10 * MIB)]
    fit = ProbeFit.of("p1", result(rows + [("gn", 8, None)]))  # gn's step at 8 ran out of memory
    assert fit.run_bytes("bn", 6) == 12 * MIB  # between 4 and 8
    assert fit.run_bytes("bn", 16) == 32 * MIB  # extrapolated from the last two
    assert fit.run_bytes("gn", 8) == float("inf") and fit.run_bytes("gn", 3) == 7.5 * MIB
    assert fit.run_bytes("frn", 2) is None  # not measured: the probe cannot say
    # allowed 90 MiB; resident 10: one bn run fits up to 80 MiB (batch 40), gn stops before 8.
    assert fit.affordable(["bn"], pack=1, cap=8) == 8 and fit.affordable(["bn", "gn"], pack=1, cap=64) == 4
    assert fit.affordable(["bn"], pack=4, cap=64) == 8  # 10 + 4 × 16 = 74 MiB ≤ 90
    assert fit.affordable(["bn"], pack=6, cap=64) == 4  # 10 + 6 × 16 = 106 MiB > 90 at batch 8
    assert fit.refusal(["bn"], [2, 4], pack=1, cap=64) is None
    why = fit.refusal(["bn", "gn"], [2, 8], pack=1, cap=64)
    assert why is not None and "ran out of memory" in why and "largest batch size that fits every variant is 4" in why


# --- the API ------------------------------------------------------------------------------------------------


def test_bad_probe_requests_are_4xx_and_store_nothing(client: TestClient, settings: Settings) -> None:
    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    cases = [
        (probe_request("nope"), "dataset_id: dataset 'nope' not found"),
        (probe_request(ds, max_batch_size=1), "max_batch_size"),
        (probe_request(ds, variants=[{"norm": "gn", "groups": 3}]), "groups=3"),
        (probe_request(ds, model={"arch": "cnn1d"}), "model.arch 'cnn1d' needs signal data"),
        (probe_request(ds, surprise=1), "surprise"),
        (probe_request(ds, variants=[{"norm": "bn"}, {"norm": "bn"}]), "distinct"),
        (probe_request(ds, memory_margin=0.95), "memory_margin"),
    ]
    for body, needle in cases:
        resp = client.post("/v1/probes", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert needle in resp.json()["detail"], resp.json()["detail"]
    assert client.get("/v1/probes/nope").status_code == 404
    assert count_probes(settings) == 0


def test_auto_batch_sizes_without_a_probe_say_how_to_get_one(client: TestClient) -> None:
    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    resp = client.post("/v1/jobs", json=job_spec(ds, batch_sizes="auto"))
    assert resp.status_code == 422 and "POST /v1/probes" in resp.json()["detail"], resp.text
    resp = client.post("/v1/jobs", json=job_spec(ds, batch_sizes=[2], probe_id="nope"))
    assert resp.status_code == 422 and "probe 'nope' not found" in resp.json()["detail"], resp.text
    assert client.post("/v1/jobs", json=job_spec(ds, batch_sizes="most")).status_code == 422
    queued = client.post("/v1/probes", json=probe_request(ds))  # no worker here: it stays queued
    assert queued.status_code == 202, queued.text
    resp = client.post("/v1/jobs", json=job_spec(ds, batch_sizes="auto"))
    assert resp.status_code == 422 and f"probe '{queued.json()['id']}' of this job is still queued" in resp.text


def test_a_probe_whose_worker_vanished_fails_with_a_reason(client: TestClient, settings: Settings) -> None:
    from datetime import timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from app.tables import utcnow

    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    pid = client.post("/v1/probes", json=probe_request(ds, max_seconds=60)).json()["id"]
    with Session(create_engine(settings.resolved_database_url)) as s:
        running = {"status": "running", "started_at": utcnow() - timedelta(seconds=60 + 300)}
        s.execute(update(Probe).where(Probe.id == pid).values(**running))
        s.commit()
        assert client.get(f"/v1/probes/{pid}").json()["status"] == "running"  # within its time and the grace
        s.execute(update(Probe).where(Probe.id == pid).values(started_at=utcnow() - timedelta(seconds=60 + 700)))
        s.commit()
    probe = client.get(f"/v1/probes/{pid}").json()
    assert probe["status"] == "failed" and "worker measuring it stopped" in probe["error"]
    assert probe["finished_at"] is not None


def test_probes_whose_worker_vanished_hold_no_quota_and_the_reconciler_fails_them(
    client: TestClient, settings: Settings
) -> None:
    quota = settings.max_active_probes_per_owner
    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    new = [client.post("/v1/probes", json=probe_request(ds, max_seconds=60)) for _ in range(quota + 1)]
    assert [r.status_code for r in new] == [202] * quota + [429]
    ids = [r.json()["id"] for r in new[:quota]]
    long_ago, just_now = utcnow() - timedelta(seconds=60 + 700), utcnow() - timedelta(seconds=5)
    with session_scope(settings.resolved_database_url) as s:  # every worker died; one probe is still measuring
        s.execute(update(Probe).where(Probe.id.in_(ids[1:])).values(status="running", started_at=long_ago))
        s.execute(update(Probe).where(Probe.id == ids[0]).values(status="running", started_at=just_now))
    with session_scope(settings.resolved_database_url) as s:
        assert reconcile_once(s, settings, lambda run_id: None)["probes_failed"] == quota - 1
    listed = {p["id"]: p for p in client.get("/v1/probes").json()["items"]}
    assert [listed[i]["status"] for i in ids] == ["running"] + ["failed"] * (quota - 1)
    assert all("worker measuring it stopped" in listed[i]["error"] for i in ids[1:])
    refill = [client.post("/v1/probes", json=probe_request(ds, max_seconds=60)) for _ in ids[1:]]
    assert [r.status_code for r in refill] == [202] * (quota - 1)  # the quota was freed
    with session_scope(settings.resolved_database_url) as s:  # the quota is full; one probe's worker dies
        s.execute(update(Probe).where(Probe.id == ids[0]).values(started_at=long_ago))
    post = client.post("/v1/probes", json=probe_request(ds, max_seconds=60))
    assert post.status_code == 202, post.text  # its own POST fails it first, so it holds no quota either


def test_the_reconciler_sends_a_lost_probe_task_again_with_the_runs_back_off(
    client: TestClient, settings: Settings
) -> None:
    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    lost, unsent = (client.post("/v1/probes", json=probe_request(ds)).json()["id"] for _ in range(2))
    start = utcnow()
    with session_scope(settings.resolved_database_url) as s:
        published = dict(s.execute(select(Probe.id, Probe.publish_count).where(Probe.id.in_([lost, unsent]))).all())
        assert published == {lost: 1, unsent: 1}  # the API records the task it sent
        s.execute(update(Probe).where(Probe.id == lost).values(published_at=start))  # the broker lost it
        s.execute(update(Probe).where(Probe.id == unsent).values(published_at=None, publish_count=0))  # API died
    sent: list[str] = []
    after = settings.republish_after_seconds

    def round_at(seconds: float) -> dict[str, int]:
        with session_scope(settings.resolved_database_url) as s:
            return reconcile_once(
                s, settings, lambda run_id: None, publish_probe=sent.append, now=start + timedelta(seconds=seconds)
            )

    assert round_at(1)["probes_published"] == 1 and sent == [unsent]  # never sent: at once
    assert round_at(after - 1)["probes_published"] == 0  # the lost one waits its back-off
    assert round_at(after + 1)["probes_published"] == 1 and sent == [unsent, lost]
    assert round_at(after + 2)["probes_published"] == 1 and sent == [unsent, lost, unsent]  # its back-off too
    assert round_at(3 * after + 1)["probes_published"] == 0  # a second republish waits twice as long
    assert round_at(3 * after + 2)["probes_published"] == 1 and sent[-1] == lost
    with session_scope(settings.resolved_database_url) as s:
        assert set(s.scalars(select(Probe.status).where(Probe.id.in_([lost, unsent])))) == {"queued"}


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    from pydantic import SecretStr

    from tests.test_auth import ADMIN, ADMIN_TOKEN

    keyed = settings.model_copy(update={"require_api_keys": True, "admin_token": SecretStr(ADMIN_TOKEN)})
    with TestClient(create_app(keyed)) as c:  # the `settings` fixture emptied api_keys
        keys = []
        for owner in ("alice", "bob"):
            resp = c.post("/v1/admin/keys", json={"owner": owner}, headers=ADMIN)
            keys.append({"Authorization": f"Bearer {resp.json()['token']}"})
        yield c, keys[0], keys[1]


def test_probes_are_owner_isolated(keyed: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    c, alice, bob = keyed
    ds = c.post("/v1/datasets", files={"file": ("bars.npz", image_npz())}, headers=alice).json()["id"]
    probe = c.post("/v1/probes", json=probe_request(ds), headers=alice)
    assert probe.status_code == 202, probe.text
    pid = probe.json()["id"]
    assert c.get(f"/v1/probes/{pid}", headers=alice).json()["status"] == "queued"
    assert c.get(f"/v1/probes/{pid}", headers=bob).status_code == 404
    assert c.get("/v1/probes", headers=bob).json()["items"] == []
    # bob can neither probe alice's dataset nor use alice's probe
    assert c.post("/v1/probes", json=probe_request(ds), headers=bob).status_code == 422
    resp = c.post("/v1/jobs", json=job_spec(ds, batch_sizes=[2], probe_id=pid), headers=bob)
    assert resp.status_code == 422, resp.text


# --- end to end -----------------------------------------------------------------------------------------------


def wait_for_probe(client: TestClient, probe_id: str, timeout: float = 180) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = client.get(f"/v1/probes/{probe_id}").json()
        if probe["status"] in ("succeeded", "failed"):
            return probe  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"probe {probe_id} did not finish in {timeout}s")


@pytest.mark.e2e
def test_auto_batch_sizes_come_from_a_probe_on_a_real_worker(client: TestClient, worker: WorkerProcess) -> None:
    ds = upload(client, "bars.npz", image_npz()).json()["id"]
    resp = client.post("/v1/probes", json=probe_request(ds))
    assert resp.status_code == 202 and resp.headers["location"] == f"/v1/probes/{resp.json()['id']}"
    probe = wait_for_probe(client, resp.json()["id"])
    assert probe["status"] == "succeeded", probe["error"]
    res = probe["result"]
    assert res["device"] == "cpu" and res["memory_method"] == "traced_tensor_bytes"
    assert "NORMBENCH_WORKER_MEMORY_BYTES" in res["memory_limit_source"]
    measured = {(m["variant"], m["batch_size"]): m for m in res["measurements"]}
    assert set(measured) == {(v, b) for v in ("bn", "gn(4)") for b in (2, 4, 8)}
    for v in ("bn", "gn(4)"):
        assert measured[(v, 2)]["run_bytes"] < measured[(v, 8)]["run_bytes"]
        assert all(measured[(v, b)]["images_per_s"] > 0 and measured[(v, b)]["fits"] for b in (2, 4, 8))
    assert res["affordable_batch_size"] == 8 and res["auto_batch_sizes"] == [2, 4, 8]

    job = client.post("/v1/jobs", json=job_spec(ds, batch_sizes="auto", budget={"epochs": 1}))
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["batch_sizes"] == [2, 4, 8] and job.json()["spec"]["probe_id"] == probe["id"]
    assert wait_for_job(client, job.json()["id"])["status"] == "succeeded"
    results = client.get(f"/v1/jobs/{job.json()['id']}/results").json()
    assert results["batch_sizes"] == [2, 4, 8]
    # Throughput and peak memory per run and per variant × batch size, measured on the worker.
    for run in results["runs"]:
        assert run["images_per_s"] > 0 and run["peak_memory_method"] == "process_peak_rss", run
        assert run["peak_memory_bytes"] > 50 * MIB and run["pack_runs"] == 1  # the worker process itself
    assert all(c["images_per_s"]["n"] == 1 and c["peak_memory_bytes"]["mean"] > 0 for c in results["cells"])
    report = client.get(f"/v1/jobs/{job.json()['id']}/report").text
    assert 'id="resources"' in report and "VmHWM" in report
    # A probe that measured a smaller network's memory does not cover this job: refused by what it lacks.
    resp = client.post("/v1/jobs", json=job_spec(ds, batch_sizes="auto", model={"arch": "cnn", "width": 16}))
    assert resp.status_code == 422 and "POST /v1/probes" in resp.json()["detail"]


@pytest.fixture
def live_url(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from tests.test_cli import serve

    monkeypatch.delenv("NORMBENCH_API_KEY", raising=False)

    yield from serve(settings)


@pytest.mark.e2e
def test_cli_probe_then_submit_auto(live_url: str, worker: WorkerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run

    common = ["--url", live_url]
    probe = [*common, "probe", "digits", "--variants", "bn,gn:4", "--arch", "mlp", "--max-batch-size", "8"]
    code, out, err = run(capsys, *probe, "--poll-interval", "0.2")
    assert code == 0, err
    assert "memory: traced_tensor_bytes" in out and "--batch-sizes auto → 2,4,8" in out, out
    assert len([line for line in out.splitlines() if line.endswith("  yes")]) == 6  # 2 variants × 3 batch sizes
    submit = [*common, "submit", "digits", "--variants", "bn,gn:4", "--arch", "mlp", "--batch-sizes", "auto"]
    code, out, err = run(capsys, *submit, "--seeds", "1", "--epochs", "1", "--poll-interval", "0.2")
    assert code == 0, err
    assert "6 runs on digits" in err and all(f"batch {b}" in out for b in (2, 4, 8))
