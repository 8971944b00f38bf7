"""Abuse cases of issue 15 kept as tests: DNS rebinding and cross-site writes against keys-off mode, binds that
argv does not show, delete/submit races, deleting jobs (and the quota messages that point to it), and
/metrics behind the admin token."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app import cli
from app.api import bind_check
from app.config import Settings, UnsafeBind, check_bind_safety, configured_bind_hosts
from app.core.progress import Point, Progress
from app.core.run_states import RunStatus
from app.db import session_factory
from app.main import create_app
from app.repositories.runs import StaleAttempt, finish_run, record_progress, renew_leases
from app.storage import open_storage
from app.tables import Dataset, Job, MetricPoint, Run, utcnow
from tests.factories import image_npz, job_spec, upload
from tests.support import ADMIN_TOKEN, ROOT, http_scope, keyed_settings, make_key, worker_env

LOCAL = "http://127.0.0.1:8000"  # the test client then reports a loopback server address, as uvicorn would


@pytest.fixture
def local_client(settings: Settings) -> Iterator[TestClient]:
    """Keys off, as a real server on 127.0.0.1:8000 sees requests (Host 127.0.0.1:8000, server address 127.0.0.1)."""
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return keyed_settings(settings)


def session(settings: Settings) -> Any:
    return session_factory(settings.resolved_database_url)()


def count(settings: Settings, table: type, *where: Any) -> int:
    with session(settings) as s:
        return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


# ------------------------------------------------------------------------------ item 4: DNS rebinding, CSRF


def test_keys_off_answers_only_loopback_host_names(local_client: TestClient) -> None:
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io:8000", "localhost.evil.example"):
        resp = local_client.get("/v1/datasets", headers={"Host": host})
        assert resp.status_code == 400, (host, resp.text)
        body = resp.json()
        assert body["error"] == "bad_host" and "DNS rebinding" in body["detail"]
        assert "NORMBENCH_ALLOWED_HOSTS" in body["detail"]
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"):
        assert local_client.get("/v1/datasets", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_are_configurable(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMBENCH_ALLOWED_HOSTS", "nb.internal, .lab.example")
    monkeypatch.setenv("NORMBENCH_ALLOWED_ORIGINS", "http://ui.lab.example:3000")
    from_env = Settings()
    assert from_env.allowed_hosts == ["nb.internal", ".lab.example"]
    assert from_env.allowed_origins == ["http://ui.lab.example:3000"]
    listed = settings.model_copy(update={"allowed_hosts": from_env.allowed_hosts})
    with TestClient(create_app(listed), base_url=LOCAL) as c:
        for host, status in (
            ("nb.internal:8000", 200),
            ("lab.example", 200),
            ("gpu1.lab.example:8000", 200),
            ("evil.example", 400),
            ("notlab.example", 400),
            ("localhost:8000", 400),  # an explicit list replaces the loopback default
        ):
            assert c.get("/healthz", headers={"Host": host}).status_code == status, host
    # Keys on: any host by default (a browser cannot attach the key by itself), the list when one is set.
    keyed = settings.model_copy(update={"require_api_keys": True})
    with TestClient(create_app(keyed), base_url=LOCAL) as c:
        assert c.get("/healthz", headers={"Host": "api.example.org"}).status_code == 200
    with TestClient(create_app(keyed.model_copy(update={"allowed_hosts": ["api.example.org"]}))) as c:
        assert c.get("/healthz", headers={"Host": "api.example.org"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_keys_off_refuses_cross_site_writes(local_client: TestClient, settings: Settings) -> None:
    job = local_client.post("/v1/jobs", json=job_spec("digits")).json()  # curl-like: no Origin
    evil = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # sandboxed frame or file:// page
        {"Origin": "http://127.0.0.1:9999"},  # another local service's page
        {"Origin": "http://localhost:8000"},  # not the origin this request was sent to
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ]
    for headers in evil:
        for method, path, kwargs in (
            ("POST", f"/v1/jobs/{job['id']}/cancel", {}),
            ("POST", "/v1/jobs", {"json": job_spec("digits")}),
            ("POST", "/v1/datasets", {"files": {"file": ("x.npz", image_npz())}}),
            ("DELETE", f"/v1/jobs/{job['id']}", {}),
        ):
            resp = local_client.request(method, path, headers=headers, **kwargs)
            assert resp.status_code == 403, (headers, method, path, resp.text)
            assert resp.json()["error"] == "cross_site_request" and "NORMBENCH_ALLOWED_ORIGINS" in resp.json()["detail"]
    assert count(settings, Job) == 1 and count(settings, Dataset, Dataset.owner.is_not(None)) == 0
    assert local_client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # not cancelled
    # Reads stay open (the browser's same-origin policy keeps their answers from other sites).
    assert local_client.get("/v1/jobs", headers={"Origin": "http://evil.example"}).status_code == 200
    # The API's own pages, and tools that send no Origin, can write.
    for headers in ({"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        assert local_client.post("/v1/jobs", json=job_spec("digits"), headers=headers).status_code == 202, headers
    resp = local_client.post(f"/v1/jobs/{job['id']}/cancel", headers={"Origin": LOCAL})
    assert resp.status_code == 200


def test_allowed_origins_may_write(settings: Settings) -> None:
    listed = settings.model_copy(update={"allowed_origins": ["http://ui.example:3000"]})
    with TestClient(create_app(listed), base_url=LOCAL) as c:
        ok = c.post("/v1/jobs", json=job_spec("digits"), headers={"Origin": "http://UI.example:3000"})
        assert ok.status_code == 202, ok.text
        assert c.post("/v1/jobs", json=job_spec("digits"), headers={"Origin": "http://ui.example"}).status_code == 403


def test_keys_on_do_not_judge_origins(keyed: Settings) -> None:
    """With keys on nothing is ambient: a cross-site page cannot attach the bearer key, so the key is the guard."""
    with TestClient(create_app(keyed)) as c:
        alice = make_key(c, "alice")
        resp = c.post("/v1/jobs", json=job_spec("digits"), headers=alice | {"Origin": "https://ui.example"})
        assert resp.status_code == 202, resp.text


def test_every_host_argument_and_the_bind_setting_are_judged(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = settings.model_copy(update={"require_api_keys": False})
    uvicorn_argv = ["uvicorn", "app.main:app", "--host", "127.0.0.1", "--host", "0.0.0.0"]
    assert configured_bind_hosts(off, uvicorn_argv) == ["0.0.0.0"]  # uvicorn uses the last one
    pinned = off.model_copy(update={"bind_host": "127.0.0.1"})
    assert configured_bind_hosts(pinned, ["uvicorn", "app.main:app", "--host", "0.0.0.0"]) == ["127.0.0.1", "0.0.0.0"]
    assert configured_bind_hosts(pinned, ["gunicorn", "app.main:app"]) == ["127.0.0.1"]
    for argv, unsafe in ((uvicorn_argv, off), (["uvicorn", "app.main:app", "--host=0.0.0.0"], pinned)):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(UnsafeBind, match="refusing to start"):
            check_bind_safety(unsafe)


def test_listening_sockets_are_read_from_proc() -> None:
    if bind_check.listening_addresses() is None:
        pytest.skip("no /proc on this system")
    with socket.socket() as lo, socket.socket() as everywhere:
        lo.bind(("127.0.0.1", 0))
        everywhere.bind(("0.0.0.0", 0))
        lo.listen()
        everywhere.listen()
        found = bind_check.listening_addresses() or set()
        assert ("127.0.0.1", lo.getsockname()[1]) in found
        assert ("0.0.0.0", everywhere.getsockname()[1]) in found
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6) as six:
            try:
                six.bind(("::1", 0))
            except OSError:
                return
            six.listen()
            assert ("::1", six.getsockname()[1]) in (bind_check.listening_addresses() or set())


def test_requests_are_refused_while_the_bound_socket_is_not_loopback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that arrives on 127.0.0.1 of a server bound to 0.0.0.0 is refused too."""
    app = create_app(settings)
    monkeypatch.setattr(bind_check, "listening_addresses", lambda: {("0.0.0.0", 8000)})
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        headers = [(b"host", b"127.0.0.1:8000")]
        scope = http_scope("GET", "/v1/datasets", headers, server=("127.0.0.1", 8000), client=("127.0.0.1", 5555))

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 403
    assert b"0.0.0.0:8000" in sent[1]["body"] and b"a socket this process listens on" in sent[1]["body"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_env(settings: Settings, **extra: str) -> dict[str, str]:
    return worker_env(
        NORMBENCH_DATABASE_URL=settings.resolved_database_url,
        NORMBENCH_STORAGE_URL=settings.resolved_storage_url,
        NORMBENCH_HOME=str(settings.home),
        **extra,
    )


@pytest.mark.parametrize(
    ("how", "extra_env"),
    [
        ("--host 127.0.0.1 --host 0.0.0.0", {}),
        ("--host 0.0.0.0 with NORMBENCH_BIND_HOST=127.0.0.1", {"NORMBENCH_BIND_HOST": "127.0.0.1"}),
        ('uvicorn.run(host="0.0.0.0")', {}),
    ],
)
def test_a_server_bound_to_all_interfaces_without_keys_does_not_serve(
    settings: Settings, how: str, extra_env: dict[str, str]
) -> None:
    """The three ways issue 15 started a keys-off API on 0.0.0.0: each now exits non-zero with the reason,
    and answers nothing but a refusal meanwhile."""
    port = _free_port()
    if how.startswith("uvicorn.run"):
        code = f"import uvicorn; uvicorn.run('app.main:app', host='0.0.0.0', port={port}, log_level='info')"
        cmd = [sys.executable, "-c", code]
    else:
        hosts = ["--host", "0.0.0.0"] if "BIND_HOST" in how else ["--host", "127.0.0.1", "--host", "0.0.0.0"]
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", *hosts, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_server_env(settings, **extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    answers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                answers.append(httpx.get(f"http://127.0.0.1:{port}/v1/datasets", timeout=2).status_code)
            time.sleep(0.05)
        assert proc.poll() is not None, "the server kept running"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode != 0, out
    assert "refusing to start" in out and "not a loopback address" in out, out
    assert set(answers) <= {403}, answers


def test_a_loopback_server_without_keys_keeps_serving(settings: Settings) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_server_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(2.5)  # past the socket watcher's first checks
        assert proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/v1/datasets", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ------------------------------------------------------------------------------------- item 5: races


def _race(c: TestClient, dataset_id: str) -> tuple[httpx.Response, httpx.Response]:
    """DELETE the dataset and POST a job on it at the same instant, from two threads."""
    barrier = threading.Barrier(2)
    got: dict[str, httpx.Response] = {}

    def act(name: str, method: str, path: str, **kwargs: Any) -> None:
        barrier.wait()
        got[name] = c.request(method, path, **kwargs)

    threads = [
        threading.Thread(target=act, args=("delete", "DELETE", f"/v1/datasets/{dataset_id}")),
        threading.Thread(target=act, args=("submit", "POST", "/v1/jobs"), kwargs={"json": job_spec(dataset_id)}),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return got["delete"], got["submit"]


def test_deleting_a_dataset_while_a_job_is_submitted_on_it_never_gives_5xx(settings: Settings) -> None:
    roomy = settings.model_copy(update={"max_active_jobs_per_owner": 1000})
    outcomes: list[tuple[int, int]] = []
    with TestClient(create_app(roomy)) as c:
        for _ in range(40):
            dataset_id = upload(c, "race.npz", image_npz(n_per_class=8)).json()["id"]
            d, j = _race(c, dataset_id)
            outcomes.append((d.status_code, j.status_code))
            assert d.status_code in (204, 409), d.text
            assert j.status_code in (202, 409, 422), j.text
            for resp in (d, j):
                if resp.status_code >= 400:
                    assert resp.json()["error"] in ("conflict", "invalid_spec") and resp.json()["detail"]
            # Exactly one of them won, and the database agrees.
            assert (d.status_code == 204) != (j.status_code == 202), (d.text, j.text)
            assert (c.get(f"/v1/datasets/{dataset_id}").status_code == 200) == (j.status_code == 202)
    assert all(d < 500 and j < 500 for d, j in outcomes)


# -------------------------------------------------------------------------------- item 6: deleting jobs


def _store_checkpoint(settings: Settings, run_id: str) -> str:
    src = settings.home / "ckpt.pt"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"checkpoint")
    return open_storage(settings.resolved_storage_url).put_file(f"checkpoints/{run_id}/attempt1-step8.pt", src)


def _set_runs(settings: Settings, job_id: str, **values: Any) -> list[str]:
    with session(settings) as s:
        ids = list(s.scalars(select(Run.id).where(Run.job_id == job_id).order_by(Run.id)))
        s.execute(update(Run).where(Run.job_id == job_id).values(**values))
        s.commit()
    return ids


def _uri_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_delete_job_removes_runs_points_and_checkpoints_then_frees_the_dataset(
    client: TestClient, settings: Settings
) -> None:
    dataset_id = upload(client, "d.npz", image_npz()).json()["id"]
    job = client.post("/v1/jobs", json=job_spec(dataset_id)).json()
    other = client.post("/v1/jobs", json=job_spec("digits")).json()
    run_ids = _set_runs(settings, job["id"], status="succeeded", finished_at=utcnow(), attempt=1)
    uris = []
    with session(settings) as s:
        for run_id in run_ids:
            uri = _store_checkpoint(settings, run_id)
            uris.append(uri)
            s.execute(update(Run).where(Run.id == run_id).values(checkpoint_uri=uri))
            s.add_all(MetricPoint(run_id=run_id, step=i, epoch=i / 4, name="train_loss", value=1.0) for i in range(8))
        s.commit()
    assert all(_uri_path(u).exists() for u in uris)
    resp = client.delete(f"/v1/datasets/{dataset_id}")
    assert resp.status_code == 409 and "delete its jobs first" in resp.json()["detail"]
    assert job["id"] in resp.json()["detail"] and "DELETE /v1/jobs/" in resp.json()["detail"]

    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert count(settings, Run, Run.job_id == job["id"]) == 0
    assert count(settings, MetricPoint, MetricPoint.run_id.in_(run_ids)) == 0
    assert not any(_uri_path(u).exists() for u in uris)
    assert client.get(f"/v1/jobs/{other['id']}").status_code == 200  # other jobs untouched
    assert count(settings, Run, Run.job_id == other["id"]) == 4
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204


def test_delete_job_is_owner_isolated(keyed: Settings) -> None:
    with TestClient(create_app(keyed)) as c:
        alice, bob = make_key(c, "alice"), make_key(c, "bob")
        job = c.post("/v1/jobs", json=job_spec("digits"), headers=alice).json()
        resp = c.delete(f"/v1/jobs/{job['id']}", headers=bob)
        assert resp.status_code == 404 and resp.json()["error"] == "not_found"
        assert c.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"  # not even cancelled
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 401
        assert c.delete(f"/v1/jobs/{job['id']}", headers=alice).status_code == 204


def test_delete_job_cancels_first_and_waits_for_running_runs(client: TestClient, settings: Settings) -> None:
    """Nothing is deleted under a live worker: its running run is asked to stop (409 meanwhile); once it has,
    the job goes, and every late write of that worker is a no-op, not an error."""
    job = client.post("/v1/jobs", json=job_spec("digits")).json()
    run_ids = _set_runs(settings, job["id"], status="queued")
    live, lost = run_ids[0], run_ids[1]
    lease = utcnow() + timedelta(seconds=60)
    with session(settings) as s:
        s.execute(update(Run).where(Run.id == live).values(status="running", attempt=1, lease_expires_at=lease))
        expired = utcnow() - timedelta(seconds=5)
        s.execute(update(Run).where(Run.id == lost).values(status="running", attempt=1, lease_expires_at=expired))
        s.commit()

    resp = client.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 409 and resp.json()["error"] == "conflict"
    assert "1 running run" in resp.json()["detail"] and "DELETE it again" in resp.json()["detail"]
    state = client.get(f"/v1/jobs/{job['id']}").json()
    assert state["progress"]["counts"]["cancelled"] == 2 and state["progress"]["counts"]["running"] == 2
    with session(settings) as s:
        assert renew_leases(s, [(live, 1)], 30.0) == {live: True}  # the worker learns it was cancelled
        assert finish_run(s, live, 1, RunStatus.CANCELLED, error="cancelled by user")

    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert count(settings, Run, Run.job_id == job["id"]) == 0
    # The lost worker of the expired run wakes up: its fenced writes change nothing and raise no database error.
    with session(settings) as s:
        with pytest.raises(StaleAttempt):
            record_progress(s, lost, 1, [Point(4, 0.5, "train_loss", 1.0)], Progress(4, 0, 8), lease_seconds=30.0)
        assert renew_leases(s, [(lost, 1)], 30.0) == {lost: None}
        assert not finish_run(s, lost, 1, RunStatus.SUCCEEDED, final_metrics={"val_acc": 1.0})
    assert count(settings, MetricPoint, MetricPoint.run_id == lost) == 0


def test_cli_jobs_rm_waits_for_running_runs(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=job_spec("digits")).json()
    run_id = _set_runs(settings, job["id"], status="queued")[0]
    with session(settings) as s:
        lease = utcnow() + timedelta(seconds=60)
        s.execute(update(Run).where(Run.id == run_id).values(status="running", attempt=1, lease_expires_at=lease))
        s.commit()

    def worker_stops() -> None:
        time.sleep(1.5)
        with session(settings) as s:
            finish_run(s, run_id, 1, RunStatus.CANCELLED, error="cancelled by user")

    stopper = threading.Thread(target=worker_stops)
    stopper.start()
    api = cli.Api("http://testserver", None, 30.0)
    api.client = client
    started = time.monotonic()
    cli.remove_job(api, job["id"], timeout=30)
    stopper.join()
    assert time.monotonic() - started >= 1.0
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    with pytest.raises(cli.CliError, match="not found"):
        cli.remove_job(api, job["id"], timeout=5)


def test_quota_messages_say_what_to_delete(keyed: Settings) -> None:
    tight = keyed.model_copy(update={"max_dataset_bytes_per_owner": 12_000, "max_active_jobs_per_owner": 1})
    with TestClient(create_app(tight)) as c:
        alice = make_key(c, "alice")
        first = c.post("/v1/datasets", files={"file": ("big.npz", image_npz())}, data={"name": "big"}, headers=alice)
        assert first.status_code == 201, first.text
        c.post("/v1/jobs", json=job_spec(first.json()["id"]), headers=alice)
        resp = c.post("/v1/datasets", files={"file": ("more.npz", image_npz())}, headers=alice)
        assert resp.status_code == 429, resp.text
        detail = resp.json()["detail"]
        assert f"'big' ({first.json()['id']}," in detail and "used by 1 job(s)" in detail
        assert "DELETE /v1/datasets/{id}" in detail and "DELETE /v1/jobs/{id}" in detail
        resp = c.post("/v1/jobs", json=job_spec("digits"), headers=alice)
        assert resp.status_code == 429 and "DELETE /v1/jobs/{id}" in resp.json()["detail"]


# ------------------------------------------------------------------------------------- item 8: /metrics


def test_metrics_need_the_admin_token_when_keys_are_on(keyed: Settings) -> None:
    with TestClient(create_app(keyed)) as c:
        alice = make_key(c, "alice")
        for headers in ({}, alice, {"Authorization": "Bearer wrong"}):
            resp = c.get("/metrics", headers=headers)
            assert resp.status_code == 401 and "NORMBENCH_ADMIN_TOKEN" in resp.json()["detail"], headers
        ok = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert ok.status_code == 200 and "normbench_jobs" in ok.text
    without_token = keyed.model_copy(update={"admin_token": None})
    with TestClient(create_app(without_token)) as c:
        resp = c.get("/metrics")
        assert resp.status_code == 404 and "NORMBENCH_METRICS_PUBLIC" in resp.json()["detail"]
    with TestClient(create_app(without_token.model_copy(update={"metrics_public": True}))) as c:
        assert c.get("/metrics").status_code == 200


def test_metrics_are_public_with_keys_off_unless_configured(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 200
    with TestClient(create_app(settings.model_copy(update={"metrics_public": False}))) as c:
        assert c.get("/metrics").status_code == 404


def test_settings_document_the_new_variables() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("NORMBENCH_ALLOWED_HOSTS", "NORMBENCH_ALLOWED_ORIGINS", "NORMBENCH_METRICS_PUBLIC"):
        assert name in readme, name
    assert "curl -X DELETE http://127.0.0.1:8000/v1/jobs/JOB_ID" in readme
