"""The vigilance records in a real PostgreSQL (Debian's, started like ``triage up`` does, on a
free port): migrations apply once even when processes race, and the schema refuses records an
auditor would reject."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError

from tests.conftest import free_port
from triage.errors import TransientError
from triage.settings import Settings
from triage.vigilance.db import MigrationChanged, connect, migrate, migrations

pytestmark = pytest.mark.servers

TABLES = {"schema_migrations", "model_versions", "model_version_changes", "analyses",
          "analysis_outputs", "ground_truth", "baselines", "alerts", "trail", "arrivals",
          "alert_notifications"}
SHIPPED = ["0001_records.sql", "0002_trail.sql", "0003_drift.sql"]
STUDY = "1.2.826.0.1.3680043.8.498.1"
SHA = "ab" * 32


def tables(connection: psycopg.Connection) -> set[str]:
    rows = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


def test_local_server_has_the_triage_database(postgres_local: Settings) -> None:
    with connect(postgres_local) as connection:
        row = connection.execute("SELECT current_user, current_database(), "
                                 "current_setting('server_encoding')").fetchone()
    assert row == ("triage", "triage", "UTF8")
    assert (postgres_local.data_dir / "postgres" / "data" / "PG_VERSION").is_file()


def test_tcp_needs_the_password(postgres_local: Settings) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://triage:wrong@127.0.0.1:{postgres_local.postgres_port}/triage")


def test_unreachable_database_is_transient(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://triage:s3cr3t-Pa55@"
                        f"127.0.0.1:{free_port()}/triage")
    with pytest.raises(TransientError, match="PostgreSQL unreachable"):
        connect(settings)


def test_migrations_apply_once(vigilance_database: Settings) -> None:
    assert [name for name, _ in migrations()] == SHIPPED
    with connect(vigilance_database) as connection:
        assert migrate(connection) == SHIPPED
        assert migrate(connection) == []
        assert tables(connection) == TABLES
        applied = connection.execute("SELECT name, applied_at FROM schema_migrations").fetchall()
    assert [name for name, _ in applied] == SHIPPED
    assert applied[0][1].utcoffset() is not None


def test_concurrent_migrators_apply_each_migration_once(vigilance_database: Settings) -> None:
    start = threading.Barrier(4)
    results: list[list[str]] = []

    def migrator() -> None:
        with connect(vigilance_database) as connection:
            start.wait()
            results.append(migrate(connection))

    threads = [threading.Thread(target=migrator) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert sorted(name for result in results for name in result) == SHIPPED
    with connect(vigilance_database) as connection:
        assert tables(connection) == TABLES
        count = connection.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert count == (len(SHIPPED),)


def test_edited_migration_is_refused(vigilance_db: psycopg.Connection) -> None:
    vigilance_db.execute("UPDATE schema_migrations SET sha256 = %s", (SHA,))
    vigilance_db.commit()
    with pytest.raises(MigrationChanged, match="0001_records.sql"):
        migrate(vigilance_db)


def add_version(connection: psycopg.Connection, version: str, state: str) -> None:
    connection.execute("INSERT INTO model_versions (model_id, version, sha256, state, changed_by)"
                       " VALUES ('chest-ct', %s, %s, %s, 'admin')", (version, SHA, state))


def test_model_version_states(vigilance_db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        add_version(vigilance_db, "1.0.0", "beta")
    add_version(vigilance_db, "1.0.0", "active")
    add_version(vigilance_db, "1.1.0", "shadow")
    with pytest.raises(psycopg.errors.UniqueViolation), vigilance_db.transaction():
        vigilance_db.execute("UPDATE model_versions SET state = 'active' WHERE version = '1.1.0'")
    vigilance_db.execute("UPDATE model_versions SET state = 'retired', changed_by = 'qa' "
                     "WHERE version = '1.0.0'")
    history = vigilance_db.execute("SELECT version, state, changed_by FROM model_version_changes "
                               "ORDER BY id").fetchall()
    assert history == [("1.0.0", "active", "admin"), ("1.1.0", "shadow", "admin"),
                       ("1.0.0", "retired", "qa")]


def test_analysis_outputs_are_consistent(vigilance_db: psycopg.Connection) -> None:
    add_version(vigilance_db, "1.0.0", "active")
    row = vigilance_db.execute(
        "INSERT INTO analyses (study_uid, model_id, version, role, analysed_at, age_band, sex,"
        " slice_thickness_mm) VALUES (%s, 'chest-ct', '1.0.0', 'active', now(), '40-49', 'F',"
        " 1.25) RETURNING id", (STUDY,)).fetchone()
    assert row is not None
    insert = ("INSERT INTO analysis_outputs (analysis_id, label, code, score, threshold, flagged)"
              " VALUES (%s, %s, 'SCT:233604007', %s, 0.5, %s)")
    vigilance_db.execute(insert, (row[0], "pneumonia", 0.5, True))
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        vigilance_db.execute(insert, (row[0], "nodule", 0.7, False))
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        vigilance_db.execute("INSERT INTO analyses (study_uid, model_id, version, role, "
                             "analysed_at) VALUES ('John^Doe', 'chest-ct', '1.0.0', 'active', "
                             "now())")


def test_ground_truth_import_is_idempotent(vigilance_db: psycopg.Connection) -> None:
    recorded = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    insert = ("INSERT INTO ground_truth (study_uid, model_id, label, code, present, source,"
              " observer, recorded_at) VALUES (%s, %s, 'pneumonia', 'SCT:233604007', %s,"
              " %s, %s, %s) ON CONFLICT DO NOTHING")
    for model_id in (None, "chest-ct"):
        for _ in range(2):
            vigilance_db.execute(insert, (STUDY, model_id, True, "report", "RIS", recorded))
    # The radiologist changing their mind later is a new record, not a conflict.
    later = recorded + timedelta(hours=1)
    vigilance_db.execute(insert, (STUDY, "chest-ct", False, "feedback", "dr.house", later))
    vigilance_db.execute(insert, (STUDY, "chest-ct", False, "feedback", "dr.house", later))
    assert vigilance_db.execute("SELECT count(*) FROM ground_truth").fetchone() == (3,)
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        vigilance_db.execute(insert, (STUDY, None, True, "rumour", "RIS", recorded))


def test_alert_acknowledgement_names_who(vigilance_db: psycopg.Connection) -> None:
    vigilance_db.execute("INSERT INTO alerts (kind, model_id, detail) VALUES "
                     "('output-cusum', 'chest-ct', '{\"day\": \"2026-03-01\"}')")
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        vigilance_db.execute("UPDATE alerts SET acknowledged_at = now()")
    vigilance_db.execute("UPDATE alerts SET acknowledged_at = now(), acknowledged_by = 'physicist'")
    with pytest.raises(psycopg.errors.CheckViolation), vigilance_db.transaction():
        vigilance_db.execute("INSERT INTO alerts (kind, model_id) VALUES ('hunch', 'chest-ct')")


def test_database_url_configured_or_local(tmp_path: Path) -> None:
    configured = "postgresql://records:s3cr3t-Pa55@db.hospital.internal:5432/triage"
    settings = Settings(data_dir=tmp_path, database_url=configured)
    assert not settings.local_postgres
    assert settings.database_connection_url == configured
    local = Settings(data_dir=tmp_path, database_url=None, postgres_port=54999)
    assert local.local_postgres
    secret = local.stored_secrets["postgres_password"]
    assert local.database_connection_url == f"postgresql://triage:{secret}@127.0.0.1:54999/triage"


@pytest.mark.parametrize("url", ["postgresql://triage:changeme@db/triage",
                                 "postgresql://triage:Postgres@db/triage",
                                 "postgresql://triage:@db/triage",
                                 "mysql://triage:s3cr3t-Pa55@db/triage"])
def test_database_url_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError, match="TRIAGE_DATABASE_URL"):
        Settings(data_dir=tmp_path, database_url=url)


def test_database_password_given_apart_from_the_url(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql://triage@db:5432/triage",
                        database_password="s3cret/with@odd:chars")
    assert settings.database_connection_url == (
        "postgresql://triage:s3cret%2Fwith%40odd%3Achars@db:5432/triage")
    # A password in the URL itself wins.
    given = Settings(data_dir=tmp_path, database_url="postgresql://triage:inurl@db/triage",
                     database_password="other")
    assert given.database_connection_url == "postgresql://triage:inurl@db/triage"
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(data_dir=tmp_path, database_url="postgresql://triage@db/triage",
                 database_password="changeme")
