"""The audit trail of the vigilance records, in PostgreSQL.

The records of post-market surveillance are regulatory records, and so is who changed them:
each change is written here in the caller's transaction, with the change itself, so that a
change without its trail entry (or the reverse) cannot be committed. The trail is
append-only (the database refuses updates and deletes). The service's other audit trail, of
reading and working the worklist, stays in Redis (``triage.audit``); the vigilance API
writes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

Connection = psycopg.Connection[TupleRow]


@dataclass(frozen=True)
class TrailEntry:
    id: int
    at: datetime
    actor: str
    action: str
    model_id: str | None
    version: str | None
    study_uid: str | None
    details: dict[str, Any]


def record(conn: Connection, *, actor: str, action: str, details: dict[str, Any] | None = None,
           model_id: str | None = None, version: str | None = None,
           study_uid: str | None = None, at: datetime | None = None) -> None:
    """Add one entry in the caller's transaction (committed, or rolled back, with it)."""
    conn.execute(
        "INSERT INTO trail (at, actor, action, model_id, version, study_uid, details) "
        "VALUES (COALESCE(%s, now()), %s, %s, %s, %s, %s, %s)",
        (at, actor, action, model_id, version, study_uid, Jsonb(details or {})))


def entries(conn: Connection, *, action: str | None = None, model_id: str | None = None,
            limit: int = 500) -> list[TrailEntry]:
    """The latest entries first, optionally of one action or model."""
    rows = conn.execute(
        "SELECT id, at, actor, action, model_id, version, study_uid, details FROM trail "
        "WHERE (%(action)s::text IS NULL OR action = %(action)s) "
        "AND (%(model)s::text IS NULL OR model_id = %(model)s) "
        "ORDER BY id DESC LIMIT %(limit)s",
        {"action": action, "model": model_id, "limit": limit}).fetchall()
    return [TrailEntry(*row) for row in rows]
