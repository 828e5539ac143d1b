"""The pseudonymised evaluation export of the vigilance records (real PostgreSQL and Redis): no
identifier planted in the records reaches the file, the keyed pseudonym is stable across exports
and changes with the key, rare subgroup values are suppressed by distinct studies, CSV and
Parquet hold the same rows, and the admin API and the `triage vigilance export` command serve
it to admins only, audited in both trails."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient

from tests.conftest import free_port
from triage import cli
from triage.api.app import create_app
from triage.audit import records as audit_records
from triage.settings import SECRETS_FILE, Settings
from triage.tokens import Role, create_token
from triage.vigilance.export import (
    COLUMNS,
    SUBGROUP_COLUMNS,
    ExportFormat,
    ExportQuery,
    UnknownModelVersion,
    csv_chunks,
    dataset,
    latest_truths,
    parquet_bytes,
    pseudonym,
)
from triage.vigilance.figures import Truth, latest_truth
from triage.vigilance.trail import entries

pytestmark = pytest.mark.servers

MODEL, OTHER_MODEL = "head-ct-hyperdensity", "chest-xr-nodule"
ICH, ICH_CODE = "ich", "SCT:1386000"
FRACTURE, FRACTURE_CODE = "fracture", "SCT:72704001"
SHA = "ab" * 32
KEY = b"an-export-key-of-the-hospital-0001"
OTHER_KEY = b"another-export-key-of-the-hospital"
START = datetime(2026, 11, 1, tzinfo=UTC)
STUDIES = 40
SHADOWED = 20  # the first studies were also analysed by the shadow version 2.0
SUPPRESSED = "suppressed (<5)"
# Identifiers planted in the records where a misconfigured modality could put them.
PATIENT_NAME, PATIENT_ID, ACCESSION, BIRTH_DATE = "DOE^JANE", "PID778899", "ACC20261101", \
    "19570312"
OBSERVER = "Dr Jane Roe"


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{7000 + n}"


def sr_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{9000 + n}"


@dataclass
class Planted:
    """What the records hold, for the expectations."""

    uids: list[str]
    identifiers: list[str]
    flags: dict[tuple[str, str, str], bool]  # (study, version, code) -> flagged


def manufacturer(n: int) -> str:
    # 4 Canon studies (suppressed however many rows they have), 5 Philips (shown), GE.
    return "Canon" if n < 4 else "Philips" if n < 9 else "GE"


def add_version(conn: psycopg.Connection, model: str, version: str, state: str) -> None:
    conn.execute("INSERT INTO model_versions (model_id, version, sha256, state, changed_by) "
                 "VALUES (%s, %s, %s, %s, 'registry')", (model, version, SHA, state))


def add_analysis(conn: psycopg.Connection, *, study_uid: str, model: str, version: str,
                 role: str, analysed_at: datetime, outputs: list[tuple[str, str, float]],
                 **attributes: object) -> None:
    columns = ["study_uid", "model_id", "version", "role", "analysed_at", *attributes]
    values = [study_uid, model, version, role, analysed_at, *attributes.values()]
    row = conn.execute(f"INSERT INTO analyses ({', '.join(columns)}) VALUES "
                       f"({', '.join(['%s'] * len(values))}) RETURNING id", values).fetchone()
    assert row is not None
    for label, code, score in outputs:
        conn.execute("INSERT INTO analysis_outputs (analysis_id, label, code, score, threshold, "
                     "flagged) VALUES (%s, %s, %s, %s, 0.5, %s)",
                     (row[0], label, code, score, score >= 0.5))


def add_truth(conn: psycopg.Connection, study_uid: str, present: bool, source: str,
              recorded_at: datetime, *, model: str | None = MODEL, code: str = ICH_CODE,
              observer: str = OBSERVER) -> None:
    conn.execute("INSERT INTO ground_truth (study_uid, model_id, label, code, present, source, "
                 "observer, recorded_at, sr_sop_instance_uid) VALUES "
                 "(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                 (study_uid, model, ICH, code, present, source, observer, recorded_at,
                  sr_uid(500)))


def populate(conn: psycopg.Connection) -> Planted:
    add_version(conn, MODEL, "1.0", "active")
    add_version(conn, MODEL, "2.0", "shadow")
    add_version(conn, OTHER_MODEL, "1", "active")
    flags: dict[tuple[str, str, str], bool] = {}
    for n in range(STUDIES):
        # Four days; study 7 at the last second of a day (the export keeps only the day).
        at = START + timedelta(days=n % 4, hours=n % 24, minutes=n)
        if n == 7:
            at = START + timedelta(days=1) - timedelta(seconds=1)
        attributes: dict[str, object] = dict(
            sr_sop_instance_uid=sr_uid(n), modality="CT", manufacturer=manufacturer(n),
            manufacturer_model_name="Model " + manufacturer(n),
            station_name=PATIENT_NAME if n == 0 else "CT-NORTH-1",
            calling_aet=PATIENT_ID if n == 1 else "CTSOUTH2",
            institution=ACCESSION if n == 2 else "North Hospital",
            age_band="50-59" if n % 3 else "60-69", sex="F" if n % 2 else "M",
            slice_thickness_mm=1.0 if n % 2 else 5.0, kvp=80.0 if n == 5 else 120.0,
            reconstruction_kernel=BIRTH_DATE if n in (3, 4) else "FC43")
        ich_score = (n * 37 % 100) / 100
        fracture_score = (n * 53 % 100) / 100
        add_analysis(conn, study_uid=uid(n), model=MODEL, version="1.0", role="active",
                     analysed_at=at, outputs=[(ICH, ICH_CODE, ich_score),
                                              (FRACTURE, FRACTURE_CODE, fracture_score)],
                     **attributes)
        flags[(uid(n), "1.0", ICH_CODE)] = ich_score >= 0.5
        flags[(uid(n), "1.0", FRACTURE_CODE)] = fracture_score >= 0.5
        if n < SHADOWED:
            shadow_score = 1 - ich_score
            add_analysis(conn, study_uid=uid(n), model=MODEL, version="2.0", role="shadow",
                         analysed_at=at + timedelta(seconds=5),
                         outputs=[(ICH, ICH_CODE, shadow_score),
                                  (FRACTURE, FRACTURE_CODE, fracture_score)],
                         **{**attributes, "sr_sop_instance_uid": None})
            flags[(uid(n), "2.0", ICH_CODE)] = shadow_score >= 0.5
            flags[(uid(n), "2.0", FRACTURE_CODE)] = fracture_score >= 0.5
        # Another model's analysis of the same study never reaches this model's export.
        add_analysis(conn, study_uid=uid(n), model=OTHER_MODEL, version="1", role="active",
                     analysed_at=at, outputs=[("nodule", "SCT:27925004", 0.7)],
                     station_name="OTHER-STATION")
    day = timedelta(days=1)
    # Study 0: a report said present, pathology later said absent: absent, from pathology.
    add_truth(conn, uid(0), True, "report", START + day, model=None)
    add_truth(conn, uid(0), False, "pathology", START + 3 * day, model=None)
    # Study 1: two radiologists disagree at the same instant: present.
    add_truth(conn, uid(1), False, "feedback", START + day, observer="dr-a")
    add_truth(conn, uid(1), True, "feedback", START + day, observer="dr-b")
    # Study 2: only another model's assessment and another finding: no truth for ICH.
    add_truth(conn, uid(2), True, "feedback", START + day, model=OTHER_MODEL)
    add_truth(conn, uid(2), True, "report", START + day, model=None, code="SCT:999999")
    # Study 3: feedback first (absent), the report later (present).
    add_truth(conn, uid(3), False, "feedback", START + day)
    add_truth(conn, uid(3), True, "report", START + 2 * day, model=None)
    conn.commit()
    identifiers = [*(uid(n) for n in range(STUDIES)), *(sr_uid(n) for n in range(STUDIES)),
                   sr_uid(500), PATIENT_NAME, PATIENT_ID, ACCESSION, BIRTH_DATE, OBSERVER,
                   "dr-a", "dr-b", "1957-03-12"]
    return Planted(uids=[uid(n) for n in range(STUDIES)], identifiers=identifiers, flags=flags)


def by_study(rows: list[dict[str, Any]], key: bytes = KEY) -> dict[tuple[str, str, str], dict]:
    back = {pseudonym(key, uid(n)): uid(n) for n in range(STUDIES)}
    return {(back[r["study_pseudonym"]], r["version"], r["code"]): r for r in rows}


def test_one_row_per_analysis_and_label_with_truth_and_feedback(
        vigilance_db: psycopg.Connection) -> None:
    planted = populate(vigilance_db)
    rows = dataset(vigilance_db, KEY, ExportQuery(MODEL))
    assert len(rows) == 2 * STUDIES + 2 * SHADOWED
    assert all(tuple(row) == COLUMNS for row in rows)
    found = by_study(rows)
    assert set(found) == set(planted.flags)
    for (study, version, code), row in found.items():
        assert row["flagged"] == planted.flags[(study, version, code)]
        assert row["role"] == ("active" if version == "1.0" else "shadow")
        assert row["model_id"] == MODEL and row["threshold"] == 0.5
        assert row["flagged"] == (row["score"] >= 0.5)
    assert {r["label"] for r in rows} == {ICH, FRACTURE}
    # The day only, in UTC: study 7 was analysed at 23:59:59 on 1 November.
    assert found[(uid(7), "1.0", ICH_CODE)]["analysed_date"] == date(2026, 11, 1)
    assert {r["analysed_date"] for r in rows} == {date(2026, 11, d) for d in (1, 2, 3, 4)}

    truth = {(s, c): (r["truth_present"], r["truth_source"], r["feedback_agrees"])
             for (s, v, c), r in found.items() if v == "1.0"}
    flag = {(s, c): planted.flags[(s, "1.0", c)] for s, c in truth}
    assert truth[(uid(0), ICH_CODE)] == (False, "pathology", None)
    assert truth[(uid(1), ICH_CODE)] == (True, "feedback", flag[(uid(1), ICH_CODE)])
    assert truth[(uid(2), ICH_CODE)] == (None, None, None)
    assert truth[(uid(3), ICH_CODE)] == (True, "report", not flag[(uid(3), ICH_CODE)])
    assert truth[(uid(0), FRACTURE_CODE)] == (None, None, None)
    # The shadow version's rows carry the same truth, and agreement with its own flag.
    shadow = found[(uid(1), "2.0", ICH_CODE)]
    assert (shadow["truth_present"], shadow["feedback_agrees"]) == (
        True, planted.flags[(uid(1), "2.0", ICH_CODE)])
    # Rows are never in the order of analysis times or UIDs within a day.
    keys = [(r["analysed_date"], r["study_pseudonym"], r["version"], r["label"]) for r in rows]
    assert keys == sorted(keys)


def test_latest_truths_agree_with_the_figures_rule() -> None:
    at = START
    rows = [Truth(uid(0), ICH_CODE, True, "report", at),
            Truth(uid(0), ICH_CODE, False, "pathology", at + timedelta(days=1)),
            Truth(uid(1), ICH_CODE, False, "feedback", at),
            Truth(uid(1), ICH_CODE, True, "report", at),
            Truth(uid(1), ICH_CODE, True, "feedback", at)]
    for order in (rows, list(reversed(rows))):
        chosen = latest_truths(order)
        assert {k: t.present for k, t in chosen.items()} == latest_truth(order)
        assert chosen[(uid(0), ICH_CODE)].source == "pathology"
        assert chosen[(uid(1), ICH_CODE)].source == "report"  # present; then by name


def scan(data: bytes, export_format: ExportFormat) -> list[str]:
    """Every text the file holds: its bytes, and for Parquet (compressed) every cell and the
    file's metadata too."""
    texts = [data.decode("utf-8", errors="replace")]
    if export_format is ExportFormat.PARQUET:
        parquet = pq.ParquetFile(io.BytesIO(data))
        table = parquet.read()
        texts += [str(value) for column in table.columns for value in column.to_pylist()]
        texts.append(str(parquet.metadata.to_dict()))
        texts.append(str(table.schema.metadata))
    return texts


