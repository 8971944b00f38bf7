"""Serves the browser UI: the page at `/`, its assets from a fixed list under `/ui/`, and the catalogue its form
is built from. Every file ships inside the package; nothing is fetched from elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from app.api.deps import SettingsDep
from app.core.catalogue import ARCHS, AUTO_ARCH, NORMS, PARAMS
from app.schemas.jobs import AugmentSpec, BudgetSpec, JobSpec, ModelSpec, OptimizerSpec

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The served files, fixed when the module loads: a request can name only one of these, never a path.
ASSETS = {p.name: p for p in sorted(STATIC.iterdir()) if p.suffix in MEDIA_TYPES and p.name != "index.html"}

# The UI page runs only its own script file: no inline script, no eval, no other origin. It talks to this API
# (connect-src 'self') and frames only this server's report frame.
UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The frame the job page writes the report into (the report's own inline CSS and SVG): no script runs in it at
# all, and it may be framed only by this server's pages.
FRAME_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the installed version: revalidate (cheap, ETag) rather than run a stale script.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _page(path: Path, csp: str) -> FileResponse:
    return FileResponse(
        path, media_type=MEDIA_TYPES[".html"], headers={**COMMON_HEADERS, "Content-Security-Policy": csp}
    )


@router.get("/")
def index() -> FileResponse:
    return _page(STATIC / "index.html", UI_CSP)


@router.get("/ui/catalogue.json")
def catalogue(settings: SettingsDep) -> JSONResponse:
    """What the new-comparison form offers (norms, their parameters, architectures) and the server's limits,
    from the same catalogue the API validates specs with."""
    body: dict[str, Any] = {
        "norms": [
            {
                "name": n.name,
                "title": n.title,
                "description": n.description,
                "params": list(n.params),
                "needs_spatial": n.needs_spatial,
            }
            for n in NORMS.values()
        ],
        "params": {
            p.name: {
                "kind": p.kind.__name__,
                "low": p.low,
                "high": p.high,
                "default": p.default,
                "description": p.description,
                "sweep": p.name in ("groups", "group_size"),
            }
            for p in PARAMS.values()
        },
        "archs": [
            {"name": a.name, "description": a.description, "input_kinds": list(a.input_kinds)} for a in ARCHS.values()
        ],
        "auto_arch": AUTO_ARCH,  # the network `auto` picks per dataset kind
        "limits": {
            "max_epochs": settings.max_epochs,
            "max_runs_per_job": settings.max_runs_per_job,
            "max_train_samples_per_job": settings.max_train_samples_per_job,
            "max_upload_bytes": settings.max_upload_bytes,
        },
        "defaults": spec_defaults(),
        "require_api_keys": settings.require_api_keys,
    }
    return JSONResponse(body, headers=COMMON_HEADERS)


def spec_defaults() -> dict[str, Any]:
    """The JobSpec defaults the form starts from, read from the schema so the two cannot drift apart."""
    top = ("validation_fraction", "log_every_steps", "precision", "equivalence_margin", "pack_size")
    return {
        "model": ModelSpec().model_dump(),
        "budget": BudgetSpec().model_dump(),
        "optimizer": OptimizerSpec().model_dump(),
        "augment": AugmentSpec().model_dump(),
        **{name: JobSpec.model_fields[name].default for name in top},
    }


@router.get("/ui/{name}")
def asset(name: str) -> Response:
    path = ASSETS.get(name)
    if path is None:
        return JSONResponse({"error": "not_found", "detail": f"no UI file {name[:100]!r}"}, status_code=404)
    if path.suffix == ".html":
        return _page(path, FRAME_CSP)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=COMMON_HEADERS)
