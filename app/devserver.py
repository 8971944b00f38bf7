"""`make run`: the embedded-default service (SQLite, filesystem broker, one local worker) plus the demo.

Migrates the database, starts the API and one worker as child processes, submits the built-in
demo comparison over HTTP, shows its progress, prints the result table, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from alembic import command
from alembic.config import Config

from app.config import TRAIN_QUEUE, UnsafeBind, check_bind_safety, get_settings

ROOT = Path(__file__).resolve().parent.parent


def demo_spec(epochs: int, seeds: int) -> dict[str, object]:
    # The MLP view of digits: BN normalizes 256 features over the batch, which at batch 2 is two
    # values per feature, so its statistics are noise; GN's per-sample statistics are not.
    return {
        "dataset_id": "digits",
        "name": "demo: BatchNorm vs GroupNorm on digits (MLP)",
        "model": {"arch": "mlp", "hidden": [256, 256]},
        "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 16}],
        "batch_sizes": [2, 8, 32],
        "seeds": list(range(seeds)),
        "budget": {"epochs": epochs},
        "optimizer": {"lr": 0.1, "reference_batch_size": 32, "lr_scaling": "linear", "warmup_epochs": 1},
        "validation_fraction": 0.2,
    }


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def worker_command(loglevel: str, *extra: str, quiet: bool = False) -> list[str]:
    """One local worker on the train queue; solo pool, so SIGTERM reaches the training loop. `quiet`
    drops Celery's start-up banner (logging is unaffected)."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["--quiet"] if quiet else []),
            "worker", "-Q", TRAIN_QUEUE, "--pool", "solo", "--loglevel", loglevel, *extra]  # fmt: skip


def start_children(host: str, port: int) -> list[subprocess.Popen[bytes]]:
    worker = worker_command("WARNING", "--hostname", "normbench-local@%h", quiet=True)
    api = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return [subprocess.Popen(worker, cwd=ROOT), subprocess.Popen(api, cwd=ROOT)]


def wait_healthy(client: httpx.Client, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a child process exited during start-up; see its messages above")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not answer within {timeout:.0f}s")


def progress_bar(fraction: float, width: int = 30) -> str:
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


def follow_job(client: httpx.Client, job_id: str) -> dict[str, object]:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        p = job["progress"]
        line = (
            f"\r  {progress_bar(p['fraction'])}  runs {p['runs_finished']}/{p['runs_total']}  status {job['status']:<9}"
        )
        print(line, end="", flush=True)
        if p["runs_finished"] == p["runs_total"]:
            print()
            return job  # type: ignore[no-any-return]
        time.sleep(0.5)


def result_table(results: dict) -> str:  # type: ignore[type-arg]
    cells = {(c["variant"], c["batch_size"]): c for c in results["cells"]}
    header = f"{'norm':<10}" + "".join(f"{'batch ' + str(b):>18}" for b in results["batch_sizes"])
    lines = ["final validation accuracy, mean ± std over seeds", header, "-" * len(header)]
    for v in results["variants"]:
        row = f"{v:<10}"
        for b in results["batch_sizes"]:
            acc = cells[(v, b)]["val_acc"]
            text = "—" if acc["mean"] is None else f"{acc['mean'] * 100:.1f}%"
            if acc["std"] is not None:
                text += f" ± {acc['std'] * 100:.1f}"
            row += f"{text:>18}"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("NORMBENCH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("NORMBENCH_PORT", "8000")))
    parser.add_argument("--epochs", type=int, default=10, help="demo epoch budget")
    parser.add_argument("--seeds", type=int, default=3, help="demo seeds per cell (3: enough for a paired test)")
    parser.add_argument("--no-demo", action="store_true", help="only start the service")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is printed")
    args = parser.parse_args()

    settings = get_settings()
    try:
        check_bind_safety(settings, args.host)
    except UnsafeBind as e:
        raise SystemExit(str(e)) from None
    settings.home.mkdir(parents=True, exist_ok=True)
    print(f"NormBench (embedded): database {settings.resolved_database_url}, storage {settings.resolved_storage_url}")
    migrate(settings.resolved_database_url)
    procs = start_children(args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            wait_healthy(client, procs)
            print(f"API at {base}  (OpenAPI docs: {base}/docs)")
            if not args.no_demo:
                started = time.monotonic()
                resp = client.post("/v1/jobs", json=demo_spec(args.epochs, args.seeds))
                if resp.status_code != 202:
                    raise SystemExit(f"demo submit failed: {resp.status_code} {resp.text}")
                job_id = resp.json()["id"]
                print(f"demo job {job_id}: bn vs gn(16), MLP on digits, batch sizes 2/8/32, {args.seeds} seeds")
                job = follow_job(client, job_id)
                results = client.get(f"/v1/jobs/{job_id}/results").json()
                print(f"finished in {time.monotonic() - started:.0f}s with status {job['status']}\n")
                print(result_table(results))
                verdicts = results.get("verdicts") or []
                if verdicts:
                    print("\nverdicts:\n" + "\n".join(f"  - {v}" for v in verdicts))
                print(
                    f"\nreport:  {base}/v1/jobs/{job_id}/report\nresults: {base}/v1/jobs/{job_id}/results\n"
                    f"curves:  {base}/v1/jobs/{job_id}/curves?metric=val_acc"
                )
            if args.exit_after_demo:
                return
            print("serving; press Ctrl-C to stop")
            while all(p.poll() is None for p in procs):
                time.sleep(1)
            raise SystemExit("a child process exited; stopping")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
