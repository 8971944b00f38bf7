"""The CPU thread layout a machine gets by default (issue 16): one worker per core, each with the cores it gets as
torch threads. Oversubscribing (2 OpenMP threads per process on 2 busy cores) made CPU training ~20x slower, so
these defaults are what makes a CPU job faster than the plain loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import app.config as config
from app.config import MAX_AUTO_WORKERS, Settings


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(config, "usable_cores", lambda: n)

    # No GPU on the machine being modelled, whatever this one has.
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: False if str(p) == "/dev/nvidia0" else real_exists(p))
    return set_cores


@pytest.mark.parametrize(
    ("n_cores", "workers", "threads"),
    [(1, 1, 1), (2, 2, 1), (16, MAX_AUTO_WORKERS, 16 // MAX_AUTO_WORKERS)],
)
def test_default_layout_is_a_worker_per_core_up_to_the_cap(cores, n_cores: int, workers: int, threads: int) -> None:
    cores(n_cores)
    s = Settings(workers=0, torch_threads=0)
    assert s.resolved_workers == workers
    assert s.cpu_threads() == threads
    assert s.resolved_workers * s.cpu_threads() <= n_cores  # never more threads than cores


def test_explicit_settings_win(cores) -> None:
    cores(8)
    assert Settings(workers=2, torch_threads=0).cpu_threads() == 4  # the cores shared by the workers asked for
    assert Settings(workers=2, torch_threads=3).cpu_threads() == 3
    assert Settings(workers=3, torch_threads=0).resolved_workers == 3


def test_gpu_machine_runs_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cores", lambda: 16)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: True if str(p) == "/dev/nvidia0" else real_exists(p))
    assert Settings(workers=0).resolved_workers == 1


def test_worker_applies_the_layout_to_torch() -> None:
    """In a fresh process (torch's thread count is process-wide): the worker's start-up sets it from the settings."""
    code = (
        "import torch\n"
        "from workers.lifecycle import apply_thread_setting\n"
        "torch.set_num_threads(2)\n"
        "apply_thread_setting()\n"
        "print(torch.get_num_threads())\n"
    )
    env = {"NORMBENCH_TORCH_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
