"""The embedded default (SQLite + filesystem broker + one local worker), driven like `make run`."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, worker_env

pytestmark = pytest.mark.e2e  # the demo runs on a real local worker process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_devserver_runs_the_demo_on_sqlite(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cmd = [
        sys.executable,
        "-m",
        "app.devserver",
        "--exit-after-demo",
        "--epochs",
        "2",
        "--seeds",
        "1",
        "--port",
        str(free_port()),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=worker_env(NORMBENCH_HOME=str(home)), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sqlite:///" in out and "finished in" in out and "status succeeded" in out, out
    table = out[out.index("final validation accuracy") :]
    assert "bn" in table and "gn(16)" in table and "batch 2" in table and "batch 32" in table
    assert "%" in table and "—" not in table.split("results:")[0]
    assert "[queues]" not in out and "-------------- " not in out  # no Celery start-up banner
    assert (home / "normbench.db").exists() and any((home / "storage" / "datasets").iterdir())
