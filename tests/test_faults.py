"""Fault injection with real processes: kill, freeze, duplicate, lose the broker, lose Postgres.

Workers here run with a 3 s lease, a 0.5 s heartbeat and a 0.5 s reconciler so recovery is quick.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.config import Settings
from app.main import create_app
from app.queue import publish_train_run
from app.tables import MetricPoint, Run
from tests.factories import job_spec, wait_for_job
from tests.support import WorkerProcess, wait_until, worker_env
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e
FAST = {
    "NORMBENCH_LEASE_SECONDS": "3",
    "NORMBENCH_HEARTBEAT_SECONDS": "0.5",
    "NORMBENCH_RECONCILE_SECONDS": "0.5",
    "NORMBENCH_REPUBLISH_AFTER_SECONDS": "3",
    "NORMBENCH_MAX_ATTEMPTS": "3",
}
EPOCHS, LOG_EVERY = 4, 20


class Workers:
    def __init__(self, tmp: Path, settings: Settings) -> None:
        self.tmp, self.settings, self.started = tmp, settings, []

    def start(self, name: str, **env: str) -> WorkerProcess:
        base = {
            "NORMBENCH_DATABASE_URL": self.settings.resolved_database_url,
            "NORMBENCH_BROKER_URL": self.settings.resolved_broker_url,
            "NORMBENCH_BROKER_KEY_PREFIX": self.settings.broker_key_prefix,
            "NORMBENCH_STORAGE_URL": self.settings.resolved_storage_url,
            "NORMBENCH_HOME": str(self.tmp / name),
            **FAST,
        }
        w = WorkerProcess(worker_env(**{**base, **env}), self.tmp / f"{name}.log")
        self.started.append(w)
        w.wait_ready()
        return w


@pytest.fixture
def workers(tmp_path: Path, settings: Settings) -> Iterator[Workers]:
    pool = Workers(tmp_path, settings)
    yield pool
    for w in pool.started:
        if w.proc.poll() is None:
            os.kill(w.proc.pid, signal.SIGCONT)
        w.stop()


def slow_spec(**overrides: Any) -> dict[str, Any]:
    """One run of about a second per epoch on this CPU (an MLP on digits at batch 2)."""
    spec = job_spec(
        "digits",
        model={"arch": "mlp"},
        variants=[{"norm": "bn"}],
        batch_sizes=[2],
        budget={"epochs": EPOCHS},
        log_every_steps=LOG_EVERY,
    )
    spec.update(overrides)
    return spec


def job_past_epoch_1(client: TestClient, workers: Workers, name: str) -> tuple[WorkerProcess, str]:
    """A worker called `name` and a slow_spec job it has trained for an epoch (so it holds a checkpoint)."""
    worker = workers.start(name)
    job_id = client.post("/v1/jobs", json=slow_spec()).json()["id"]
    wait_until(lambda: only_run(client, job_id)["epochs_done"] >= 1, 120, "epoch 1")
    return worker, job_id


def job_json(client: TestClient, job_id: str) -> dict[str, Any]:
    resp = client.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def only_run(client: TestClient, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}/runs").json()[0]


def assert_complete_curves(client: TestClient, settings: Settings, run: dict[str, Any]) -> None:
    metrics = client.get(f"/v1/runs/{run['id']}/metrics").json()["metrics"]
    assert [p["epoch"] for p in metrics["val_acc"]] == [1.0, 2.0, 3.0, 4.0]
    steps = [p["step"] for p in metrics["train_loss_step"]]
    assert steps == list(range(LOG_EVERY, run["steps_done"] + 1, LOG_EVERY))
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        dupes = conn.execute(
            select(MetricPoint.name, MetricPoint.step)
            .where(MetricPoint.run_id == run["id"])
            .group_by(MetricPoint.name, MetricPoint.step)
            .having(func.count() > 1)
        ).all()
    assert dupes == []


def test_kill_9_mid_epoch_resumes_from_checkpoint_on_a_new_worker(
    client: TestClient, settings: Settings, workers: Workers
) -> None:
    first, job_id = job_past_epoch_1(client, workers, "a")
    first.proc.kill()  # SIGKILL during epoch 2
    first.proc.wait()
    workers.start("b")
    job = wait_for_job(client, job_id, timeout=120)
    run = only_run(client, job_id)
    assert job["status"] == "succeeded" and run["status"] == "succeeded"
    assert run["attempt"] == 2
    steps_per_epoch = run["steps_done"] // EPOCHS
    assert run["environment"]["resumed_from_step"] == steps_per_epoch  # the epoch-1 checkpoint, not scratch
    assert_complete_curves(client, settings, run)


def test_frozen_worker_writes_nothing_after_another_took_over(
    client: TestClient, settings: Settings, workers: Workers
) -> None:
    frozen, job_id = job_past_epoch_1(client, workers, "frozen")
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    taker = workers.start("taker")
    wait_until(lambda: only_run(client, job_id)["attempt"] == 2, 90, "the second worker's claim")
    os.kill(frozen.proc.pid, signal.SIGCONT)
    wait_for_job(client, job_id, timeout=120)
    run = only_run(client, job_id)
    assert run["status"] == "succeeded" and run["attempt"] == 2
    assert run["worker"].endswith(f":{taker.proc.pid}")
    wait_until(lambda: b"was superseded" in frozen.log_path.read_bytes(), 90, "the frozen worker to notice")
    assert_complete_curves(client, settings, run)


def test_a_run_published_twice_trains_once(client: TestClient, settings: Settings, workers: Workers) -> None:
    pair = [workers.start("one"), workers.start("two")]
    job_id = client.post("/v1/jobs", json=slow_spec(budget={"epochs": 2})).json()["id"]
    run_id = only_run(client, job_id)["id"]
    publish_train_run(settings, run_id)  # the original and two duplicates: both workers get one
    publish_train_run(settings, run_id)
    wait_for_job(client, job_id, timeout=60)
    logs = lambda: b"".join(w.log_path.read_bytes() for w in pair)  # noqa: E731
    wait_until(lambda: logs().count(b"is not claimable") >= 2, 90, "both duplicates to be skipped")
    assert logs().count(b"trained to succeeded") == 1
    run = only_run(client, job_id)
    assert run["status"] == "succeeded" and run["attempt"] == 1


def test_reconciler_publishes_runs_the_api_never_published(settings: Settings, workers: Workers) -> None:
    dead_broker = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead_broker)) as api:
        job_id = api.post("/v1/jobs", json=slow_spec(budget={"epochs": 1}, seeds=[0, 1])).json()["id"]
        assert {r["status"] for r in api.get(f"/v1/jobs/{job_id}/runs").json()} == {"queued"}
        workers.start("reconciling")
        job = wait_for_job(api, job_id, timeout=90)
    assert job["status"] == "succeeded" and job["progress"]["counts"]["succeeded"] == 2


def test_a_run_that_kills_its_worker_fails_after_max_attempts_and_the_queue_drains(
    client: TestClient, workers: Workers
) -> None:
    doomed = client.post("/v1/jobs", json=slow_spec(name="doomed", budget={"epochs": 1})).json()["id"]
    healthy = client.post("/v1/jobs", json=slow_spec(budget={"epochs": 1})).json()["id"]
    env = {"NORMBENCH_FAULT_ABORT_JOB_NAME": "doomed", "NORMBENCH_MAX_ATTEMPTS": "2"}
    current = workers.start("w0", **env)
    deadline = time.monotonic() + 120
    while job_json(client, healthy)["progress"]["runs_finished"] < 1 or only_run(client, doomed)["status"] not in (
        "failed",
        "succeeded",
    ):
        assert time.monotonic() < deadline, only_run(client, doomed)
        if current.proc.poll() is not None:  # the supervisor restarts a dead worker, as compose would
            current = workers.start(f"w{len(workers.started)}", **env)
        time.sleep(0.2)
    run = only_run(client, doomed)
    assert run["status"] == "failed" and run["attempt"] == 2
    assert "lost" in run["error"] and "2 attempts" in run["error"]
    assert client.get(f"/v1/jobs/{healthy}").json()["status"] == "succeeded"


def test_sigterm_checkpoints_and_hands_the_run_back(client: TestClient, workers: Workers) -> None:
    leaving, job_id = job_past_epoch_1(client, workers, "leaving")
    time.sleep(0.3)
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=30) == 0
    run = only_run(client, job_id)
    assert run["status"] == "queued" and run["attempt"] == 1 and "shut down" in run["error"]
    handed_back_at = run["steps_done"]
    workers.start("next")
    job = wait_for_job(client, job_id, timeout=120)
    run = only_run(client, job_id)
    assert job["status"] == "succeeded" and run["attempt"] == 2 and run["error"] is None
    assert run["environment"]["resumed_from_step"] == handed_back_at > run["steps_done"] // EPOCHS


def test_cancel_lands_within_seconds_and_the_worker_takes_the_next_job(client: TestClient, workers: Workers) -> None:
    workers.start("w")
    job_id = client.post("/v1/jobs", json=slow_spec(seeds=[0, 1, 2], budget={"epochs": 20})).json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["counts"]["running"], 120, "a running run")
    client.post(f"/v1/jobs/{job_id}/cancel")
    started = time.monotonic()
    job = wait_for_job(client, job_id, timeout=10)
    assert time.monotonic() - started < 10 and job["status"] == "cancelled"
    assert job["progress"]["counts"]["cancelled"] == 3, job["progress"]
    next_job = client.post("/v1/jobs", json=slow_spec(budget={"epochs": 1})).json()["id"]
    assert wait_for_job(client, next_job, timeout=60)["status"] == "succeeded"


def test_a_run_out_of_memory_fails_alone_and_the_worker_takes_the_next_job(
    client: TestClient, settings: Settings, workers: Workers
) -> None:
    """A worker capped at 1 GiB (RLIMIT_DATA, NORMBENCH_WORKER_MEMORY_BYTES) gets a run whose state alone needs
    more (an MLP of 84 M parameters; the API, at 8 GiB, admits it): the run fails as class `resource` on its
    first attempt, retry refuses it unless forced, and the same worker process trains the next job."""
    capped = workers.start("capped", NORMBENCH_WORKER_MEMORY_BYTES=str(2**30))
    huge = client.post("/v1/jobs", json=slow_spec(model={"arch": "mlp", "hidden": [4096] * 6}, budget={"epochs": 1}))
    assert huge.status_code == 202, huge.text
    assert wait_for_job(client, huge.json()["id"], timeout=120)["status"] == "failed"
    run = only_run(client, huge.json()["id"])
    assert run["attempt"] == 1 and run["error"].startswith("out of memory"), run
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        assert conn.scalar(select(Run.failure_class).where(Run.id == run["id"])) == "resource"
    refused = client.post(f"/v1/jobs/{huge.json()['id']}/retry")
    assert refused.status_code == 409 and "out of memory" in refused.text and "force=true" in refused.text
    healthy = client.post("/v1/jobs", json=slow_spec(budget={"epochs": 1})).json()["id"]
    assert wait_for_job(client, healthy, timeout=90)["status"] == "succeeded"
    assert capped.proc.poll() is None and only_run(client, healthy)["worker"].endswith(f":{capped.proc.pid}")
    assert b"worker memory limited to 1073741824 bytes" in capped.log_path.read_bytes()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A private Redis server the test may restart, so the shared one is never touched."""
    port = 6391
    cmd = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL)]
    time.sleep(0.3)

    def restart() -> None:
        procs[-1].terminate()
        procs[-1].wait()
        time.sleep(0.5)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        time.sleep(0.3)

    restart.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
    yield restart
    procs[-1].terminate()
    procs[-1].wait()


