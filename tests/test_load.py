"""Load and exhaustion: a flood of one owner's polls and event streams against a real uvicorn process gets no
5xx and no hang while another owner's status polls stay fast; pool and thread exhaustion is a 503 with
Retry-After; the per-key limits answer 429; one poller per job serves all of its streams; finished jobs'
results are computed once, running jobs' never cached."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.api.lifespan import GC_THRESHOLDS
from app.api.rate_limit import KeyLimits
from app.config import Settings
from app.db import DatabaseBusy, _poll_threads, _PollThreads, run_in_db_thread, session_factory
from app.devserver import api_command
from app.main import create_app
from app.services import events as events_service
from app.services import keys
from app.services.results_cache import cache as results_cache
from app.tables import Run
from tests.factories import FakeRun, finish_job, job_spec
from tests.support import ROOT
from tests.test_cli import serve

SPEC = job_spec("digits", model={"arch": "mlp", "hidden": [32]}, batch_sizes=[8, 32], seeds=[0, 1, 2])


def keyed(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={"require_api_keys": True, **extra})


def make_keys(settings: Settings, *owners: str) -> list[str]:
    with session_factory(settings.resolved_database_url)() as s:
        return [keys.create_key(s, owner).token for owner in owners]


def running_job(client: TestClient, token: str | None = None) -> str:
    """A submitted job with one run held as running by a (pretend) worker, so it stays unfinished."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = client.post("/v1/jobs", json=SPEC, headers=headers)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    factory = session_factory(client.app.state.settings.resolved_database_url)  # type: ignore[attr-defined]
    with factory() as s:
        run_id = s.query(Run.id).filter(Run.job_id == job_id).order_by(Run.id).limit(1).scalar()
        s.execute(update(Run).where(Run.id == run_id).values(status="running", attempt=1, steps_done=10))
        s.commit()
    return job_id


# ---------------------------------------------------------------------------- exhaustion is a 503, not a 500


def test_a_pool_timeout_is_a_503_with_retry_after(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*_: Any, **__: Any) -> Any:
        raise PoolTimeout("QueuePool limit of size 12 overflow 0 reached, connection timed out, timeout 5.00")

    # The async status poll and a plain sync endpoint both end on the same handler.
    monkeypatch.setattr("app.services.jobs.read_job_status", exhausted)
    monkeypatch.setattr("app.services.jobs.list_jobs", exhausted)
    for path in ("/v1/jobs/anything", "/v1/jobs"):
        resp = client.get(path)
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"].isdigit() and resp.json()["error"] == "unavailable"


def test_waiting_too_long_for_a_database_thread_is_busy() -> None:
    async def main() -> None:
        _poll_threads.set(_PollThreads(1, 0.2))
        release = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_in_db_thread, lambda: release.wait(5))
            await anyio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(DatabaseBusy):
                await run_in_db_thread(lambda: None)
            assert 0.15 < time.monotonic() - started < 2
            release.set()
        assert await run_in_db_thread(lambda: 42) == 42  # the thread came back

    anyio.run(main)


# ------------------------------------------------------------------------------------------ per-key limits


def test_the_api_collects_garbage_in_larger_batches_while_it_serves(settings: Settings) -> None:
    before = gc.get_threshold()
    with TestClient(create_app(settings)):
        assert gc.get_threshold() == GC_THRESHOLDS != before
    assert gc.get_threshold() == before  # restored at shutdown: other code in the process keeps its own


def test_key_limits_refill_and_cap_requests_in_flight() -> None:
    now = [0.0]
    limits = KeyLimits(rate=2.0, burst=3, in_flight=2, clock=lambda: now[0])
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == 1.0  # two in flight: the third waits although a token is left
    limits.release("a")
    limits.release("a")
    assert limits.admit("a") is None
    limits.release("a")
    wait = limits.admit("a")  # the bucket is empty: a token comes in 1/rate seconds
    assert wait is not None and wait == pytest.approx(0.5)
    assert limits.admit("b") is None  # another key has its own bucket
    now[0] += 0.5
    assert limits.admit("a") is None