def test_no_identifier_reaches_the_file(vigilance_db: psycopg.Connection) -> None:
    planted = populate(vigilance_db)
    rows = dataset(vigilance_db, KEY, ExportQuery(MODEL))
    files = {ExportFormat.CSV: b"".join(csv_chunks(rows)),
             ExportFormat.PARQUET: parquet_bytes(rows)}
    for export_format, data in files.items():
        for text in scan(data, export_format):
            leaked = [i for i in planted.identifiers if i in text]
            assert leaked == [], f"{export_format.value}: {leaked}"
            # Nothing that looks like a DICOM UID, and no time of day.
            assert re.search(r"\d+(\.\d+){3,}", text) is None, export_format
            assert re.search(r"\d{2}:\d{2}", text) is None, export_format
    text = files[ExportFormat.CSV].decode()
    assert pseudonym(KEY, uid(0)) in text
    assert pseudonym(KEY, uid(0)) == hmac.new(KEY, uid(0).encode(), hashlib.sha256).hexdigest()


def test_pseudonyms_are_stable_and_keyed(vigilance_db: psycopg.Connection) -> None:
    populate(vigilance_db)
    query = ExportQuery(MODEL)
    first = b"".join(csv_chunks(dataset(vigilance_db, KEY, query)))
    assert b"".join(csv_chunks(dataset(vigilance_db, KEY, query))) == first
    everything = {(r["version"], r["code"], r["score"]): r["study_pseudonym"]
                  for r in dataset(vigilance_db, KEY, query)}
    # Narrower exports name each study by the same pseudonym.
    narrow = dataset(vigilance_db, KEY, ExportQuery(MODEL, version="2.0", start=date(2026, 11, 2),
                                                    end=date(2026, 11, 3)))
    assert narrow and {r["version"] for r in narrow} == {"2.0"}
    assert {r["analysed_date"] for r in narrow} == {date(2026, 11, 2)}
    full = by_study(dataset(vigilance_db, KEY, query))
    for (study, version, code), row in by_study(narrow).items():
        assert row["study_pseudonym"] == full[(study, version, code)]["study_pseudonym"]
    # Another key: other pseudonyms, none shared, same rows otherwise.
    other = dataset(vigilance_db, OTHER_KEY, query)
    assert len(other) == len(everything)
    mine = {r["study_pseudonym"] for r in dataset(vigilance_db, KEY, query)}
    theirs = {r["study_pseudonym"] for r in other}
    assert len(mine) == len(theirs) == STUDIES and mine.isdisjoint(theirs)
    strip = [{k: v for k, v in r.items() if k != "study_pseudonym"} for r in other]
    assert sorted(map(str, strip)) == sorted(
        str({k: v for k, v in r.items() if k != "study_pseudonym"})
        for r in dataset(vigilance_db, KEY, query))
    with pytest.raises(ValueError, match="empty"):
        pseudonym(b"", uid(0))


