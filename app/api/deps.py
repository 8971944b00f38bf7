"""Request dependencies as `Annotated` aliases, so route signatures stay short and typed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_factory
from app.storage import Storage, open_storage


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


def get_storage(settings: SettingsDep) -> Storage:
    return open_storage(settings.resolved_storage_url)


def get_owner(settings: SettingsDep) -> str:
    # Single-owner until API keys exist; every query is already scoped by this value.
    return settings.default_owner


SessionDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[Storage, Depends(get_storage)]
OwnerDep = Annotated[str, Depends(get_owner)]