def test_rate_limit_is_per_key_and_answers_429_with_retry_after(settings: Settings) -> None:
    limited = keyed(settings, rate_limit_per_second=0.01, rate_limit_burst=3)
    alice, bob = make_keys(limited, "alice", "bob")
    with TestClient(create_app(limited)) as c:
        codes = [c.get("/v1/jobs", headers={"Authorization": f"Bearer {alice}"}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = c.get("/v1/jobs", headers={"Authorization": f"Bearer {alice}"})
        assert refused.json()["error"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {bob}"}).status_code == 200
        assert c.get("/healthz").status_code == 200  # only /v1 is limited


def test_default_limits_leave_ordinary_use_alone(client: TestClient) -> None:
    # Keys off (the embedded default): everyone is one owner, and a script polling quickly is not refused.
    job_id = running_job(client)
    assert all(client.get(f"/v1/jobs/{job_id}").status_code == 200 for _ in range(150))


# ----------------------------------------------------------------------------------- one poller per job


def test_one_poller_serves_every_stream_of_a_job(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = running_job(client)
    polls = 0
    real_poll = events_service.poll_once

    def counting_poll(tracker: events_service.JobEventTracker, url: str) -> list[Any]:
        nonlocal polls
        polls += 1
        return real_poll(tracker, url)

    monkeypatch.setattr(events_service, "poll_once", counting_poll)
    monkeypatch.setattr(events_service, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(events_service, "HEARTBEAT_SECONDS", 0.2)  # a quiet stream still sends a line to read
    streams, seconds = 20, 1.5
    starts: list[str] = []
    for base in serve(settings):

        def listen(base: str) -> None:
            with (
                httpx.Client(base_url=base, timeout=10) as http,
                http.stream("GET", f"/v1/jobs/{job_id}/events") as resp,
            ):
                assert resp.status_code == 200
                end = time.monotonic() + seconds
                for line in resp.iter_lines():
                    if line.startswith("event: run_started"):
                        starts.append(line)
                    if time.monotonic() > end:
                        break

        threads = [threading.Thread(target=listen, args=(base,)) for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(starts) == streams  # every stream got the history
    # One poll per interval for the job, not one per stream (20 streams each polling would be ~300).
    assert 3 <= polls <= seconds / 0.1 + 8, polls


# ------------------------------------------------------------------------------------ cached when finished


def test_running_results_are_fresh_and_finished_results_are_computed_once(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_cache.clear()
    calls = 0
    import app.api.routes.jobs as routes

    real_build = routes.build_results

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_build(*args, **kwargs)

    monkeypatch.setattr(routes, "build_results", counting_build)
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    steps = 10

    def finished(done: int) -> Any:
        def fake(run: Run, position: int) -> FakeRun:
            if position >= done:
                return FakeRun("running")
            final = {"val_acc": 0.5 + position / 100, "val_loss": 0.5, "train_loss": 0.4}
            return FakeRun("succeeded", {"final_metrics": final, "steps_done": steps})

        return fake

    finish_job(settings, job_id, finished(1))
    first = client.get(f"/v1/jobs/{job_id}/results").json()
    finish_job(settings, job_id, finished(2))
    second = client.get(f"/v1/jobs/{job_id}/results").json()
    assert first["complete"] is False and first != second and calls == 2  # a running job: computed each time

    def all_done(run: Run, position: int) -> FakeRun:
        final = {"val_acc": 0.8 + position / 100, "val_loss": 0.5, "train_loss": 0.4}
        return FakeRun("succeeded", {"final_metrics": final, "steps_done": steps})

    finish_job(settings, job_id, all_done)
    done = client.get(f"/v1/jobs/{job_id}/results")
    again = client.get(f"/v1/jobs/{job_id}/results")
    assert done.json()["complete"] is True and again.content == done.content
    assert calls == 3  # the finished job's second request did not recompute
    assert client.get(f"/v1/jobs/{job_id}/results", params={"baseline": "gn(4)"}).status_code == 200
    assert calls == 4  # another query is another entry
    page = client.get(f"/v1/jobs/{job_id}/report")
    assert page.status_code == 200 and client.get(f"/v1/jobs/{job_id}/report").text == page.text


# ------------------------------------------------------------------------------ the flood, over real sockets

FLOOD = textwrap.dedent(
    """
    import asyncio, collections, json, sys, time
    import httpx

    base, token, job, pollers, streams, seconds = sys.argv[1:7]
    pollers, streams, seconds = int(pollers), int(streams), float(seconds)
    codes, errors = collections.Counter(), collections.Counter()
    headers = {"Authorization": f"Bearer {token}"}

    async def poll(client, end):
        while time.monotonic() < end:
            try:
                r = await client.get(f"/v1/jobs/{job}", headers=headers)
                codes[f"poll {r.status_code}"] += 1
                if r.status_code == 429:  # a client that retries quickly, far sooner than Retry-After
                    await asyncio.sleep(0.05)
            except Exception as e:
                errors[f"poll {type(e).__name__}: {e}"] += 1

    async def stream(client, end):
        while time.monotonic() < end:
            try:
                async with client.stream("GET", f"/v1/jobs/{job}/events", headers=headers) as r:
                    codes[f"stream {r.status_code}"] += 1
                    if r.status_code != 200:
                        await asyncio.sleep(0.2)
                        continue
                    async with asyncio.timeout(max(0.0, end - time.monotonic())):  # hang up at the end
                        async for line in r.aiter_lines():
                            pass
            except TimeoutError:
                return
            except Exception as e:
                errors[f"stream {type(e).__name__}: {e}"] += 1

    async def main():
        # Many small clients: one connection pool of 1,300 costs the client more CPU per request than the server.
        clients = [httpx.AsyncClient(base_url=base, timeout=20) for _ in range(26)]
        end = time.monotonic() + seconds
        tasks = [poll(clients[i % 26], end) for i in range(pollers)]
        tasks += [stream(clients[i % 26], end) for i in range(streams)]
        await asyncio.gather(*tasks)
        for client in clients:
            await client.aclose()

    started = time.monotonic()
    asyncio.run(main())
    print(json.dumps({"codes": codes, "errors": errors, "wall": time.monotonic() - started}))
    """
)


@pytest.fixture
def api_server(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """`uvicorn app.main:app` in its own process, keys on, on the test database."""
    port = 0
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMBENCH_")}
    env |= {
        "NORMBENCH_DATABASE_URL": settings.resolved_database_url,
        "NORMBENCH_BROKER_URL": settings.resolved_broker_url,
        "NORMBENCH_BROKER_KEY_PREFIX": settings.broker_key_prefix,
        "NORMBENCH_STORAGE_URL": settings.resolved_storage_url,
        "NORMBENCH_HOME": str(tmp_path / "home"),
        "NORMBENCH_REQUIRE_API_KEYS": "true",
    }
    log = (tmp_path / "api.log").open("wb")
    # The command make run starts (keep-alive included: a shorter one drops pollers' requests under load).
    proc = subprocess.Popen(api_command("127.0.0.1", port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        assert "Traceback" not in (tmp_path / "api.log").read_text(), (tmp_path / "api.log").read_text()[-5000:]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Prober:
    """Another owner polling its own job every 20 ms: latencies, statuses and the server's peak thread count."""

    def __init__(self, base: str, token: str, job_id: str, pid: int) -> None:
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20)
        self.path = f"/v1/jobs/{job_id}"
        self.pid = pid
        self.max_threads = 0

    def probe(self, seconds: float) -> tuple[list[float], set[int]]:
        latencies: list[float] = []
        statuses: set[int] = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            statuses.add(self.http.get(self.path).status_code)
            latencies.append(time.perf_counter() - started)
            self.max_threads = max(self.max_threads, threads_of(self.pid))
            time.sleep(0.02)
        return latencies, statuses


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def test_one_owner_flooding_polls_and_streams_gets_no_5xx_and_others_stay_fast(
    settings: Settings, api_server: tuple[str, int], tmp_path: Path
) -> None:
    base, pid = api_server
    alice, bob = make_keys(settings, "alice", "bob")
    with TestClient(create_app(keyed(settings))) as c:
        alice_job, bob_job = running_job(c, alice), running_job(c, bob)
    prober = Prober(base, bob, bob_job, pid)
    # What this machine gives the other owner without the flood: the flood must not add more than 100 ms to it.
    quiet, quiet_statuses = prober.probe(3)
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    pollers, streams, seconds = 1000, 300, 15.0
    # The flood runs niced: on a shared 2-core machine its clients would otherwise take the CPU the server and
    # the other owner need (in production the clients are on other machines); the server's side is the test.
    flood = subprocess.Popen(
        [
            "nice",
            "-n",
            "15",
            sys.executable,
            str(script),
            base,
            alice,
            alice_job,
            *map(str, (pollers, streams, seconds)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)  # the flood is on
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    flooded, statuses = prober.probe(seconds - 4)
    server_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
    out, err = flood.communicate(timeout=seconds + 40)  # no hang: every client is done soon after the end
    prober.http.close()
    assert flood.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    codes: dict[str, int] = report["codes"]
    print(
        f"flood {dict(codes)}, wall {report['wall']:.1f} s, server CPU {server_cpu:.0%} of a core; other owner "
        f"p99 {p99(quiet) * 1e3:.1f} ms quiet, {p99(flooded) * 1e3:.1f} ms flooded ({len(flooded)} polls)"
    )
    assert not report["errors"], report  # no timeouts, no dropped connections
    assert not [k for k in codes if k.split()[1].startswith("5")], codes
    assert codes.get("poll 200", 0) >= 100 and codes.get("stream 200", 0) >= 30, codes  # served, not just refused
    assert statuses == quiet_statuses == {200}, statuses
    # The 1,300 flood clients share this machine's cores with the server (2 in CI), so the other owner's
    # latency includes CPU contention no server can avoid: bounded here, measured in bench/RESULTS.md.
    assert p99(flooded) < 0.5 + p99(quiet), f"other owner's p99 {p99(flooded) * 1e3:.0f} ms"
    # Threads stay within the pools' sizes (12 + 4) plus the server's own, whatever the number of streams.
    assert prober.max_threads <= 12 + 4 + 8, prober.max_threads
