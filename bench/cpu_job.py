"""A real CPU job through the API and worker(s), submit → succeeded, against the same steps in a plain PyTorch loop.

Starts a Postgres + Redis backed API (uvicorn) and the worker layout a CPU machine gets by default (one solo
worker per core, torch threads chosen automatically: see NORMBENCH_WORKERS / NORMBENCH_TORCH_THREADS in the
README), then, interleaved for each round and each job:

plain  the best plain loop, in this process: torch.set_num_threads(1), the training set normalized once and
       resident, batches by tensor indexing, eager forward, cross-entropy, backward, torch.optim.SGD; the
       job's runs one after another (same model, batch size, seeds and number of steps; no evaluation)
job    POST /v1/jobs, then GET /v1/jobs/{id} every 50 ms until every run finished; wall time from the POST
       to the poll that saw it succeeded (the workers are started and idle before the POST)

The jobs: digits, MLP 64→256→256→10 with bn and gn(16) at batch 2, 4 seeds, 3 epochs (8 runs × 2,424
steps), and the small CNN with bn and gn(4) at batch 2 and at batch 8 (two jobs of 8 runs each).
CPU seconds (user + system, the plain loop's own process; the workers' processes for a job) are printed
too: on a loaded machine they say more about the work done than wall time does.

    .venv/bin/python bench/cpu_job.py [--rounds 2] [--jobs mlp cnn2 cnn8] [--workers N] [--threads T]
                                      [--pack-size P] [--epochs E] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.dataset_format import save_canonical  # noqa: E402
from app.services.builtin import digits_dataset  # noqa: E402
from tests.support import REDIS_URL, WorkerProcess, drop_database, recreate_database, worker_env  # noqa: E402
from workers.data import DeviceData, epoch_order, load_device_data  # noqa: E402
from workers.engine import RunConfig  # noqa: E402
from workers.run_config import build_run_model  # noqa: E402

DB_NAME = "normbench_cpu_job"
POLL_S = 0.05
_TICK = os.sysconf("SC_CLK_TCK")


def job_spec(name: str, epochs: int, pack_size: int | None) -> dict[str, Any]:
    seeds = [0, 1, 2, 3]
    if name == "mlp":
        spec: dict[str, Any] = {
            "model": {"arch": "mlp", "hidden": [256, 256]},
            "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 16}],
            "batch_sizes": [2],
        }
    else:
        spec = {
            "model": {"arch": "cnn", "width": 16},
            "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 4}],
            "batch_sizes": [int(name.removeprefix("cnn"))],
        }
    spec.update(dataset_id="digits", name=f"cpu job bench: {name}", seeds=seeds, budget={"epochs": epochs})
    if pack_size is not None:
        spec["pack_size"] = pack_size
    return spec


# ------------------------------------------------------------------------------------------ the plain loop


def plain_loop(spec: dict[str, Any], budget: dict[str, int], data: DeviceData) -> tuple[float, float, int]:
    """The job's runs, one after another, in the best plain loop; returns wall s, CPU s and steps."""
    torch.set_num_threads(1)
    (batch,) = spec["batch_sizes"]
    opt = {"lr": 0.1 * batch / 32, "momentum": 0.9, "weight_decay": 5e-4}
    x_all, y_all = data.prepare(data.x_train), data.y_train  # normalized once, resident
    per_epoch = budget["samples_per_epoch"] // batch
    steps = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for variant in spec["variants"]:
        params = {k: v for k, v in variant.items() if k != "norm"}
        for seed in spec["seeds"]:
            cfg = RunConfig(
                spec["model"]["arch"], variant["norm"], params, batch, seed, budget, spec["model"], {}, {}, 50
            )
            model = build_run_model(cfg, data, torch.device("cpu"))
            sgd = torch.optim.SGD(model.parameters(), **opt)
            for epoch in range(budget["epochs"]):
                order = epoch_order(seed, epoch, budget["train_size"], per_epoch * batch)
                for i in range(per_epoch):
                    idx = order[i * batch : (i + 1) * batch]
                    loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                    sgd.zero_grad(set_to_none=True)
                    loss.backward()
                    sgd.step()
                    steps += 1
    return time.perf_counter() - wall0, time.process_time() - cpu0, steps


