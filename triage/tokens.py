"""API bearer tokens and the roles they carry.

A token is shown once, when it is created; Redis keeps only its SHA-256, with the owner's name
and the role.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from enum import Enum

import redis
from pydantic import BaseModel

from triage.worklist import utcnow

TOKENS_KEY = "triage:tokens"
TOKEN_PREFIX = "trg_"


class Role(str, Enum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    INTEGRATION = "integration"


class TokenRecord(BaseModel):
    owner: str
    role: Role
    created_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(connection: redis.Redis, *, role: Role | str, owner: str) -> str:
    """Create a token for ``owner`` with ``role``; the token itself is never stored."""
    record = TokenRecord(owner=owner, role=Role(role), created_at=utcnow())
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    connection.hset(TOKENS_KEY, _digest(token), record.model_dump_json())
    return token


def verify_token(connection: redis.Redis, token: str) -> TokenRecord | None:
    """The record of a valid token, ``None`` for an unknown one."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    raw = connection.hget(TOKENS_KEY, _digest(token))
    return TokenRecord.model_validate_json(raw) if raw else None
