"""The API and the CLI never import torch, the worker or the models: modules are imported in a fresh
interpreter and its sys.modules inspected, so one stray import anywhere below them fails here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

FORBIDDEN = ("torch", "workers", "models")
# Prints, as JSON, the forbidden modules loaded after the imports placed before it.
REPORT = f"import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))"


def forbidden_after(imports: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", f"{imports}\n{REPORT}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("module", ["app.main", "app.cli"])
def test_the_api_and_the_cli_import_no_torch_workers_or_models(module: str) -> None:
    assert forbidden_after(f"import {module}") == []


def test_no_module_of_app_imports_torch_workers_or_models() -> None:
    walk = "import importlib, pkgutil, app\nfor m in pkgutil.walk_packages(app.__path__, 'app.'): importlib.import_module(m.name)"
    assert forbidden_after(walk) == []
