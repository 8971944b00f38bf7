"""Soak: 200 tiny runs across 2 worker processes while a random worker is killed every few seconds.

At the end every run must be terminal, none trained to completion twice, and no metric point
duplicated. Needs the local Postgres and Redis (as for `make test`).

    .venv/bin/python bench/soak.py [--runs 200] [--kill-every 3] [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.config import Settings  # noqa: E402
from app.devserver import alembic_config  # noqa: E402
from app.main import create_app  # noqa: E402
from app.tables import MetricPoint, Run  # noqa: E402
from tests.support import PG_SERVER, WorkerProcess, drop_database, recreate_database, worker_env  # noqa: E402

FAST = {
    "NORMBENCH_LEASE_SECONDS": "2",
    "NORMBENCH_HEARTBEAT_SECONDS": "0.3",
    "NORMBENCH_RECONCILE_SECONDS": "0.5",
    "NORMBENCH_REPUBLISH_AFTER_SECONDS": "5",
    "NORMBENCH_MAX_ATTEMPTS": "20",
    "NORMBENCH_TORCH_THREADS": "1",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="multiple of 20")
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from alembic import command

    db = "normbench_soak"
    url = recreate_database(db)
    command.upgrade(alembic_config(url), "head")
    tmp = Path(tempfile.mkdtemp(prefix="normbench-soak-"))
    settings = Settings(
        home=tmp / "home",
        database_url=url,
        broker_url="redis://127.0.0.1:6379/14",
        broker_key_prefix=f"soak{os.getpid()}:",
        storage_url=(tmp / "storage").as_uri(),
    )
    env = worker_env(
        NORMBENCH_DATABASE_URL=url,
        NORMBENCH_BROKER_URL=settings.resolved_broker_url,
        NORMBENCH_BROKER_KEY_PREFIX=settings.broker_key_prefix,
        NORMBENCH_STORAGE_URL=settings.resolved_storage_url,
        **FAST,
    )
    logs: list[Path] = []

    def start(i: int) -> WorkerProcess:
        log = tmp / f"worker{len(logs)}.log"
        logs.append(log)
        w = WorkerProcess({**env, "NORMBENCH_HOME": str(tmp / f"w{i}")}, log)
        w.wait_ready()
        return w

    started = time.monotonic()
    kills = 0
    with TestClient(create_app(settings)) as api:
        jobs = []
        for j in range(args.runs // 20):
            spec = {
                "dataset_id": "digits",
                "model": {"arch": "mlp", "hidden": [32]},
                "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 4}],
                "batch_sizes": [8, 16],
                "seeds": list(range(5)),
                "budget": {"epochs": 4},
                "log_every_steps": 5,
                "name": f"soak{j}",
            }
            jobs.append(api.post("/v1/jobs", json=spec).json()["id"])
        workers = [start(0), start(1)]
        next_kill = time.monotonic() + args.kill_every
        while True:
            states = [api.get(f"/v1/jobs/{j}").json()["progress"] for j in jobs]
            finished = sum(s["runs_finished"] for s in states)
            print(f"\r{finished}/{args.runs} runs terminal, {kills} kills", end="", flush=True)
            if finished == args.runs:
                break
            if time.monotonic() > next_kill:
                i = random.randrange(len(workers))
                workers[i].proc.send_signal(signal.SIGKILL)
                workers[i].proc.wait()
                workers[i].stop()
                kills += 1
                workers[i] = start(i)
                next_kill = time.monotonic() + args.kill_every
            time.sleep(0.2)
        print()
        for w in workers:
            w.stop()
    wall = time.monotonic() - started

    engine = create_engine(url)
    with engine.connect() as conn:
        statuses = Counter(dict(conn.execute(select(Run.status, func.count()).group_by(Run.status)).all()))
        attempts = int(conn.scalar(select(func.sum(Run.attempt))) or 0)
        dupes = conn.execute(
            select(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
            .group_by(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
            .having(func.count() > 1)
        ).all()
    engine.dispose()
    completions = Counter()
    for log in logs:
        for run_id in re.findall(rb"run (\w+) attempt \d+ trained to succeeded", log.read_bytes()):
            completions[run_id] += 1
    twice = [r for r, n in completions.items() if n > 1]
    result = {
        "runs": args.runs,
        "statuses": dict(statuses),
        "kills": kills,
        "retries": attempts - args.runs,
        "trained_to_completion_twice": len(twice),
        "duplicate_metric_points": len(dupes),
        "wall_time_s": round(wall, 1),
        "postgres": PG_SERVER,
    }
    print(json.dumps(result, indent=2))
    drop_database(db)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    ok = statuses.get("succeeded", 0) == args.runs and not twice and not dupes
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
