"""API keys, owner isolation on every endpoint, quotas, and the loopback rule for keys-off mode.

These tests build their own app with keys on (`keyed_client`); the shared `client` fixture keeps
serving everyone as the default owner, as the rest of the suite expects.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.config import Settings, UnsafeBind, check_bind_safety, configured_bind_host, is_loopback
from app.main import create_app
from app.tables import ApiKey, Dataset, Job, MetricPoint, Run
from tests import support
from tests.factories import image_npz, job_spec, npz_bytes, pattern_images
from tests.support import ADMIN_TOKEN, ROOT, stored_files, worker_env
from tests.test_weights import weights_bytes

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def keyed_settings(settings: Settings) -> Settings:
    return support.keyed_settings(settings)


@pytest.fixture
def keyed_client(keyed_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed_settings)) as c:
        yield c


def make_key(client: TestClient, owner: str) -> str:
    resp = client.post("/v1/admin/keys", json={"owner": owner, "name": f"{owner}'s key"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    return str(resp.json()["token"])


def count(settings: Settings, table: type) -> int:
    with create_engine(settings.resolved_database_url).connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)))


# ------------------------------------------------------------------------------------------- keys


def test_requests_without_a_valid_key_are_401(keyed_client: TestClient) -> None:
    token = make_key(keyed_client, "alice")
    prefix = token.split("_")[1]
    wrong_secret = f"nb_{prefix}_{'0' * 64}"
    for headers in ({}, bearer("not-a-key"), bearer(wrong_secret), {"Authorization": f"Basic {token}"}):
        resp = keyed_client.get("/v1/datasets", headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"] == "unauthorized" and "Authorization: Bearer" in resp.json()["detail"]
        assert resp.headers["www-authenticate"] == "Bearer"
    assert keyed_client.get("/v1/datasets", headers=bearer(token)).status_code == 200
    # Health probes stay open for orchestrators.
    assert keyed_client.get("/healthz").status_code == 200


def test_key_is_stored_only_as_a_hash_and_revocation_is_immediate(
    keyed_client: TestClient, keyed_settings: Settings
) -> None:
    created = keyed_client.post("/v1/admin/keys", json={"owner": "alice"}, headers=ADMIN).json()
    token, secret = created["token"], created["token"].split("_")[2]
    assert re.fullmatch(r"nb_[0-9a-f]{12}_[0-9a-f]{64}", token)
    with Session(create_engine(keyed_settings.resolved_database_url)) as s:
        row = s.scalars(select(ApiKey)).one()
        assert row.prefix == created["prefix"] and secret not in (row.secret_hash, row.prefix, row.name or "")
        assert len(row.secret_hash) == 64 and row.owner == "alice"
    listed = keyed_client.get("/v1/admin/keys", headers=ADMIN)
    assert listed.status_code == 200 and secret not in listed.text and "token" not in listed.json()["items"][0]
    assert keyed_client.get("/v1/jobs", headers=bearer(token)).status_code == 200
    assert keyed_client.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN).json()["revoked_at"]
    resp = keyed_client.get("/v1/jobs", headers=bearer(token))
    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]


def test_admin_endpoints_need_the_admin_token(keyed_client: TestClient, settings: Settings) -> None:
    alice = make_key(keyed_client, "alice")
    for headers in ({}, bearer(alice), bearer(ADMIN_TOKEN + "x")):
        resp = keyed_client.post("/v1/admin/keys", json={"owner": "mallory"}, headers=headers)
        assert resp.status_code == 401, resp.text
        assert keyed_client.get("/v1/admin/keys", headers=headers).status_code == 401
    bad = keyed_client.post("/v1/admin/keys", json={"owner": "../etc"}, headers=ADMIN)
    assert bad.status_code == 422
    # Without NORMBENCH_ADMIN_TOKEN the admin API does not exist; the CLI is the way.
    no_admin = settings.model_copy(update={"require_api_keys": True, "admin_token": None})
    with TestClient(create_app(no_admin)) as c:
        resp = c.get("/v1/admin/keys", headers=bearer(""))
        assert resp.status_code == 404 and "normbench-admin" in resp.json()["detail"]


def test_cli_creates_lists_and_revokes_keys(keyed_client: TestClient, keyed_settings: Settings) -> None:
    env = worker_env(NORMBENCH_DATABASE_URL=keyed_settings.resolved_database_url)

    def admin(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "app.admin", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = admin("create-key", "--owner", "carol", "--name", "laptop")
    token = next(line for line in out.splitlines() if line.startswith("nb_"))
    assert keyed_client.get("/v1/jobs", headers=bearer(token)).status_code == 200
    prefix = token.split("_")[1]
    listing = admin("list-keys", "--owner", "carol")
    assert prefix in listing and token.split("_")[2] not in listing
    admin("revoke-key", prefix)
    assert keyed_client.get("/v1/jobs", headers=bearer(token)).status_code == 401


def test_tokens_never_reach_the_logs(
    keyed_client: TestClient, keyed_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = make_key(keyed_client, "alice")
    secret = token.split("_")[2]
    keyed_client.get("/v1/datasets", headers=bearer(token))
    keyed_client.get("/v1/datasets", headers=bearer(token[:-1] + "0"))
    keyed_client.post("/v1/jobs", json=job_spec("digits", variants=[{"norm": "nope"}]), headers=bearer(token))
    revoked = keyed_client.get("/v1/admin/keys", headers=ADMIN).json()["items"][0]["id"]
    keyed_client.delete(f"/v1/admin/keys/{revoked}", headers=ADMIN)
    resp = keyed_client.get("/v1/datasets", headers=bearer(token))
    assert secret not in resp.text
    assert caplog.records, "expected the requests to log something at DEBUG"
    assert secret not in caplog.text and ADMIN_TOKEN not in caplog.text
    assert secret not in repr(keyed_settings) and ADMIN_TOKEN not in repr(keyed_settings)


# ------------------------------------------------------------------------------- owner isolation


def _operations(app: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (method, path template, operation) the app serves, from the OpenAPI document FastAPI builds
    from its routes, so an endpoint added later is walked without touching this test."""
    ops = []
    for path, item in app.openapi()["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path, op))
    return ops


def _fill(path: str, op: dict[str, Any], ids: dict[str, str]) -> tuple[str, dict[str, str]]:
    query: dict[str, str] = {}
    for param in op.get("parameters", []):
        name = param["name"]
        if param["in"] == "path":
            assert name in ids, f"the owner walk does not know how to fill path parameter {name!r} of {path}"
            path = path.replace("{" + name + "}", ids[name])
        elif param["in"] == "query" and param.get("required"):
            key = name.removesuffix("s") if name.endswith("_ids") else name
            assert key in ids, f"the owner walk does not know how to fill required query parameter {name!r} of {path}"
            query[name] = ids[key]
    return path, query


def _call(client: TestClient, method: str, path: str, *, read_ok_body: bool = True, **kwargs: Any) -> tuple[int, str]:
    """Status and body text of one request, streamed: a 200 of a never-ending stream (the job's Server-Sent
    Events while it runs) is not read unless `read_ok_body`; leaving the block cancels the request."""
    with client.stream(method, path, **kwargs) as resp:
        if resp.status_code == 200 and not read_ok_body:
            return resp.status_code, ""
        return resp.status_code, resp.read().decode(errors="replace")


def test_two_owners_walk_every_endpoint(keyed_client: TestClient, keyed_settings: Settings) -> None:
    alice, bob = bearer(make_key(keyed_client, "alice")), bearer(make_key(keyed_client, "bob"))
    resp = keyed_client.post(
        "/v1/datasets", files={"file": ("bars.npz", image_npz())}, data={"name": "alice-bars"}, headers=alice
    )
    assert resp.status_code == 201, resp.text
    dataset_id = resp.json()["id"]
    resp = keyed_client.post("/v1/jobs", json=job_spec(dataset_id), headers=alice)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    runs = keyed_client.get(f"/v1/jobs/{job_id}/runs", headers=alice).json()
    run_id = runs[0]["id"]
    with Session(create_engine(keyed_settings.resolved_database_url)) as s:  # something to read back
        for r in runs:
            for step in (1, 2):
                s.add(MetricPoint(run_id=r["id"], step=step, epoch=float(step), name="val_acc", value=0.5))
                s.add(MetricPoint(run_id=r["id"], step=step, epoch=float(step), name="train_loss", value=1.0))
        s.commit()
    resp = keyed_client.post(
        "/v1/weights",
        files={"file": ("w.safetensors", weights_bytes(stats=False, classes=None))},
        data={"arch": "mobilenet_v3_small"},
        headers=alice,
    )
    assert resp.status_code == 201, resp.text
    weights_id = resp.json()["id"]
    probe = {"dataset_id": dataset_id, "model": {"arch": "cnn", "width": 8}, "variants": [{"norm": "bn"}]}
    resp = keyed_client.post("/v1/probes", json=probe, headers=alice)  # queued: no worker here
    assert resp.status_code == 202, resp.text
    probe_id = resp.json()["id"]
    ids = {
        "dataset_id": dataset_id,
        "job_id": job_id,
        "run_id": run_id,
        "weights_id": weights_id,
        "probe_id": probe_id,
    }
    alice_ids = {dataset_id, job_id, weights_id, probe_id, *(r["id"] for r in runs)}
    # Bob's own job on the shared built-in dataset, so his lists are not trivially empty.
    assert keyed_client.post("/v1/jobs", json=job_spec("digits"), headers=bob).status_code == 202

    ops = [(m, p, op) for m, p, op in _operations(keyed_client.app) if p.startswith("/v1/") and "/admin/" not in p]
    assert len(ops) >= 12, ops
    walked = []
    for method, template, op in ops:
        path, query = _fill(template, op, ids)
        has_path_params = path != template
        if has_path_params:
            body = {} if "requestBody" in op else None
            status, text = _call(keyed_client, method, path, read_ok_body=False, params=query, json=body, headers=bob)
            allowed = {404} | ({422} if body is not None else set())
            assert status in allowed, f"bob {method} {path}: {status} {text[:300]}"
            assert json.loads(text)["error"] in ("not_found", "invalid_request")
        elif method == "GET":
            status, text = _call(keyed_client, "GET", path, params=query, headers=bob)
            assert status in (200, 404, 422), f"bob GET {path}: {status}"
            leaked = [i for i in alice_ids if i in text]
            assert not leaked, f"bob GET {path} shows alice's {leaked}"
        elif (method, template) == ("POST", "/v1/jobs"):
            resp = keyed_client.post("/v1/jobs", json=job_spec(dataset_id), headers=bob)
            assert resp.status_code == 422 and "not found" in resp.json()["detail"], resp.text
        elif (method, template) == ("POST", "/v1/probes"):
            resp = keyed_client.post("/v1/probes", json=probe, headers=bob)
            assert resp.status_code == 422 and "not found" in resp.json()["detail"], resp.text
        elif (method, template) in (("POST", "/v1/datasets"), ("POST", "/v1/weights")):
            continue  # creates bob's own upload; nothing of alice's is addressed
        else:
            pytest.fail(f"the owner walk does not know how to call {method} {template}; add it here")
        walked.append(f"{method} {template}")
        # Nobody may reach alice's objects without a key either.
        body = {} if "requestBody" in op else None
        status, _ = _call(keyed_client, method, path, read_ok_body=False, params=query, json=body)
        assert status == 401, f"anonymous {method} {path}: {status}"

    # Alice still sees and owns everything bob tried to touch (the ids filled above were real ones).
    for method, template, op in ops:
        if method != "GET":
            continue
        path, query = _fill(template, op, ids)
        status, text = _call(keyed_client, "GET", path, read_ok_body=False, params=query, headers=alice)
        assert status == 200, f"alice GET {path}: {status} {text[:300]}"
    job = keyed_client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["status"] == "queued" and job["progress"]["counts"]["cancelled"] == 0
    mine = {d["id"] for d in keyed_client.get("/v1/datasets", headers=bob).json()["items"]}
    assert "digits" in mine and dataset_id not in mine
    assert dataset_id in {d["id"] for d in keyed_client.get("/v1/datasets", headers=alice).json()["items"]}
    assert any("{job_id}" in w for w in walked) and any("{run_id}" in w for w in walked)


# ------------------------------------------------------------------------------------------ quotas


def test_dataset_bytes_quota_is_429_naming_the_limit(keyed_client: TestClient, keyed_settings: Settings) -> None:
    tight = keyed_settings.model_copy(update={"max_dataset_bytes_per_owner": 12_000})
    with TestClient(create_app(tight)) as c:
        alice = bearer(make_key(c, "alice"))
        first = c.post("/v1/datasets", files={"file": ("a.npz", image_npz())}, headers=alice)
        assert first.status_code == 201 and first.json()["size_bytes"] < 12_000
        files, rows = stored_files(tight), count(tight, Dataset)
        resp = c.post("/v1/datasets", files={"file": ("b.npz", image_npz())}, headers=alice)
        assert resp.status_code == 429, resp.text
        body = resp.json()
        assert body["error"] == "quota_exceeded" and "11.7 KiB" in body["detail"]
        assert "NORMBENCH_MAX_DATASET_BYTES_PER_OWNER" in body["detail"]
        assert stored_files(tight) == files and count(tight, Dataset) == rows
        # Another owner has a quota of their own.
        bob = bearer(make_key(c, "bob"))
        assert c.post("/v1/datasets", files={"file": ("b.npz", image_npz())}, headers=bob).status_code == 201


def test_active_jobs_quota_is_429_and_frees_up_on_cancel(keyed_settings: Settings) -> None:
    tight = keyed_settings.model_copy(update={"max_active_jobs_per_owner": 2})
    with TestClient(create_app(tight)) as c:
        alice = bearer(make_key(c, "alice"))
        jobs = [c.post("/v1/jobs", json=job_spec("digits"), headers=alice) for _ in range(2)]
        assert [j.status_code for j in jobs] == [202, 202]
        before = count(tight, Job), count(tight, Run)
        resp = c.post("/v1/jobs", json=job_spec("digits"), headers=alice)
        assert resp.status_code == 429 and resp.json()["error"] == "quota_exceeded"
        assert (
            "the limit is 2" in resp.json()["detail"] and "NORMBENCH_MAX_ACTIVE_JOBS_PER_OWNER" in resp.json()["detail"]
        )
        assert (count(tight, Job), count(tight, Run)) == before
        bob = bearer(make_key(c, "bob"))
        assert c.post("/v1/jobs", json=job_spec("digits"), headers=bob).status_code == 202
        c.post(f"/v1/jobs/{jobs[0].json()['id']}/cancel", headers=alice)
        assert c.post("/v1/jobs", json=job_spec("digits"), headers=alice).status_code == 202


def test_runs_and_budget_per_job_are_422_naming_the_limit(keyed_settings: Settings) -> None:
    tight = keyed_settings.model_copy(update={"max_runs_per_job": 3, "max_train_samples_per_job": 10_000})
    with TestClient(create_app(tight)) as c:
        alice = bearer(make_key(c, "alice"))
        resp = c.post("/v1/jobs", json=job_spec("digits"), headers=alice)  # 2 variants x 2 batch sizes
        assert resp.status_code == 422 and "4 runs" in resp.json()["detail"] and "limit is 3" in resp.json()["detail"]
        resp = c.post("/v1/jobs", json=job_spec("digits", batch_sizes=[8], budget={"epochs": 4}), headers=alice)
        assert resp.status_code == 422 and "limit is 10000" in resp.json()["detail"]
        assert count(tight, Job) == 0


def test_small_uploads_still_work_with_keys(keyed_client: TestClient) -> None:
    x, y = pattern_images(n_per_class=4)
    resp = keyed_client.post(
        "/v1/datasets", files={"file": ("t.npz", npz_bytes(x=x, y=y))}, headers=bearer(make_key(keyed_client, "d"))
    )
    assert resp.status_code == 201, resp.text


# ------------------------------------------------------------------------- loopback without keys


def test_keys_off_is_allowed_only_on_loopback(settings: Settings) -> None:
    off = settings.model_copy(update={"require_api_keys": False})
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind_safety(off, host)
    for host in ("0.0.0.0", "::", "", "192.168.1.20", "example.org"):
        with pytest.raises(UnsafeBind, match="NORMBENCH_REQUIRE_API_KEYS=true"):
            check_bind_safety(off, host)
        check_bind_safety(off.model_copy(update={"require_api_keys": True}), host)
    assert configured_bind_host(off, ["uvicorn", "app.main:app", "--host", "0.0.0.0"]) == "0.0.0.0"
    assert configured_bind_host(off, ["uvicorn", "app.main:app", "--host=::"]) == "::"
    assert configured_bind_host(off.model_copy(update={"bind_host": "10.0.0.1"}), []) == "10.0.0.1"


def test_uvicorn_on_all_interfaces_without_keys_refuses_to_start(settings: Settings) -> None:
    env = worker_env(NORMBENCH_DATABASE_URL=settings.resolved_database_url)
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "refusing to start" in out and "not a loopback address" in out and "NORMBENCH_REQUIRE_API_KEYS" in out


def test_keys_off_refuses_requests_that_arrive_on_a_public_address(settings: Settings) -> None:
    """Defence in depth for servers the start-up check cannot see (e.g. gunicorn -b 0.0.0.0)."""
    import asyncio

    app = create_app(settings)
    sent: list[dict[str, Any]] = []

    async def call(server: tuple[str, int]) -> int:
        sent.clear()
        scope = support.http_scope("GET", "/healthz", server=server, client=("203.0.113.9", 5555))

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return int(sent[0]["status"])

    assert asyncio.run(call(("192.0.2.10", 8000))) == 403
    assert b"loopback" in sent[1]["body"]
    assert asyncio.run(call(("127.0.0.1", 8000))) == 200