def test_redis_restart_loses_no_run(settings: Settings, workers: Workers, own_redis: Any) -> None:
    local = settings.model_copy(update={"broker_url": own_redis.url})
    workers.settings = local
    with TestClient(create_app(local)) as api:
        workers.start("w")
        job_id = api.post("/v1/jobs", json=slow_spec(budget={"epochs": 1}, seeds=[0, 1, 2, 3])).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["counts"]["running"], 120, "a running run")
        own_redis()  # queued messages vanish with the broker; the running run keeps training
        job = wait_for_job(api, job_id, timeout=120)
        runs = api.get(f"/v1/jobs/{job_id}/runs").json()
    assert job["status"] == "succeeded" and {r["status"] for r in runs} == {"succeeded"}
    assert [r["attempt"] for r in runs] == [1, 1, 1, 1]  # none trained twice


def test_postgres_outage_is_reported_and_recovered(settings: Settings, workers: Workers) -> None:
    url = settings.resolved_database_url
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    proxy = TcpProxy(host_port.split(":")[0], int(host_port.split(":")[1]))
    via_proxy = settings.model_copy(update={"database_url": url.replace(host_port, f"127.0.0.1:{proxy.port}")})
    workers.settings = via_proxy
    try:
        with TestClient(create_app(via_proxy)) as api:
            workers.start("w")
            job_id = api.post("/v1/jobs", json=slow_spec()).json()["id"]
            wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["counts"]["running"], 120, "running")
            proxy.cut()
            started = time.monotonic()
            assert api.get("/readyz").status_code == 503
            resp = api.get(f"/v1/jobs/{job_id}")
            assert resp.status_code == 503 and resp.json()["error"] == "unavailable"
            assert time.monotonic() - started < 15  # answers, does not hang
            time.sleep(4.5)  # past the 3 s lease: the worker must stop training
            proxy.restore()
            job = wait_for_job(api, job_id, timeout=120)
            run = api.get(f"/v1/jobs/{job_id}/runs").json()[0]
        assert job["status"] == "succeeded" and run["attempt"] >= 2
        assert b"stopped: " in workers.started[0].log_path.read_bytes()  # gave the run up, did not hang
    finally:
        proxy.close()
