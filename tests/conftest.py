"""Shared fixtures: the real Postgres and Redis, a migrated test database, real worker processes. Tests that
use the services are marked `services` here, so `make test-fast` can leave them out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import redis
from alembic import command
from fastapi.testclient import TestClient

from app.config import Settings
from app.devserver import alembic_config
from app.main import create_app
from app.tables import Base
from tests.support import REDIS_URL, SESSION, WorkerProcess, drop_database, recreate_database, worker_env

if TYPE_CHECKING:
    from workers.data import DeviceData

TEST_DB = f"normbench_test_{SESSION}"
KEY_PREFIX = f"nbtest{SESSION}:"
# Children before parents, so TRUNCATE never trips over a foreign key.
TABLES = tuple(t.name for t in reversed(Base.metadata.sorted_tables))
# Every fixture that reaches Postgres, Redis or a worker; the others build on these.
SERVICE_FIXTURES = frozenset({"pg_url", "redis_client", "worker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test whose fixtures (direct or inherited) reach a service as `services`."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


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


@pytest.fixture(scope="module")
def worker(pg_url: str, storage_dir: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("worker")
    env = worker_env(
        NORMBENCH_DATABASE_URL=pg_url,
        NORMBENCH_BROKER_URL=REDIS_URL,
        NORMBENCH_BROKER_KEY_PREFIX=KEY_PREFIX,
        NORMBENCH_STORAGE_URL=storage_dir.as_uri(),
        NORMBENCH_HOME=str(log_dir / "home"),
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
    from app.core.dataset_format import save_canonical
    from app.services.builtin import digits_dataset
    from workers.data import load_device_data

    ds = digits_dataset()
    path = Path(tmp_path_factory.mktemp("digits")) / "digits.npz"
    save_canonical(ds, path)
    val = holdout_size(ds.num_samples, 0.2)
    budget = resolve_budget(ds.num_samples - val, val, 1, [2, 8, 32])
    return load_device_data(path, budget, torch.device("cpu")), budget
