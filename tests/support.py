"""Helpers the tests and the benches share: the test Postgres server, throwaway databases, real worker
processes, API keys, raw ASGI requests and the upload harness. Importing this module connects to nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from pydantic import SecretStr

from app.config import Settings
from app.devserver import worker_command

if TYPE_CHECKING:  # the benches import this module without the test client
    import pytest
    from fastapi.testclient import TestClient

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


ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def keyed_settings(settings: Settings) -> Settings:
    """`settings` with API keys required and ADMIN_TOKEN as the admin token, after deleting every key."""
    with psycopg.connect(settings.resolved_database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("TRUNCATE api_keys")
    return settings.model_copy(update={"require_api_keys": True, "admin_token": SecretStr(ADMIN_TOKEN)})


def make_key(client: TestClient, owner: str) -> dict[str, str]:
    """A new API key for `owner` (through the admin endpoint), as request headers."""
    resp = client.post("/v1/admin/keys", json={"owner": owner}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def http_scope(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    server: tuple[str, int] = ("testserver", 80),
    client: tuple[str, int] = ("testclient", 5000),
) -> dict[str, Any]:
    """An ASGI HTTP scope, for the tests that call the app below the test client (their own server address,
    their own body pacing)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [],
        "server": server,
        "client": client,
        "scheme": "http",
        "root_path": "",
    }


class UploadHarness:
    """A client on the real app with its own limits, and the checks that a refused request left nothing behind.
    A subclass says what is stored (`stored`: rows and files to compare before and after)."""

    def __init__(self, client: TestClient, settings: Settings, tmp: Path) -> None:
        self.client, self.settings, self.tmp = client, settings, tmp

    def stored(self) -> Any:
        raise NotImplementedError

    def assert_nothing_left(self, before: Any) -> None:
        assert self.stored() == before, "a refused request left a row or a stored file"
        assert list(self.tmp.iterdir()) == [], "temporary files were left behind"

    def assert_refused(self, send: Callable[[], Any], status: int, *needles: str) -> str:
        """`send()` is answered `status` with an error body whose detail holds every needle; returns the detail."""
        before = self.stored()
        resp = send()
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert set(body) == {"error", "detail"}
        for needle in needles:
            assert needle in body["detail"], body["detail"]
        self.assert_nothing_left(before)
        return str(body["detail"])


H = TypeVar("H")


def upload_harness(
    harness: Callable[[TestClient, Settings, Path], H],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., AbstractContextManager[H]]:
    """`make(**limits)`: a `harness(client, settings, tmp)` on the real app with these settings' limits, where
    every temporary file of a request lands in `tmp` (so a test can see that none was left)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    @contextmanager
    def make(**limits: Any) -> Iterator[H]:
        s = settings.model_copy(update=limits)
        with TestClient(create_app(s)) as c:
            yield harness(c, s, tmp)

    return make


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The API on a free loopback port, served by uvicorn in a thread; yields its base URL."""
    import threading

    import uvicorn

    from app.main import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`check()`'s first truthy value, polled every 50 ms; an AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
