"""Shared fixtures: the real Postgres and Redis, a migrated test database, real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis
from alembic import command
from fastapi.testclient import TestClient

from app.config import Settings
from app.devserver import alembic_config, worker_command
from app.main import create_app

if TYPE_CHECKING:
    from workers.data import DeviceData

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("NORMBENCH_TEST_PG", "postgres@127.0.0.1:5432")
PG_ADMIN_URL = f"postgresql://{PG_SERVER}/test"
# Per-session database and Redis key prefix, so test sessions running side by side never meet.
SESSION = f"{os.getpid()}"
TEST_DB = f"normbench_test_{SESSION}"
PG_URL = f"postgresql+psycopg://{PG_SERVER}/{TEST_DB}"
REDIS_URL = os.environ.get("NORMBENCH_TEST_REDIS", "redis://127.0.0.1:6379/15")
KEY_PREFIX = f"nbtest{SESSION}:"
TABLES = ("metric_points", "runs", "jobs", "datasets")


def recreate_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG_SERVER}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = recreate_database(TEST_DB)
    command.upgrade(alembic_config(url), "head")
    yield url
    drop_database(TEST_DB)


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(f"{KEY_PREFIX}*"):
        client.delete(key)


@pytest.fixture
def settings(pg_url: str, storage_dir: Path, redis_client: redis.Redis, tmp_path: Path) -> Settings:
    """Settings for the real stack, with every table emptied and the train queue drained."""
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    redis_client.delete(f"{KEY_PREFIX}train")
    return Settings(
        home=tmp_path / "home",
        database_url=pg_url,
        broker_url=REDIS_URL,
        broker_key_prefix=KEY_PREFIX,
        storage_url=storage_dir.as_uri(),
        max_epochs=50,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def stored_files(settings: Settings) -> list[Path]:
    root = Path(settings.resolved_storage_url.removeprefix("file://"))
    return sorted(p for p in root.rglob("*") if p.is_file())


class WorkerProcess:
    """A real `celery worker` process with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        cmd = worker_command("INFO", "--without-gossip", "--without-mingle")
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()}")
            if b"ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def worker_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMBENCH_")}
    env.update({"NORMBENCH_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **overrides)
    return env


@pytest.fixture(scope="module")
def worker(pg_url: str, storage_dir: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("worker")
    env = worker_env(
        NORMBENCH_DATABASE_URL=pg_url,
        NORMBENCH_BROKER_URL=REDIS_URL,
        NORMBENCH_BROKER_KEY_PREFIX=KEY_PREFIX,
        NORMBENCH_STORAGE_URL=storage_dir.as_uri(),
        NORMBENCH_HOME=str(log_dir / "home"),
        # One run per task, so tests can reason about which run starts when; packing has its own tests.
        NORMBENCH_PACK_SIZE="1",
    )
    proc = WorkerProcess(env, log_dir / "worker.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeviceData, dict[str, int]]:
    """The built-in digits set on the CPU, as a worker loads it, with a 1-epoch budget for batch 2, 8, 32."""
    import torch

    from app.core.budget import holdout_size, resolve_budget
    from app.services.builtin import digits_dataset
    from app.core.dataset_format import save_canonical
    from workers.data import load_device_data

    ds = digits_dataset()
    path = Path(tmp_path_factory.mktemp("digits")) / "digits.npz"
    save_canonical(ds, path)
    val = holdout_size(ds.num_samples, 0.2)
    budget = resolve_budget(ds.num_samples - val, val, 1, [2, 8, 32])
    return load_device_data(path, budget, torch.device("cpu")), budget
