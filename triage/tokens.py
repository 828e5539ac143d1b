"""API bearer tokens: the role they carry, who they are for, when they expire.

A token is shown once, when it is created; Redis keeps only its SHA-256 with the owner, the
role, the expiry and, once revoked, when. Tokens are listed and revoked by a short id (the
start of that hash), never by the secret.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import Enum
from typing import cast

import redis
from pydantic import BaseModel

from triage.errors import TriageError
from triage.worklist import utcnow

TOKENS_KEY = "triage:tokens"
TOKEN_PREFIX = "trg_"
DEFAULT_TOKEN_DAYS = 90
_ID_LENGTH = 12


class Role(str, Enum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    INTEGRATION = "integration"


class TokenRecord(BaseModel):
    id: str = ""
    owner: str
    role: Role
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def valid(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class TokenNotFound(TriageError):
    """No token has this id."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(connection: redis.Redis, *, role: Role | str, owner: str,
                 days: int | None = DEFAULT_TOKEN_DAYS) -> str:
    """Create a token for ``owner`` with ``role``, valid ``days`` (None: until revoked)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = _digest(token)
    now = utcnow()
    record = TokenRecord(id=digest[:_ID_LENGTH], owner=owner, role=Role(role), created_at=now,
                         expires_at=now + timedelta(days=days) if days else None)
    connection.hset(TOKENS_KEY, digest, record.model_dump_json())
    return token


def verify_token(connection: redis.Redis, token: str) -> TokenRecord | None:
    """The record of a valid token; ``None`` for an unknown, expired or revoked one."""
    field = token_field(token)
    return valid_record(connection.hget(TOKENS_KEY, field) if field else None)


def token_field(token: str) -> str | None:
    """Where a token's record is kept in ``TOKENS_KEY``; ``None`` for what is no token of
    this service (it is then not looked up at all)."""
    return _digest(token) if token.startswith(TOKEN_PREFIX) else None


def valid_record(raw: bytes | str | None) -> TokenRecord | None:
    """The stored record of a token if it is still valid (not expired, not revoked)."""
    if not raw:
        return None
    record = TokenRecord.model_validate_json(raw)
    return record if record.valid(utcnow()) else None


def list_tokens(connection: redis.Redis) -> list[TokenRecord]:
    raw = cast(dict[bytes, bytes], connection.hgetall(TOKENS_KEY))
    return sorted((TokenRecord.model_validate_json(v) for v in raw.values()),
                  key=lambda r: r.created_at)


def revoke_token(connection: redis.Redis, token_id: str) -> TokenRecord:
    """Revoke the token whose id is ``token_id``; it stops working at once."""
    raw = cast(dict[bytes, bytes], connection.hgetall(TOKENS_KEY))
    for digest, value in raw.items():
        record = TokenRecord.model_validate_json(value)
        if record.id == token_id:
            record.revoked_at = record.revoked_at or utcnow()
            connection.hset(TOKENS_KEY, digest, record.model_dump_json())
            return record
    raise TokenNotFound(f"no token with id {token_id}")