# ------------------------------------------------------------------------------------------ the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class Service:
    """Postgres database, API (uvicorn, one process) and `workers` solo workers, all on this machine."""

    def __init__(self, workers: int, threads: int | None, pack_size: int | None) -> None:
        from alembic import command

        from app.devserver import alembic_config, api_command

        self.url = recreate_database(DB_NAME)
        command.upgrade(alembic_config(self.url), "head")
        self.home = Path(tempfile.mkdtemp(prefix="normbench-cpu-job-"))
        prefix = f"cpujob{os.getpid()}:"
        env = {
            "NORMBENCH_DATABASE_URL": self.url,
            "NORMBENCH_BROKER_URL": REDIS_URL,
            "NORMBENCH_BROKER_KEY_PREFIX": prefix,
            "NORMBENCH_STORAGE_URL": self.home.as_uri(),
            "NORMBENCH_HOME": str(self.home),
        }
        if pack_size is not None:
            env["NORMBENCH_PACK_SIZE"] = str(pack_size)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        api_env = {**worker_env(**env)}
        api_env.pop("NORMBENCH_TORCH_THREADS")
        self.api = subprocess.Popen(
            api_command("127.0.0.1", port),
            cwd=ROOT,
            env=api_env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        # The layout under test: `workers` solo workers that know how many they are (each takes cores ÷ workers
        # torch threads, the product's automatic choice) unless --threads names a count.
        wenv = worker_env(**env, NORMBENCH_WORKERS=str(workers))
        wenv["NORMBENCH_TORCH_THREADS"] = str(threads) if threads is not None else "0"
        self.workers = [WorkerProcess(wenv, self.home / f"worker{i}.log") for i in range(workers)]
        self.client = httpx.Client(base_url=self.base, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.api.poll() is not None:
                raise RuntimeError("the API did not start")
            time.sleep(0.3)
        for w in self.workers:
            w.wait_ready()

    def run_job(self, spec: dict[str, Any]) -> tuple[float, list[float], dict[str, Any]]:
        """Submit, poll until finished; returns wall s (POST → finished), each worker's CPU s and the job."""
        pids = [w.proc.pid for w in self.workers]
        cpu0 = [cpu_seconds(p) for p in pids]
        t0 = time.perf_counter()
        resp = self.client.post("/v1/jobs", json=spec)
        if resp.status_code not in (201, 202):
            raise RuntimeError(f"submit refused: {resp.status_code} {resp.text}")
        job_id = resp.json()["id"]
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["progress"]["runs_finished"] == job["progress"]["runs_total"]:
                break
            if time.perf_counter() - t0 > 3600:
                raise RuntimeError(f"job {job_id} did not finish in an hour")
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} ended {job['status']}")
        return wall, cpu, job

    def runs(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.client.get(f"/v1/jobs/{job_id}/runs").json())

    def stop(self) -> None:
        self.client.close()
        for w in self.workers:
            w.stop()
        if self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            try:
                self.api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
        drop_database(DB_NAME)


def timeline(job: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the job's time went, from the server's timestamps: submit → first run started, and each
    worker's span from its first start to its last finish (seconds after the job was created)."""
    t0 = datetime.fromisoformat(job["created_at"])
    spans: dict[str, list[float]] = {}
    for r in runs:
        start = (datetime.fromisoformat(r["started_at"]) - t0).total_seconds()
        end = (datetime.fromisoformat(r["finished_at"]) - t0).total_seconds()
        span = spans.setdefault(r["worker"], [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return {"first_start_s": min(s for s, _ in spans.values()), "worker_spans": sorted(spans.values())}


def default_workers() -> int:
    """What a CPU machine runs by default (app.config's `workers` setting, which follows the cores)."""
    from app.config import Settings

    return Settings().resolved_workers


# ------------------------------------------------------------------------------------------ main


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", nargs="+", default=["mlp", "cnn2", "cnn8"], choices=["mlp", "cnn2", "cnn8"])
    parser.add_argument("--workers", type=int, default=None, help="solo worker processes (default: the product's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: automatic)")
    parser.add_argument("--pack-size", type=int, default=None, help="the job's pack_size (default: the server's)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    workers = args.workers or default_workers()

    ds = digits_dataset()
    path = Path(tempfile.mkdtemp(prefix="normbench-cpu-job-data-")) / "digits.npz"
    save_canonical(ds, path)
    # The workers pay torch's one-time lazy imports (torch._dynamo, with the first optimizer) when they start;
    # so does this process, before anything is timed.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    service = Service(workers, args.threads, args.pack_size)
    rows: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for name in args.jobs:
                spec = job_spec(name, args.epochs, args.pack_size)
                # Alternate which side goes first, so a drift in the machine's load hits both alike.
                order = ("job", "plain") if rnd % 2 == 0 else ("plain", "job")
                row: dict[str, Any] = {"round": rnd + 1, "job": name}
                for side in order:
                    row[f"load_{side}"] = os.getloadavg()[0]
                    if side == "job":
                        wall, cpu, job = service.run_job(spec)
                        runs = service.runs(job["id"])
                        row.update(
                            job_s=wall,
                            job_cpu_s=sum(cpu),
                            job_cpu_busiest_s=max(cpu),
                            job_steps=sum(r["steps_done"] for r in runs),
                            budget=job["budget"],
                            packs=sorted(r["environment"].get("pack_runs", 1) for r in runs),
                            threads=sorted({r["environment"].get("threads") for r in runs}),
                            **timeline(job, runs),
                        )
                    else:
                        budget = row.get("budget") or rows[-len(args.jobs)]["budget"]
                        data = load_device_data(path, budget, torch.device("cpu"))
                        wall, cpu, steps = plain_loop(spec, budget, data)
                        row.update(plain_s=wall, plain_cpu_s=cpu, plain_steps=steps)
                if row["plain_steps"] != row["job_steps"]:
                    raise RuntimeError(
                        f"{name}: the plain loop ran {row['plain_steps']} steps, the job {row['job_steps']}"
                    )
                row["ratio"] = row["job_s"] / row["plain_s"]
                # Load-proof: the busiest worker's CPU time against the plain loop's, about what the wall
                # ratio would be on an idle machine (less the moments between submit and claim).
                row["cpu_ratio"] = row["job_cpu_busiest_s"] / row["plain_cpu_s"]
                rows.append(row)
                print(
                    f"round {rnd + 1} {name:<5} steps {row['job_steps']:>6}  plain {row['plain_s']:6.1f} s "
                    f"({row['plain_cpu_s']:5.1f} CPU s, load {row['load_plain']:.1f})  job {row['job_s']:6.1f} s "
                    f"({row['job_cpu_s']:5.1f} CPU s, load {row['load_job']:.1f})  job/plain {row['ratio']:.2f} (CPU {row['cpu_ratio']:.2f})  "
                    f"workers busy {', '.join(f'{a:.1f}–{b:.1f}' for a, b in row['worker_spans'])} s",
                    flush=True,
                )
    finally:
        service.stop()

    threads = args.threads if args.threads is not None else "auto"
    print(
        f"\nCPU job vs plain loop: {os.cpu_count()} cores, {workers} worker(s) × {threads} torch thread(s), "
        f"pack_size {args.pack_size or 'server default'}, torch {torch.__version__}, {args.rounds} round(s)"
    )
    print(
        f"{'job':<6}{'steps':>8}{'plain s':>14}{'job s':>14}{'job/plain':>12}{'CPU s plain / job':>22}{'CPU ratio':>12}"
    )
    summary = []
    for name in args.jobs:
        mine = [r for r in rows if r["job"] == name]
        ratios = [r["ratio"] for r in mine]
        cpu_ratios = [r["cpu_ratio"] for r in mine]
        summary.append(
            {"job": name, "median_ratio": statistics.median(ratios), "ratios": ratios, "cpu_ratios": cpu_ratios}
        )
        print(
            f"{name:<6}{mine[0]['job_steps']:>8}{spread([r['plain_s'] for r in mine]):>14}"
            f"{spread([r['job_s'] for r in mine]):>14}{f'{min(ratios):.2f}–{max(ratios):.2f}':>12}"
            f"{spread([r['plain_cpu_s'] for r in mine]) + ' / ' + spread([r['job_cpu_s'] for r in mine]):>22}"
            f"{f'{min(cpu_ratios):.2f}–{max(cpu_ratios):.2f}':>12}"
        )
    print(
        "goal: job/plain ≤ 0.50 (the job at least twice as fast as the plain single-thread loop). CPU ratio: the "
        "busiest worker's CPU s / the plain loop's, what job/plain comes to on an idle machine"
    )
    if args.out:
        env = {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "workers": workers,
            "threads": threads,
            "pack_size": args.pack_size,
            "command": " ".join(sys.argv),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows, "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
