"""Status polls side by side: NormBench's `GET /v1/jobs/{id}` for a 60-run job against a bare FastAPI +
SQLAlchemy endpoint that reads one row from the same Postgres and returns a similar JSON body.

Both apps run under uvicorn with 2 workers on the local Postgres (as for `make test`); `wrk -t2 --latency`
loads one, then the other, interleaved, at each connection count. Prints one row per measurement and a
summary table (median req/s over the rounds, their ratio, worst p99).

    .venv/bin/python bench/api_polls.py [--duration 10] [--rounds 2] [--connections 8 32] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB_NAME = "normbench_api_polls"
REDIS_URL = os.environ.get("NORMBENCH_TEST_REDIS", "redis://127.0.0.1:6379/15")
# The job the issue measured: 4 variants × 5 batch sizes × 3 seeds.
SPEC: dict[str, Any] = {
    "dataset_id": "digits",
    "name": "api polls bench",
    "model": {"arch": "mlp", "hidden": [256, 256]},
    "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 16}, {"norm": "ln"}, {"norm": "bn_precise"}],
    "batch_sizes": [2, 4, 8, 16, 32],
    "seeds": [0, 1, 2],
    "budget": {"epochs": 3},
    "validation_fraction": 0.2,
}


def make_bare_app() -> Any:
    """The reference: a plain sync FastAPI endpoint, a SQLAlchemy session per request, one row read by key
    (uvicorn --factory; the database URL comes from BARE_DATABASE_URL)."""
    from fastapi import Depends, FastAPI, HTTPException
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, sessionmaker

    factory = sessionmaker(create_engine(os.environ["BARE_DATABASE_URL"]))

    def db() -> Iterator[Session]:
        with factory() as session:
            yield session

    app = FastAPI()

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str, session: Session = Depends(db)) -> dict[str, Any]:
        row = (
            session.execute(
                text("SELECT id, name, dataset_id, spec, budget, created_at FROM jobs WHERE id = :id"), {"id": job_id}
            )
            .mappings()
            .first()
        )
        if row is None:
            raise HTTPException(404)
        return {**row, "status": "running", "links": {"self": f"/jobs/{job_id}"}}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_database() -> tuple[str, str, Path]:
    """A migrated database with the built-in digits and one 60-run job part-way through: 20 runs
    succeeded, 4 running, the rest queued. Returns the URL, the job id and a temporary home."""
    from alembic import command
    from sqlalchemy import update

    from app.api.lifespan import start_up
    from app.config import Settings
    from app.db import session_scope
    from app.devserver import alembic_config
    from app.schemas.jobs import JobSpec
    from app.services.jobs import create_job
    from app.tables import Run
    from tests.support import recreate_database

    url = recreate_database(DB_NAME)
    command.upgrade(alembic_config(url), "head")
    home = Path(tempfile.mkdtemp(prefix="normbench-api-polls-"))
    prefix = f"apipolls{os.getpid()}:"
    settings = Settings(
        home=home, database_url=url, broker_url=REDIS_URL, broker_key_prefix=prefix, storage_url=home.as_uri()
    )
    start_up(settings)
    with session_scope(url) as session:
        job = create_job(session, settings, "local", JobSpec.model_validate(SPEC))
        runs = sorted(job_runs_ids(session, job.id))
        steps = {r: 100 for r in runs}
        for i, run_id in enumerate(runs):
            if i < 20:
                values: dict[str, Any] = {
                    "status": "succeeded",
                    "attempt": 1,
                    "steps_done": steps[run_id],
                    "epochs_done": 3,
                    "final_metrics": {"val_acc": 0.9, "val_loss": 0.3, "train_loss": 0.2},
                }
            elif i < 24:
                values = {"status": "running", "attempt": 1, "steps_done": 40, "epochs_done": 1}
            else:
                continue
            session.execute(update(Run).where(Run.id == run_id).values(**values))
        job_id = job.id
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    return url, job_id, home


def job_runs_ids(session: Any, job_id: str) -> list[str]:
    from sqlalchemy import select

    from app.tables import Run

    return list(session.scalars(select(Run.id).where(Run.job_id == job_id)))


def start_server(args: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *args, "--workers", "2", "--log-level", "warning", "--no-access-log"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{health} did not answer in 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every process in the server's process group (uvicorn's supervisor and workers):
    a per-request cost that, unlike req/s, does not depend on what else the machine is doing."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat, the process group
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def run_wrk(url: str, connections: int, duration: float, pgid: int) -> dict[str, float]:
    cpu_before = group_cpu_seconds(pgid)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cpu = group_cpu_seconds(pgid) - cpu_before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50, u50 = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99, u99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": float(p50) * _UNITS[u50],
        "p99_ms": float(p99) * _UNITS[u99],
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": 1.0 if errors else 0.0,
        "cpu_ms_per_request": cpu * 1e3 / max(requests, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per connection count")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    from tests.support import drop_database

    url, job_id, home = seed_database()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("NORMBENCH_")}
    nb_port, bare_port = free_port(), free_port()
    nb_env = {
        **base_env,
        "NORMBENCH_DATABASE_URL": url,
        "NORMBENCH_BROKER_URL": REDIS_URL,
        "NORMBENCH_STORAGE_URL": home.as_uri(),
        "NORMBENCH_HOME": str(home),
        # wrk is one client hammering one key: lift the per-key limits out of its way (their code still runs).
        "NORMBENCH_RATE_LIMIT_PER_SECOND": "1000000",
        "NORMBENCH_RATE_LIMIT_IN_FLIGHT": "100000",
    }
    bare_env = {**base_env, "BARE_DATABASE_URL": url}
    nb = start_server(
        ["app.main:app", "--host", "127.0.0.1", "--port", str(nb_port)], nb_env, f"http://127.0.0.1:{nb_port}/healthz"
    )
    bare = start_server(
        ["--factory", "api_polls:make_bare_app", "--app-dir", "bench", "--host", "127.0.0.1", "--port", str(bare_port)],
        bare_env,
        f"http://127.0.0.1:{bare_port}/jobs/{job_id}",
    )
    urls = {
        "bare": f"http://127.0.0.1:{bare_port}/jobs/{job_id}",
        "normbench": f"http://127.0.0.1:{nb_port}/v1/jobs/{job_id}",
    }
    servers = {"bare": bare, "normbench": nb}
    body = httpx.get(urls["normbench"]).json()
    assert body["progress"]["runs_total"] == 60, body["progress"]
    print(
        f"NormBench body {len(httpx.get(urls['normbench']).content)} B, bare body {len(httpx.get(urls['bare']).content)} B"
    )
    results: list[dict[str, Any]] = []
    try:
        for name, u in urls.items():  # warm both (imports, pools, caches)
            run_wrk(u, 8, 2, servers[name].pid)
        print("| round | connections | app | req/s | p50 ms | p99 ms | server CPU ms/request | non-2xx |")
        print("|---|---|---|---|---|---|---|---|")
        for rnd in range(args.rounds):
            for c in args.connections:
                order = ["bare", "normbench"] if rnd % 2 == 0 else ["normbench", "bare"]
                for name in order:
                    m = run_wrk(urls[name], c, args.duration, servers[name].pid)
                    results.append({"round": rnd, "connections": c, "app": name, **m})
                    print(
                        f"| {rnd} | {c} | {name} | {m['rps']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                        f"{m['cpu_ms_per_request']:.2f} | {m['non_2xx']:.0f} |",
                        flush=True,
                    )
    finally:
        stop_server(nb)
        stop_server(bare)
        drop_database(DB_NAME)
        shutil.rmtree(home, ignore_errors=True)

    print()
    print(
        "| connections | bare endpoint req/s | NormBench req/s | ratio | bare p99 | NormBench p99 | CPU/request bare → NormBench |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = []
    for c in args.connections:
        rows = {n: [r for r in results if r["connections"] == c and r["app"] == n] for n in urls}
        bare_rps = statistics.median(r["rps"] for r in rows["bare"])
        nb_rps = statistics.median(r["rps"] for r in rows["normbench"])
        bare_p99 = max(r["p99_ms"] for r in rows["bare"])
        nb_p99 = max(r["p99_ms"] for r in rows["normbench"])
        bare_cpu = statistics.median(r["cpu_ms_per_request"] for r in rows["bare"])
        nb_cpu = statistics.median(r["cpu_ms_per_request"] for r in rows["normbench"])
        summary.append(
            {
                "connections": c,
                "bare_rps": bare_rps,
                "normbench_rps": nb_rps,
                "bare_p99_ms": bare_p99,
                "normbench_p99_ms": nb_p99,
                "bare_cpu_ms_per_request": bare_cpu,
                "normbench_cpu_ms_per_request": nb_cpu,
            }
        )
        print(
            f"| {c} | {bare_rps:,.0f} | {nb_rps:,.0f} | {nb_rps / bare_rps:.2f} | {bare_p99:.1f} ms | {nb_p99:.1f} ms | "
            f"{bare_cpu:.2f} → {nb_cpu:.2f} ms |"
        )
    if args.out:
        args.out.write_text(json.dumps({"measurements": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
