"""Builds the FastAPI application (`uvicorn app.main:app`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError, ProgrammingError

from app.api.router import api_router
from app.config import Settings, get_settings
from app.db import session_scope
from app.errors import install_error_handlers
from app.services.builtin import ensure_builtin_datasets
from app.storage import open_storage

DESCRIPTION = (
    "NormBench tells you, with evidence, which normalization layer to use for your data at the batch "
    "size you can afford. Upload a dataset, submit a job comparing BatchNorm, GroupNorm and other "
    "variants over batch sizes and seeds on one fixed budget, poll it, and read the results."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            with session_scope(settings.resolved_database_url) as session:
                ensure_builtin_datasets(session, open_storage(settings.resolved_storage_url))
        except (OperationalError, ProgrammingError) as e:
            raise RuntimeError(
                f"database at {settings.resolved_database_url!r} is not ready ({type(e).__name__}); "
                "run `alembic upgrade head` first"
            ) from e
        yield

    app = FastAPI(title="NormBench", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(api_router)
    return app


app = create_app()
