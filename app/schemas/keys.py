"""API keys as the admin endpoints accept and return them (the secret only once, at creation)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import UtcTimestamp


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
    created_at: UtcTimestamp = Field(description="When the key was created.")
    revoked_at: UtcTimestamp | None = Field(description="When the key was revoked; null while it is valid.")


class KeyCreated(KeyOut):
    token: str = Field(description="The API key. Shown only in this response: store it now, it cannot be recovered.")


class KeyList(BaseModel):
    items: list[KeyOut] = Field(description="Keys, newest first (secrets are never shown).")
