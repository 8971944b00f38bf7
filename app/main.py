"""Builds the FastAPI application (`uvicorn app.main:app`)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.api.lifespan import lifespan_for
from app.api.middleware import install_middleware
from app.api.router import api_router
from app.config import Settings, get_settings
from app.errors import install_error_handlers
from app.ui.router import router as ui_router

DESCRIPTION = (
    "NormBench tells you, with evidence, which normalization layer to use for your data at the batch "
    "size you can afford. Upload a dataset, submit a job comparing BatchNorm, GroupNorm and other "
    "variants over batch sizes and seeds on one fixed budget, poll it, and read the results."
)
DOCS_ASSETS_URL = "/docs-assets"  # Swagger UI and ReDoc files, served from the fastapi-offline package


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # FastAPIOffline: /docs and /redoc load their scripts from this server, not a CDN, so they work offline.
    # validatorUrl None: Swagger UI would otherwise send the spec to an online validator for its badge.
    app = FastAPIOffline(
        title="NormBench",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan_for(settings),
        static_url=DOCS_ASSETS_URL,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(api_router)
    app.include_router(ui_router)  # the browser UI at `/` (app/ui)
    install_middleware(app, settings)
    return app


app = create_app()
