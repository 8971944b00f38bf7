"""Admin endpoints for API keys, enabled by NORMBENCH_ADMIN_TOKEN (the `normbench-admin` CLI needs no token)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminDep, SessionDep
from app.schemas.common import ERROR_RESPONSES
from app.services import keys as service

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], dependencies=[AdminDep])
ERRORS = ERROR_RESPONSES


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
        description="Account the key acts as; every object it creates belongs to this owner.",
    )
    name: str | None = Field(None, max_length=200, description="Label to recognise the key by, e.g. `laptop`.")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="Key id (use it to revoke the key).")
    owner: str = Field(description="Account the key acts as.")
    prefix: str = Field(description="Public part of the token, `nb_<prefix>_...`, to recognise it.")
    name: str | None = Field(description="Label given at creation.")
    created_at: datetime = Field(description="When the key was created.")
    revoked_at: datetime | None = Field(description="When the key was revoked; null while it is valid.")


class KeyCreated(KeyOut):
    token: str = Field(description="The API key. Shown only in this response: store it now, it cannot be recovered.")


class KeyList(BaseModel):
    items: list[KeyOut] = Field(description="Keys, newest first (secrets are never shown).")


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