def test_rare_subgroup_values_are_suppressed_by_studies(vigilance_db: psycopg.Connection
                                                        ) -> None:
    populate(vigilance_db)
    rows = dataset(vigilance_db, KEY, ExportQuery(MODEL))
    found = by_study(rows)

    def values(column: str) -> dict[str, int]:
        counted: dict[str, int] = {}
        for row in rows:
            counted[row[column]] = counted.get(row[column], 0) + 1
        return counted

    # Canon: 4 studies but 16 rows (two labels, two versions): still suppressed.
    assert sum(r["study_pseudonym"] == pseudonym(KEY, uid(0)) for r in rows) == 4
    assert "Canon" not in values("manufacturer")
    assert {found[(uid(n), "1.0", ICH_CODE)]["manufacturer"] for n in range(4)} == {SUPPRESSED}
    assert values("manufacturer")[SUPPRESSED] == 16
    assert {found[(uid(n), "1.0", ICH_CODE)]["manufacturer"] for n in range(4, 9)} == {
        "Philips"}  # exactly the minimum: shown
    assert found[(uid(20), "1.0", ICH_CODE)]["manufacturer"] == "GE"
    assert found[(uid(0), "1.0", ICH_CODE)]["station"] == SUPPRESSED
    assert found[(uid(1), "1.0", ICH_CODE)]["calling_ae"] == SUPPRESSED
    assert found[(uid(2), "1.0", ICH_CODE)]["institution"] == SUPPRESSED
    assert found[(uid(3), "1.0", ICH_CODE)]["reconstruction_kernel"] == SUPPRESSED
    assert found[(uid(5), "1.0", ICH_CODE)]["kvp"] == SUPPRESSED
    assert found[(uid(6), "1.0", ICH_CODE)]["kvp"] == "120"
    assert set(values("slice_thickness_band")) == {"<=1 mm", "2.5-5 mm"}
    assert set(values("sex")) == {"F", "M"} and set(values("age_band")) == {"50-59", "60-69"}
    # Every shown value is shared by at least 5 studies of the file.
    for column in SUBGROUP_COLUMNS:
        studies: dict[str, set[str]] = {}
        for row in rows:
            studies.setdefault(row[column], set()).add(row["study_pseudonym"])
        assert all(len(s) >= 5 for v, s in studies.items() if v != SUPPRESSED), column
    # A narrower export judges its own rows: the 5 Philips studies split over two days.
    narrow = dataset(vigilance_db, KEY, ExportQuery(MODEL, start=date(2026, 11, 1),
                                                    end=date(2026, 11, 2)))
    assert "Philips" not in {r["manufacturer"] for r in narrow}
    # A higher minimum suppresses more; the minimum is at least 1.
    stricter = dataset(vigilance_db, KEY, ExportQuery(MODEL, min_count=6))
    assert "Philips" not in {r["manufacturer"] for r in stricter}
    assert "suppressed (<6)" in {r["manufacturer"] for r in stricter}
    assert "Canon" in {r["manufacturer"] for r in dataset(vigilance_db, KEY,
                                                          ExportQuery(MODEL, min_count=1))}
    with pytest.raises(ValueError, match="at least 1"):
        ExportQuery(MODEL, min_count=0)


