"""The API and the CLI never import torch, the worker or the models. One fresh interpreter imports app.main,
then app.cli, then every other module of app, and reports after each step which forbidden modules are
loaded, so a stray import anywhere below them fails here and names the step that brought it in."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.support import ROOT

FORBIDDEN = ("torch", "workers", "models")
PROBE = f"""
import importlib, json, pkgutil, sys
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
report = {{}}
import app.main
report["app.main"] = loaded()
import app.cli
report["app.cli"] = loaded()
import app
for m in pkgutil.walk_packages(app.__path__, "app."):
    importlib.import_module(m.name)
report["every module of app"] = loaded()
print(json.dumps(report))
"""


def test_app_imports_no_torch_workers_or_models() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"app.main": [], "app.cli": [], "every module of app": []}


def test_every_pydantic_model_of_the_api_lives_in_app_schemas() -> None:
    """The API's request and response shapes have one home (DESIGN.md): no BaseModel subclass elsewhere in app/."""
    strays = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
        for path in sorted((ROOT / "app").rglob("*.py"))
        if "schemas" not in path.parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "BaseModel" for b in node.bases)
    ]
    assert strays == []
