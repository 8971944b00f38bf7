"""Soak at scale (issue 15): thousands of tiny runs across several worker processes while a random worker gets
`kill -9` every few seconds, Redis and Postgres are each restarted once (stop → start of the server process), and
the API, a real uvicorn process, serves a polling load over HTTP throughout (status, list, results polls and
SSE event streams).

At the end, read from the database: every run terminal with a reason, none trained to completion twice (two
attempts of one run that each logged reaching the end of its budget), no metric point stored twice; and from
the pollers: no API response 5xx. Prints a table and writes JSON.

The soak starts its own Postgres cluster (initdb + pg_ctl, in a temporary folder) and its own Redis server on
free ports, so its restarts interrupt nothing else on the machine; both are stopped at the end, whatever happens.

    .venv/bin/python bench/soak.py [--runs 2000] [--workers 4] [--kill-every 20] [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import create_engine, func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app.core.run_states import TERMINAL  # noqa: E402
from app.devserver import alembic_config, api_command  # noqa: E402
from app.tables import Job, MetricPoint, Run  # noqa: E402
from tests.support import WorkerProcess, worker_env  # noqa: E402

FAST = {
    "NORMBENCH_LEASE_SECONDS": "3",
    "NORMBENCH_HEARTBEAT_SECONDS": "0.5",
    "NORMBENCH_RECONCILE_SECONDS": "1",
    "NORMBENCH_REPUBLISH_AFTER_SECONDS": "5",
    "NORMBENCH_REPUBLISH_MAX_BACKOFF_SECONDS": "30",
    "NORMBENCH_MAX_ATTEMPTS": "50",
    "NORMBENCH_TORCH_THREADS": "1",
}
RUNS_PER_JOB = 20  # (bn, gn(4)) × batch 16 × 10 seeds, trained in packs of 10
PG_BIN = (
    Path("/usr/lib/postgresql")
    / (sorted(os.listdir("/usr/lib/postgresql"))[-1] if Path("/usr/lib/postgresql").is_dir() else "")
    / "bin"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------ own servers


class Postgres:
    """A Postgres cluster of the soak's own: restarted with pg_ctl stop -m fast (every connection dropped) → start."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="normbench-soak-pg-"))
        self.data, self.port = self.dir / "data", free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            shutil.chown(self.dir, "postgres", "postgres")
        quiet([*self.as_pg, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N"])
        self.start()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute('CREATE DATABASE "soak"')
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/soak"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        log = str(self.dir / "server.log")
        quiet([*self.as_pg, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", opts, "-w", "start"])

    def stop(self) -> None:
        quiet([*self.as_pg, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A Redis server of the soak's own, keeping nothing on disk (as this machine's): a restart (SHUTDOWN NOSAVE →
    start) loses every queued task, which the reconciler must notice and republish."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*cmd, "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            probe = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if "PONG" in probe.stdout:
                return
            time.sleep(0.1)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


# ------------------------------------------------------------------------------------------ polling load


@dataclass
class Load:
    """What the API answered the pollers: status counts and latencies per kind of request, and every 5xx."""

    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer at all (connection error, timeout)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, kind: str, status: int, seconds: float, body: str = "") -> None:
        with self.lock:
            self.statuses[kind][status] += 1
            self.latencies[kind].append(seconds)
            if status >= 500:
                self.server_errors.append({"at": time.time(), "kind": kind, "status": status, "body": body[:300]})

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, lat in sorted(self.latencies.items()):
            q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
            out[kind] = {
                "requests": len(lat),
                "statuses": {str(k): v for k, v in sorted(self.statuses[kind].items())},
                "p50_ms": round(q[49] * 1e3, 1),
                "p99_ms": round(q[98] * 1e3, 1),
                "max_ms": round(max(lat) * 1e3, 1),
            }
        return out


def poller(base: str, jobs: list[str], load: Load, interval: float) -> None:
    """Status, list and results polls of random jobs, one after another, until told to stop."""
    kinds = [
        ("job", "/v1/jobs/{}"),
        ("job", "/v1/jobs/{}"),
        ("list", "/v1/jobs?limit=50"),
        ("results", "/v1/jobs/{}/results"),
    ]
    with httpx.Client(base_url=base, timeout=30) as http:
        while not load.stop.is_set():
            kind, path = random.choice(kinds)
            started = time.perf_counter()
            try:
                r = http.get(path.format(random.choice(jobs)))
                load.record(kind, r.status_code, time.perf_counter() - started, r.text if r.status_code >= 500 else "")
            except httpx.HTTPError as e:
                load.errors[f"{kind} {type(e).__name__}"] += 1
            load.stop.wait(interval)


def streamer(base: str, jobs: list[str], load: Load) -> None:
    """One SSE stream at a time on a random unfinished job, read to its end, then the next."""
    with httpx.Client(base_url=base, timeout=httpx.Timeout(30, read=60)) as http:
        while not load.stop.is_set():
            started = time.perf_counter()
            try:
                with http.stream("GET", f"/v1/jobs/{random.choice(jobs)}/events") as r:
                    body = r.read().decode() if r.status_code >= 500 else ""
                    load.record("events", r.status_code, time.perf_counter() - started, body)
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            with load.lock:
                                load.events += 1
                        if load.stop.is_set():
                            break
            except httpx.HTTPError as e:
                load.errors[f"events {type(e).__name__}"] += 1
            load.stop.wait(0.5)


# ------------------------------------------------------------------------------------------ the soak


class Api:
    """`uvicorn app.main:app` in its own process on the soak's database and broker."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path, self.log = log, log.open("wb")
        cmd = api_command("127.0.0.1", self.port)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def submit(base: str, runs: int, epochs: int) -> list[str]:
    jobs = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for j in range(runs // RUNS_PER_JOB):
            spec = {
                "dataset_id": "digits",
                "model": {"arch": "mlp", "hidden": [32]},
                "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 4}],
                "batch_sizes": [16],
                "seeds": list(range(RUNS_PER_JOB // 2)),
                "pack_size": RUNS_PER_JOB // 2,
                "budget": {"epochs": epochs},
                "log_every_steps": 5,
                "name": f"soak{j}",
            }
            r = http.post("/v1/jobs", json=spec)
            if r.status_code != 202:
                raise RuntimeError(f"submit {j}: {r.status_code} {r.text}")
            jobs.append(r.json()["id"])
    return jobs


def cancel_jobs(base: str, jobs: list[str]) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        for job in jobs:
            http.post(f"/v1/jobs/{job}/cancel")


def terminal_count(url: str) -> int | None:
    """Runs in a terminal state, or None while the database cannot be reached."""
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM runs WHERE status = ANY(%s)", (sorted(TERMINAL),)).fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return None


@dataclass
class Outage:
    service: str
    at_fraction: float
    started: float = 0.0
    ended: float = 0.0


class Soak:
    """Workers, kills and restarts; `run` returns when every run is terminal or the time limit passed."""

    def __init__(self, args: argparse.Namespace, tmp: Path, pg: Postgres, redis: Redis, env: dict[str, str]) -> None:
        self.args, self.tmp, self.pg, self.redis, self.env = args, tmp, pg, redis, env
        self.logs: list[Path] = []
        self.workers: list[WorkerProcess] = []
        self.kills = 0
        self.capped_at: int | None = None  # runs terminal when the time limit struck (None: it did not)
        self.loads: list[float] = []
        self.outages = [Outage("redis", args.redis_restart_at), Outage("postgres", args.postgres_restart_at)]

    def start_worker(self, i: int) -> WorkerProcess:
        log = self.tmp / f"worker{len(self.logs)}.log"
        self.logs.append(log)
        return WorkerProcess({**self.env, "NORMBENCH_HOME": str(self.tmp / f"w{i}")}, log)

    def restart(self, outage: Outage) -> None:
        server = self.redis if outage.service == "redis" else self.pg
        outage.started = time.time()
        print(f"\n{outage.service}: stop", flush=True)
        server.stop()
        time.sleep(self.args.outage_seconds)
        server.start()
        outage.ended = time.time()
        print(f"{outage.service}: started again after {outage.ended - outage.started:.1f} s", flush=True)

    def kill_one(self) -> None:
        """SIGKILL a random worker that is up (one still starting would die before it took any work)."""
        up = [i for i, w in enumerate(self.workers) if b"ready." in w.log_path.read_bytes()]
        if not up:
            return
        i = random.choice(up)
        self.workers[i].proc.send_signal(signal.SIGKILL)
        self.workers[i].proc.wait()
        self.workers[i].stop()
        self.kills += 1
        self.workers[i] = self.start_worker(i)  # not waited for: it joins when it is ready

    def run(self, cancel_all: Callable[[], None]) -> float:
        """Until every run is terminal. At `--max-minutes` every job is cancelled (the soak then checks that the
        cancelled runs end with a reason too) and the kills stop; returns the seconds until the last run ended."""
        self.workers = [self.start_worker(i) for i in range(self.args.workers)]
        for w in self.workers:
            w.wait_ready(120)
        started = time.monotonic()
        next_kill, cap, done = started + self.args.kill_every, self.args.max_minutes * 60, 0
        while done < self.args.runs and time.monotonic() - started < cap + 600:
            elapsed = time.monotonic() - started
            self.loads.append(os.getloadavg()[0])
            done = terminal_count(self.pg.url) or done
            print(f"\r{done}/{self.args.runs} runs terminal, {self.kills} kills", end="", flush=True)
            for outage in self.outages:  # at a fraction of the runs, or of the time allowed
                if not outage.started and (
                    done >= outage.at_fraction * self.args.runs or elapsed > outage.at_fraction * cap
                ):
                    self.restart(outage)
            if elapsed > cap and self.capped_at is None:
                self.capped_at = done
                print(f"\ntime limit: {done} runs terminal; cancelling every job", flush=True)
                cancel_all()
            if self.args.kill_every and time.monotonic() > next_kill and self.capped_at is None:
                self.kill_one()
                next_kill = time.monotonic() + self.args.kill_every * random.uniform(0.5, 1.5)
            time.sleep(0.5)
        print()
        return time.monotonic() - started

    def close(self) -> None:
        for w in self.workers:
            w.stop()

    def kill(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def invariants(url: str, logs: list[Path], runs: int) -> dict[str, Any]:
    """What the database and the workers' logs say once the soak is over."""
    engine = create_engine(url)
    with engine.connect() as conn:
        statuses = Counter(dict(conn.execute(select(Run.status, func.count()).group_by(Run.status)).all()))
        no_reason = conn.scalar(
            select(func.count()).where(Run.status != "succeeded", Run.error.is_(None) | (Run.error == ""))
        )
        no_metrics = conn.scalar(select(func.count()).where(Run.status == "succeeded", Run.final_metrics.is_(None)))
        retries = int(conn.scalar(select(func.sum(func.greatest(Run.attempt - 1, 0)))) or 0)  # claims past the first
        failure_classes = dict(
            conn.execute(
                select(Run.failure_class, func.count()).where(Run.status == "failed").group_by(Run.failure_class)
            ).all()
        )
        points = int(conn.scalar(select(func.count()).select_from(MetricPoint)) or 0)
        dupes = conn.execute(
            select(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
            .group_by(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
            .having(func.count() > 1)
        ).all()
        jobs_total = int(conn.scalar(select(func.count()).select_from(Job)) or 0)
    engine.dispose()
    completions: defaultdict[str, list[str]] = defaultdict(list)  # run → "worker log: attempt N at time"
    for log in logs:
        for when, run_id, attempt in re.findall(
            rb"\[([^\]]+): INFO/MainProcess\] run (\w+) attempt (\d+) trained to succeeded", log.read_bytes()
        ):
            completions[run_id.decode()].append(f"{log.name}: attempt {attempt.decode()} at {when.decode()}")
    twice = {run: seen for run, seen in completions.items() if len(seen) > 1}
    # Attempts that found their run's training already ended (a final checkpoint, result not yet committed).
    recorded_from_final = sum(
        len(re.findall(rb"training had ended \(final checkpoint\); recording it", log.read_bytes())) for log in logs
    )
    not_terminal = sum(n for s, n in statuses.items() if s not in TERMINAL)
    repairs: Counter[str] = Counter()  # what the workers' reconcilers did, summed over every round they logged
    for log in logs:
        for found in re.findall(rb"reconciler: (\{[^}]*\})", log.read_bytes()):
            repairs.update(ast.literal_eval(found.decode()))
    return {
        "runs": runs,
        "jobs": jobs_total,
        "statuses": dict(statuses),
        "not_terminal": not_terminal,
        "terminal_without_reason": int(no_reason or 0) + int(no_metrics or 0),
        "failure_classes": {str(k): v for k, v in failure_classes.items()},
        "retries": retries,
        "trained_to_completion_twice": len(twice),
        "trained_twice_detail": twice,
        "recorded_from_final_checkpoint": recorded_from_final,
        "metric_points": points,
        "duplicate_metric_points": len(dupes),
        "reconciler": dict(repairs),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2000, help=f"a multiple of {RUNS_PER_JOB}")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1, help="each run's budget (64→32→10 MLP on digits)")
    p.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between kill -9s (0: none)")
    p.add_argument("--redis-restart-at", type=float, default=0.3, help="fraction of runs terminal")
    p.add_argument("--postgres-restart-at", type=float, default=0.6, help="fraction of runs terminal")
    p.add_argument("--outage-seconds", type=float, default=3.0, help="how long each server stays down")
    p.add_argument("--pollers", type=int, default=3, help="threads polling job, list and results")
    p.add_argument("--poll-interval", type=float, default=0.1, help="pause between one poller's requests")
    p.add_argument("--streams", type=int, default=2, help="threads each holding one SSE stream at a time")
    p.add_argument("--max-minutes", type=float, default=45.0, help="then cancel every job (and stop the kills)")
    p.add_argument("--out", type=Path)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    from alembic import command

    tmp = Path(tempfile.mkdtemp(prefix="normbench-soak-"))
    pg = Postgres()
    redis = Redis(tmp)
    api: Api | None = None
    soak: Soak | None = None
    load = Load()
    threads: list[threading.Thread] = []
    try:
        command.upgrade(alembic_config(pg.url), "head")
        env = worker_env(
            NORMBENCH_DATABASE_URL=pg.url,
            NORMBENCH_BROKER_URL=redis.url,
            NORMBENCH_STORAGE_URL=(tmp / "storage").as_uri(),
            NORMBENCH_MAX_ACTIVE_JOBS_PER_OWNER="100000",
            **FAST,
        )
        api = Api({**env, "NORMBENCH_HOME": str(tmp / "api")}, tmp / "api.log")
        jobs = submit(api.base, args.runs, args.epochs)
        threads = [
            threading.Thread(target=poller, args=(api.base, jobs, load, args.poll_interval))
            for _ in range(args.pollers)
        ]
        threads += [threading.Thread(target=streamer, args=(api.base, jobs, load)) for _ in range(args.streams)]
        for t in threads:
            t.start()
        soak = Soak(args, tmp, pg, redis, env)
        wall = soak.run(lambda: cancel_jobs(api.base, jobs))
        load.stop.set()
        for t in threads:
            t.join(90)
        soak.close()
        result = report(args, invariants(pg.url, soak.logs, args.runs), load, soak, wall, api.log_path)
    finally:  # whatever happened: no worker, API or server of the soak's is left running
        load.stop.set()
        for close in (soak.kill if soak else None, api.close if api else None, redis.close, pg.close):
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if result["ok"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs kept in {tmp}")
    raise SystemExit(0 if result["ok"] else 1)


def report(
    args: argparse.Namespace, inv: dict[str, Any], load: Load, soak: Soak, wall: float, api_log: Path
) -> dict[str, Any]:
    """Assemble, print and judge the figures."""
    api = load.summary()
    fives = len(load.server_errors)
    in_outage = sum(
        1 for e in load.server_errors if any(o.started - 1 <= e["at"] <= o.ended + 10 for o in soak.outages)
    )
    result = {
        **inv,
        "workers": args.workers,
        "epochs": args.epochs,
        "kills": soak.kills,
        "time_limit_s": args.max_minutes * 60,
        "terminal_at_time_limit": soak.capped_at,
        "restarts": [
            {"service": o.service, "at_fraction": o.at_fraction, "down_s": round(o.ended - o.started, 1)}
            for o in soak.outages
        ],
        "api": api,
        "api_5xx": fives,
        "api_5xx_within_10s_of_a_restart": in_outage,
        "api_5xx_samples": load.server_errors[:10],
        "api_no_answer": dict(load.errors),
        "sse_events_read": load.events,
        "api_tracebacks": api_log.read_text(errors="replace").count("Traceback"),
        "api_log_warnings": Counter(re.findall(r"\n(\w[^\n]{0,80})", api_log.read_text(errors="replace"))).most_common(
            8
        ),
        "wall_time_s": round(wall, 1),
        "load_average_1m": {
            "mean": round(statistics.fmean(soak.loads), 1) if soak.loads else None,
            "max": round(max(soak.loads), 1) if soak.loads else None,
        },
        "cores": os.cpu_count(),
    }
    result["ok"] = (
        inv["not_terminal"] == 0
        and inv["terminal_without_reason"] == 0
        and inv["trained_to_completion_twice"] == 0
        and inv["duplicate_metric_points"] == 0
        and fives == 0
        and not load.errors
    )
    rows = [
        ("runs terminal", f"{args.runs - inv['not_terminal']}/{args.runs} {inv['statuses']}"),
        ("terminal without a reason", inv["terminal_without_reason"]),
        ("trained to completion twice", inv["trained_to_completion_twice"]),
        ("results recorded from a final checkpoint", inv["recorded_from_final_checkpoint"]),
        ("duplicate metric points", f"{inv['duplicate_metric_points']} of {inv['metric_points']}"),
        ("kill -9 / retries", f"{soak.kills} / {inv['retries']}"),
        ("reconciler", inv["reconciler"]),
        ("restarts", ", ".join(f"{o.service} {o.ended - o.started:.1f} s down" for o in soak.outages if o.started)),
        ("API 5xx / no answer", f"{fives} / {sum(load.errors.values())}"),
        *[
            (
                f"API {k}",
                f"{v['requests']} req {v['statuses']} p50 {v['p50_ms']} ms p99 {v['p99_ms']} max {v['max_ms']} ms",
            )
            for k, v in api.items()
        ],
        (
            "time limit",
            "not reached" if soak.capped_at is None else f"{soak.capped_at} runs terminal, the rest cancelled",
        ),
        ("wall time", f"{wall:.0f} s, load average {result['load_average_1m']} on {os.cpu_count()} cores"),
        ("verdict", "OK" if result["ok"] else "FAILED"),
    ]
    for name, value in rows:
        print(f"{name:<30} {value}")
    return result


if __name__ == "__main__":
    main()
