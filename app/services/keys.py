"""API keys: create (the token is returned once), authenticate, list, revoke.

A token is `nb_<prefix>_<secret>`: `prefix` is 12 hex characters stored in clear to find the row,
`secret` is 32 random bytes (64 hex characters) of which only the SHA-256 is stored. A secret with
256 bits of entropy needs no salt or slow hash: nobody can guess a preimage of its digest. Hashes are
compared with `hmac.compare_digest`. Nothing here logs a token or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidSpec, NotFound, Unauthorized
from app.tables import ApiKey, utcnow

TOKEN_PREFIX = "nb"
_TOKEN_RE = re.compile(r"^nb_([0-9a-f]{12})_([0-9a-f]{64})$")
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DUMMY_HASH = hashlib.sha256(b"normbench-no-such-key").hexdigest()

AUTH_HINT = "send `Authorization: Bearer nb_...` with a key from `normbench-admin create-key --owner NAME`"


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    token: str  # shown once, never stored


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def check_owner_name(owner: str) -> str:
    if not OWNER_RE.match(owner):
        raise InvalidSpec(
            f"owner {owner[:80]!r} is not a valid account name: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return owner


def create_key(session: Session, owner: str, name: str | None = None) -> NewKey:
    check_owner_name(owner)
    prefix = secrets.token_hex(6)
    secret = secrets.token_hex(32)
    row = ApiKey(owner=owner, prefix=prefix, secret_hash=hash_secret(secret), name=name)
    session.add(row)
    session.commit()
    return NewKey(row=row, token=f"{TOKEN_PREFIX}_{prefix}_{secret}")


def authenticate(session: Session, token: str | None) -> str:
    """The owner a bearer token acts as; Unauthorized (401) for a missing, malformed, unknown or revoked key."""
    if not token:
        raise Unauthorized(f"this server requires an API key; {AUTH_HINT}")
    match = _TOKEN_RE.match(token.strip())
    if match is None:
        raise Unauthorized(f"the API key is malformed (expected nb_<12 hex>_<64 hex>); {AUTH_HINT}")
    prefix, secret = match.groups()
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    # Compare even when the prefix is unknown, so both failures take the same path.
    ok = hmac.compare_digest(hash_secret(secret), row.secret_hash if row is not None else _DUMMY_HASH)
    if row is None or not ok:
        raise Unauthorized(f"the API key is not valid; {AUTH_HINT}")
    if row.revoked_at is not None:
        raise Unauthorized(f"the API key was revoked; ask an administrator for a new one ({AUTH_HINT})")
    return row.owner


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at.desc())
    if owner is not None:
        stmt = stmt.where(ApiKey.owner == owner)
    return list(session.scalars(stmt))


def find_key(session: Session, key_id_or_prefix: str) -> ApiKey:
    """By id, by prefix, or by a whole token (only its prefix part is used)."""
    ref = key_id_or_prefix.strip()
    match = _TOKEN_RE.match(ref)
    if match is not None:
        ref = match.group(1)
    row = session.scalars(select(ApiKey).where((ApiKey.id == ref) | (ApiKey.prefix == ref))).first()
    if row is None:
        raise NotFound(
            f"API key '{ref[:80]}' not found; GET /v1/admin/keys (or `normbench-admin list-keys`) lists keys"
        )
    return row


def revoke_key(session: Session, key_id_or_prefix: str) -> ApiKey:
    """Revocation is immediate: every request looks the key up, nothing caches it."""
    row = find_key(session, key_id_or_prefix)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row
