"""Request dependencies as `Annotated` aliases, so route signatures stay short and typed."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_factory
from app.errors import NotFound, Unauthorized
from app.services import keys
from app.storage import Storage, settings_storage


async def get_settings_dep(request: Request) -> Settings:
    # async: FastAPI would run a plain `def` dependency in a worker thread, a hop per request for an attribute.
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


def get_storage(settings: SettingsDep) -> Storage:
    return settings_storage(settings)


SessionDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[Storage, Depends(get_storage)]

# auto_error=False: a missing header is answered by `get_owner` with our JSON error body.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key `nb_<prefix>_<secret>` from `normbench-admin create-key --owner NAME` "
    "(or POST /v1/admin/keys). Required when the server runs with NORMBENCH_REQUIRE_API_KEYS=true.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_owner(settings: SettingsDep, session: SessionDep, credentials: BearerDep) -> str:
    """The account every query of this request is scoped by.

    Keys off (the loopback-only embedded default): everyone is `settings.default_owner`.
    Keys on: the owner of a valid, unrevoked API key; anything else is a 401.
    """
    return resolve_owner(settings, session, credentials)


def resolve_owner(settings: Settings, session: Session, credentials: HTTPAuthorizationCredentials | None) -> str:
    """`get_owner` for code that runs in its own database thread (the async hot paths)."""
    if not settings.require_api_keys:
        return settings.default_owner
    return keys.authenticate(session, credentials.credentials if credentials else None)


OwnerDep = Annotated[str, Depends(get_owner)]


def require_admin(settings: SettingsDep, credentials: BearerDep) -> None:
    """The admin endpoints exist only when NORMBENCH_ADMIN_TOKEN is set; the token is compared in constant time."""
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected:
        raise NotFound("the admin API is disabled (NORMBENCH_ADMIN_TOKEN is not set); use `normbench-admin` instead")
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("the admin endpoints need `Authorization: Bearer <NORMBENCH_ADMIN_TOKEN>`")


AdminDep = Depends(require_admin)
