"""Helpers the tests and the benches share: the test Postgres server, throwaway databases and real worker
processes. Importing this module connects to nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from app.config import Settings
from app.devserver import worker_command

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("NORMBENCH_TEST_PG", "postgres@127.0.0.1:5432")
PG_ADMIN_URL = f"postgresql://{PG_SERVER}/test"
REDIS_URL = os.environ.get("NORMBENCH_TEST_REDIS", "redis://127.0.0.1:6379/15")
# Names this process's databases and Redis keys, so test sessions running side by side never meet.
SESSION = f"{os.getpid()}"


def recreate_database(name: str) -> str:
    """An empty Postgres database called `name` (dropped first if it exists); returns its SQLAlchemy URL."""
    drop_database(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG_SERVER}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def stored_files(settings: Settings) -> list[Path]:
    """Every file under the settings' file:// storage root."""
    root = Path(settings.resolved_storage_url.removeprefix("file://"))
    return sorted(p for p in root.rglob("*") if p.is_file())


def worker_env(**overrides: str) -> dict[str, str]:
    """This process's environment without its NORMBENCH_ settings, one torch thread, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMBENCH_")}
    env.update({"NORMBENCH_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **overrides)
    return env


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