def parse_csv(data: bytes) -> list[dict[str, Any]]:
    """The CSV's rows with the Parquet's types."""
    def typed(column: str, text: str) -> Any:
        if text == "":
            return None
        if column in ("flagged", "truth_present", "feedback_agrees"):
            return {"true": True, "false": False}[text]
        if column in ("score", "threshold"):
            return float(text)
        if column == "analysed_date":
            return date.fromisoformat(text)
        return text

    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    assert tuple(reader.fieldnames or ()) == COLUMNS
    return [{column: typed(column, row[column]) for column in COLUMNS} for row in reader]


def test_csv_and_parquet_hold_the_same_rows(vigilance_db: psycopg.Connection) -> None:
    populate(vigilance_db)
    rows = dataset(vigilance_db, KEY, ExportQuery(MODEL))
    from_csv = parse_csv(b"".join(csv_chunks(rows)))
    table = pq.read_table(io.BytesIO(parquet_bytes(rows)))
    assert table.schema.field("analysed_date").type == pa.date32()
    assert table.schema.field("flagged").type == pa.bool_()
    assert table.schema.field("score").type == pa.float64()
    assert table.column_names == list(COLUMNS)
    from_parquet = table.to_pylist()
    assert len(from_csv) == len(from_parquet) == len(rows) > 500 // 5  # several CSV chunks
    assert from_csv == from_parquet == rows
    assert any(r["truth_present"] is None for r in from_parquet)
    # An export of nothing is a header, or an empty table with the schema.
    empty = dataset(vigilance_db, KEY, ExportQuery(MODEL, start=date(2030, 1, 1)))
    assert parse_csv(b"".join(csv_chunks(empty))) == []
    assert pq.read_table(io.BytesIO(parquet_bytes(empty))).schema.names == list(COLUMNS)


