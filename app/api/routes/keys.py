"""Admin endpoints for API keys, enabled by NORMBENCH_ADMIN_TOKEN (the `normbench-admin` CLI needs no token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import AdminDep, SessionDep
from app.schemas.common import ERROR_RESPONSES
from app.schemas.keys import KeyCreate, KeyCreated, KeyList, KeyOut
from app.services import keys as service

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], dependencies=[AdminDep])
ERRORS = ERROR_RESPONSES


@router.post("", status_code=201, response_model=KeyCreated, responses=ERRORS, summary="Create an API key")
def create_key(body: KeyCreate, session: SessionDep, response: Response) -> KeyCreated:
    new = service.create_key(session, body.owner, body.name)
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(**KeyOut.model_validate(new.row).model_dump(), token=new.token)


@router.get("", response_model=KeyList, responses=ERRORS, summary="List API keys")
def list_keys(
    session: SessionDep,
    owner: Annotated[str | None, Query(max_length=64, description="Only this owner's keys.")] = None,
) -> KeyList:
    return KeyList(items=[KeyOut.model_validate(k) for k in service.list_keys(session, owner)])


@router.delete("/{key_id}", response_model=KeyOut, responses=ERRORS, summary="Revoke an API key (401 at once)")
def revoke_key(key_id: str, session: SessionDep) -> KeyOut:
    return KeyOut.model_validate(service.revoke_key(session, key_id))
