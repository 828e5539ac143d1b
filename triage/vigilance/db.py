"""The vigilance records in PostgreSQL: connecting, and the schema's migrations.

Migrations are the plain SQL files of ``migrations/``, applied in name order, each in its own
transaction, and recorded with their SHA-256 in ``schema_migrations``: a migration is applied
once, and one edited after it was applied is refused rather than silently diverging from the
databases that ran the original. Processes that start together (the API processes, workers)
may all migrate: a transaction-scoped advisory lock makes them take turns.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import psycopg
from psycopg.rows import TupleRow

from triage.errors import TransientError, TriageError
from triage.settings import Settings

MIGRATIONS_PACKAGE = "triage.vigilance"
MIGRATIONS_FOLDER = "migrations"
# Key of the advisory lock that serialises migrators ("triage" in ASCII, then 1).
MIGRATION_LOCK = 0x7472696167650001

_CREATE_MIGRATIONS_TABLE = b"""
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    sha256      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationChanged(TriageError):
    """A migration already applied to the database differs from the file shipped now."""


def connect(settings: Settings, *, timeout_seconds: int | None = None,
            statement_timeout_ms: int | None = None) -> psycopg.Connection[TupleRow]:
    """A connection to the service's database (``TRIAGE_DATABASE_URL`` or the local one).

    Work that must never wait long on a database that does not answer (a study's analysis,
    a radiologist's feedback) gives a connect timeout and a statement timeout. Raises
    ``TransientError`` when PostgreSQL cannot be reached.
    """
    options = (f"-c statement_timeout={statement_timeout_ms}"
               if statement_timeout_ms is not None else None)
    try:
        return psycopg.connect(settings.database_connection_url,
                               connect_timeout=timeout_seconds, options=options)
    except psycopg.OperationalError as error:
        raise TransientError(f"PostgreSQL unreachable: {error}") from error


def migrations() -> list[tuple[str, bytes]]:
    """(name, SQL) of every migration shipped with the package, in the order they apply."""
    folder = resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_FOLDER)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")),
                   key=lambda f: f.name)
    return [(f.name, f.read_bytes()) for f in files]


def migrate(connection: psycopg.Connection[TupleRow]) -> list[str]:
    """Apply the migrations the database lacks; return their names (empty when up to date).

    Raises ``MigrationChanged`` when an applied migration's SQL is not the shipped one.
    """
    applied: list[str] = []
    for name, text in migrations():
        digest = hashlib.sha256(text).hexdigest()
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            connection.execute(_CREATE_MIGRATIONS_TABLE)
            row = connection.execute("SELECT sha256 FROM schema_migrations WHERE name = %s",
                                     (name,)).fetchone()
            if row is not None:
                if row[0] != digest:
                    raise MigrationChanged(f"migration {name} was applied with SHA-256 "
                                           f"{row[0]}, the shipped file has {digest}")
                continue
            connection.execute(text)
            connection.execute("INSERT INTO schema_migrations (name, sha256) VALUES (%s, %s)",
                               (name, digest))
        applied.append(name)
    return applied