def test_unknown_models_and_periods_are_refused(vigilance_db: psycopg.Connection) -> None:
    populate(vigilance_db)
    with pytest.raises(UnknownModelVersion, match="no model nope"):
        dataset(vigilance_db, KEY, ExportQuery("nope"))
    with pytest.raises(UnknownModelVersion, match="no version 9.9"):
        dataset(vigilance_db, KEY, ExportQuery(MODEL, version="9.9"))
    with pytest.raises(ValueError, match="end after"):
        ExportQuery(MODEL, start=date(2026, 11, 2), end=date(2026, 11, 2))
    name = ExportQuery("head ct/x", version="1.0", start=date(2026, 11, 1)).filename(
        ExportFormat.PARQUET)
    assert name == "vigilance-head_ct_x-1.0-2026-11-01-to.parquet"


def test_export_key_is_generated_once_or_given(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIAGE_VIGILANCE_EXPORT_KEY", raising=False)
    generated = Settings(data_dir=tmp_path).vigilance_export_secret
    assert len(generated) >= 32
    assert Settings(data_dir=tmp_path).vigilance_export_secret == generated
    stored = json.loads((tmp_path / SECRETS_FILE).read_text())
    assert stored["vigilance_export_key"].encode() == generated
    assert (tmp_path / SECRETS_FILE).stat().st_mode & 0o077 == 0
    # A secrets file written before the export key existed gets one, keeping the others.
    older = tmp_path / "older"
    older.mkdir()
    (older / SECRETS_FILE).write_text(json.dumps(
        {"orthanc_password": "o" * 20, "redis_password": "r" * 20, "postgres_password": "p" * 20}))
    assert len(Settings(data_dir=older).vigilance_export_secret) >= 32
    assert json.loads((older / SECRETS_FILE).read_text())["redis_password"] == "r" * 20

    monkeypatch.setenv("TRIAGE_VIGILANCE_EXPORT_KEY", KEY.decode())
    given = Settings(data_dir=tmp_path)
    assert given.vigilance_export_secret == KEY
    assert KEY.decode() not in repr(given)  # a SecretStr
    for bad in ("changeme", "secret", "short-key"):
        monkeypatch.setenv("TRIAGE_VIGILANCE_EXPORT_KEY", bad)
        with pytest.raises(ValueError, match="EXPORT_KEY"):
            Settings(data_dir=tmp_path)
    monkeypatch.delenv("TRIAGE_VIGILANCE_EXPORT_KEY")
    with pytest.raises(ValueError, match="must be set outside development"):
        _ = Settings(data_dir=tmp_path, development=False).vigilance_export_secret


# -- the admin API and the command -----------------------------------------------------------

def audited(connection: redis.Redis, action: str) -> list[dict[str, Any]]:
    found = [json.loads(raw) for _, raw in audit_records(connection)]
    return [entry for entry in found if entry["action"] == action]


def test_api_export_for_admins_only_audited(
        vigilance_db: psycopg.Connection, vigilance_database: Settings,
        redis_settings: Settings) -> None:
    planted = populate(vigilance_db)
    settings = redis_settings.model_copy(update={"database_url": vigilance_database.database_url})
    connection = redis.Redis.from_url(settings.redis_connection_url)
    connection.flushall()
    client = TestClient(create_app(settings))
    path = "/api/v1/admin/vigilance/export"
    query = {"model": MODEL, "start": "2026-11-01", "end": "2026-11-05", "format": "csv"}

    assert client.get(path, params=query).status_code == 401
    for role in (Role.RADIOLOGIST, Role.INTEGRATION):
        token = create_token(connection, role=role, owner=f"matrix-{role.value}")
        answer = client.get(path, params=query, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 403
    admin = {"Authorization": "Bearer " + create_token(connection, role=Role.ADMIN,
                                                       owner="dr.admin")}
    assert audited(connection, "vigilance.exported") == []

    answer = client.get(path, params=query, headers=admin)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"] == (
        'attachment; filename="vigilance-head-ct-hyperdensity-all-versions-2026-11-01-to-'
        '2026-11-05.csv"')
    rows = parse_csv(answer.content)
    assert len(rows) == 2 * STUDIES + 2 * SHADOWED
    expected = dataset(vigilance_db, settings.vigilance_export_secret, ExportQuery(MODEL))
    assert rows == expected
    assert not [i for i in planted.identifiers if i in answer.text]

    answer = client.get(path, params={**query, "format": "parquet", "version": "2.0"},
                        headers=admin)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/vnd.apache.parquet"
    assert answer.headers["content-disposition"].endswith('2026-11-05.parquet"')
    table = pq.read_table(io.BytesIO(answer.content)).to_pylist()
    assert len(table) == 2 * SHADOWED and {r["version"] for r in table} == {"2.0"}

    records = audited(connection, "vigilance.exported")
    assert [(r["actor"], r["role"], r["details"]["format"], r["details"]["rows"])
            for r in records] == [("dr.admin", "admin", "csv", 2 * STUDIES + 2 * SHADOWED),
                                  ("dr.admin", "admin", "parquet", 2 * SHADOWED)]
    assert records[1]["details"]["version"] == "2.0"
    assert records[1]["details"]["start"] == "2026-11-01"
    trail = entries(vigilance_db, action="vigilance.exported")
    assert [(e.actor, e.model_id, e.version, e.details["rows"]) for e in trail] == [
        ("dr.admin", MODEL, "2.0", 2 * SHADOWED), ("dr.admin", MODEL, None, 2 * STUDIES +
                                                    2 * SHADOWED)]

    for params, code in (({**query, "model": "nope"}, 404), ({**query, "version": "9.9"}, 404),
                         ({**query, "end": "2026-11-01"}, 422),
                         ({**query, "format": "xlsx"}, 422), ({**query, "min_count": 4}, 422),
                         ({"format": "csv"}, 422)):
        assert client.get(path, params=params, headers=admin).status_code == code, params
    assert len(audited(connection, "vigilance.exported")) == 2  # refusals export nothing


def test_api_export_answers_503_without_postgres(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(update={
        "database_url": f"postgresql://triage:s3cr3t-Pa55@127.0.0.1:{free_port()}/triage"})
    connection = redis.Redis.from_url(settings.redis_connection_url)
    client = TestClient(create_app(settings))
    token = create_token(connection, role=Role.ADMIN, owner="dr.admin")
    answer = client.get("/api/v1/admin/vigilance/export", params={"model": MODEL},
                        headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 503 and "PostgreSQL unreachable" in answer.json()["detail"]


def test_cli_export_writes_the_same_file_as_the_api(
        vigilance_db: psycopg.Connection, vigilance_database: Settings,
        redis_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(vigilance_db)
    assert vigilance_database.database_url is not None
    for name, value in {"TRIAGE_DATA_DIR": str(redis_settings.data_dir),
                        "TRIAGE_REDIS_PORT": str(redis_settings.redis_port),
                        "TRIAGE_DATABASE_URL": vigilance_database.database_url,
                        "USER": "it-admin"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRIAGE_REDIS_URL", raising=False)
    monkeypatch.delenv("TRIAGE_VIGILANCE_EXPORT_KEY", raising=False)
    connection = redis.Redis.from_url(redis_settings.redis_connection_url)
    connection.flushall()
    runner = CliRunner()
    output = tmp_path / "ich.csv"
    result = runner.invoke(cli.main, ["vigilance", "export", "--model", MODEL, "--start",
                                      "2026-11-01", "--end", "2026-11-05", "--format", "csv",
                                      "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert f"{2 * STUDIES + 2 * SHADOWED} rows written to {output}" in result.output
    assert output.stat().st_mode & 0o077 == 0
    key = Settings().vigilance_export_secret
    assert output.read_bytes() == b"".join(csv_chunks(dataset(vigilance_db, key,
                                                              ExportQuery(MODEL))))
    parquet = tmp_path / "ich.parquet"
    result = runner.invoke(cli.main, ["vigilance", "export", "--model", MODEL, "--version",
                                      "1.0", "--format", "parquet", "-o", str(parquet)])
    assert result.exit_code == 0, result.output
    assert len(pq.read_table(parquet)) == 2 * STUDIES
    result = runner.invoke(cli.main, ["vigilance", "export", "--model", "nope", "-o",
                                      str(tmp_path / "nope.csv")])
    assert result.exit_code == 1 and "no model nope" in result.output
    assert not (tmp_path / "nope.csv").exists()
    records = audited(connection, "vigilance.exported")
    assert [(r["actor"], r["role"], r["details"]["format"]) for r in records] == [
        ("it-admin", "cli", "csv"), ("it-admin", "cli", "parquet")]
    assert [e.actor for e in entries(vigilance_db, action="vigilance.exported")] == [
        "it-admin", "it-admin"]
