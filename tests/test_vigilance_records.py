"""The vigilance records in a real PostgreSQL: model version states (registration, promotion,
rollback), ground truth recorded once, outcomes imported from a RIS export without ever
attaching one to another patient's study, and the `triage outcomes` / `triage models` commands
with their audit records."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from tests.conftest import Servers
from triage import cli
from triage.audit import records
from triage.errors import TriageError
from triage.settings import Settings
from triage.uids import derived_uid
from triage.vigilance.records import (
    Outcome,
    RecordError,
    Resolver,
    history,
    import_outcomes_csv,
    orthanc_resolver,
    promote,
    record_ground_truth,
    register_version,
    set_state,
    versions,
)

pytestmark = pytest.mark.servers

SHA_1, SHA_2, SHA_3 = "a1" * 32, "b2" * 32, "c3" * 32
STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"
WHEN = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
ACCESSION, PATIENT = "RIS7731", "PID-004521"


def states(conn: psycopg.Connection, model: str = "head-ct") -> dict[str, str]:
    return {v.version: v.state for v in versions(conn, model)}


def test_first_version_is_active_later_ones_shadow(vigilance_db: psycopg.Connection) -> None:
    assert register_version(vigilance_db, "head-ct", "1.0", SHA_1, "committee") == "active"
    assert register_version(vigilance_db, "head-ct", "1.1", SHA_2, "committee") == "shadow"
    assert register_version(vigilance_db, "chest-xr", "2.0", SHA_3, "committee") == "active"
    # Registering again changes nothing; other weights under the same version are refused.
    assert register_version(vigilance_db, "head-ct", "1.0", SHA_1, "someone") == "active"
    with pytest.raises(RecordError, match="registered with SHA-256"):
        register_version(vigilance_db, "head-ct", "1.1", SHA_3, "committee")
    with pytest.raises(RecordError, match="64 lowercase"):
        register_version(vigilance_db, "head-ct", "1.2", SHA_1.upper(), "committee")
    assert issubclass(RecordError, TriageError)
    assert states(vigilance_db) == {"1.0": "active", "1.1": "shadow"}
    [first] = [v for v in versions(vigilance_db) if v.version == "1.0"]
    assert (first.sha256, first.changed_by) == (SHA_1, "committee")
    assert first.changed_at.tzinfo is not None
    assert [v.model_id for v in versions(vigilance_db)] == ["chest-xr", "head-ct", "head-ct"]


def test_promote_and_roll_back(vigilance_db: psycopg.Connection) -> None:
    register_version(vigilance_db, "head-ct", "1.0", SHA_1, "committee")
    register_version(vigilance_db, "head-ct", "1.1", SHA_2, "committee")

    changes = promote(vigilance_db, "head-ct", "1.1", "dr.house")
    assert [(t.version, t.old_state, t.new_state) for t in changes] == [
        ("1.0", "active", "shadow"), ("1.1", "shadow", "active")]
    assert states(vigilance_db) == {"1.0": "shadow", "1.1": "active"}
    # Rollback: the previous version kept running in shadow and is promoted again.
    promote(vigilance_db, "head-ct", "1.0", "dr.house")
    assert states(vigilance_db) == {"1.0": "active", "1.1": "shadow"}
    assert promote(vigilance_db, "head-ct", "1.0", "dr.house") == []

    steps = [(c.version, c.state, c.changed_by) for c in history(vigilance_db, "head-ct")]
    assert steps == [("1.0", "active", "committee"), ("1.1", "shadow", "committee"),
                     ("1.0", "shadow", "dr.house"), ("1.1", "active", "dr.house"),
                     ("1.1", "shadow", "dr.house"), ("1.0", "active", "dr.house")]
    # Replaying the history: exactly one version is active after every promotion.
    current: dict[str, str] = {}
    for index, (version, state, _) in enumerate(steps):
        current[version] = state
        if index in (1, 3, 5):
            assert list(current.values()).count("active") == 1
    with pytest.raises(RecordError, match="no registered version 9.9"):
        promote(vigilance_db, "head-ct", "9.9", "dr.house")
    assert states(vigilance_db) == {"1.0": "active", "1.1": "shadow"}


def test_set_state(vigilance_db: psycopg.Connection) -> None:
    register_version(vigilance_db, "head-ct", "1.0", SHA_1, "committee")
    register_version(vigilance_db, "head-ct", "1.1", SHA_2, "committee")
    [retired] = set_state(vigilance_db, "head-ct", "1.1", "retired", "dr.house")
    assert (retired.old_state, retired.new_state) == ("shadow", "retired")
    assert set_state(vigilance_db, "head-ct", "1.1", "retired", "dr.house") == []
    # Active through set_state is a promotion: the active version goes to shadow.
    set_state(vigilance_db, "head-ct", "1.1", "active", "dr.house")
    assert states(vigilance_db) == {"1.0": "shadow", "1.1": "active"}
    # Withdrawing the active version leaves the model with none.
    set_state(vigilance_db, "head-ct", "1.1", "retired", "dr.house")
    assert states(vigilance_db) == {"1.0": "shadow", "1.1": "retired"}
    with pytest.raises(RecordError, match="unknown state"):
        set_state(vigilance_db, "head-ct", "1.0", "paused", "dr.house")
    with pytest.raises(RecordError, match="no registered version"):
        set_state(vigilance_db, "chest-xr", "1.0", "retired", "dr.house")
    assert len(history(vigilance_db, "head-ct")) == 6


def outcome(study: str = STUDY, present: bool = True, **fields: object) -> Outcome:
    values: dict[str, object] = dict(study_uid=study, label="haemorrhage", code="SCT:50960005",
                                     present=present, source="report", observer="ris",
                                     recorded_at=WHEN)
    values.update(fields)
    return Outcome(**values)  # type: ignore[arg-type]


def test_ground_truth_is_recorded_once(vigilance_db: psycopg.Connection) -> None:
    batch = [outcome(), outcome(OTHER_STUDY, present=False),
             outcome(model_id="head-ct", source="feedback", observer="dr.house",
                     sr_sop_instance_uid="1.2.3.4")]
    assert record_ground_truth(vigilance_db, batch) == 3
    assert record_ground_truth(vigilance_db, batch) == 0
    # A changed mind is a new statement, at a later time.
    later = outcome(present=False, recorded_at=WHEN + timedelta(hours=1))
    assert record_ground_truth(vigilance_db, [later, *batch]) == 1
    with pytest.raises(RecordError, match="bad finding code"):
        record_ground_truth(vigilance_db, [outcome(OTHER_STUDY, present=True,
                                                   recorded_at=WHEN + timedelta(days=1)),
                                           outcome(code="haemorrhage")])
    with pytest.raises(RecordError, match="UTC offset"):
        record_ground_truth(vigilance_db, [outcome(recorded_at=datetime(2026, 3, 1))])
    count = vigilance_db.execute("SELECT count(*) FROM ground_truth").fetchone()
    assert count == (4,)  # nothing of a refused batch was written


def fake_resolver(studies: dict[tuple[str, str], list[str]]) -> Resolver:
    def resolve(accession: str, patient_id: str) -> list[str]:
        return studies.get((accession, patient_id), [])
    return resolve


CSV = f"""\
Accession_Number,patient_id,finding_code,present,source,recorded_at,label,study_instance_uid
{ACCESSION},{PATIENT},SCT:50960005,Yes,,2026-03-01T10:00:00Z,haemorrhage,
{ACCESSION},{PATIENT},SCT:1386000,no,pathology,2026-03-02T10:00:00+01:00,,
,,SCT:50960005,TRUE,,2026-03-01T11:00:00Z,,{OTHER_STUDY}
{ACCESSION},PID-999,SCT:50960005,1,,2026-03-01T10:00:00Z,,
RIS0002,{PATIENT},SCT:50960005,yes,,2026-03-01T10:00:00Z,,
{ACCESSION},{PATIENT},SCT:50960005,maybe,,2026-03-01T10:00:00Z,,
{ACCESSION},{PATIENT},haemorrhage,yes,,2026-03-01T10:00:00Z,,

{ACCESSION},{PATIENT},SCT:50960005,yes,hearsay,2026-03-01T10:00:00Z,,
{ACCESSION},{PATIENT},SCT:50960005,yes,,yesterday,,
RIS*,{PATIENT},SCT:50960005,yes,,2026-03-01T10:00:00Z,,
{ACCESSION},{PATIENT},SCT:50960005,no,feedback,,,
"""


def test_csv_import(vigilance_db: psycopg.Connection) -> None:
    asked: list[tuple[str, str]] = []
    studies = {(ACCESSION, PATIENT): [STUDY],
               ("RIS0002", PATIENT): [STUDY, OTHER_STUDY]}

    def resolve(accession: str, patient_id: str) -> list[str]:
        asked.append((accession, patient_id))
        return fake_resolver(studies)(accession, patient_id)

    report = import_outcomes_csv(vigilance_db, io.StringIO(CSV), resolve, observer="ris")
    assert (report.inserted, report.duplicates) == (4, 0)
    assert report.rejected == [
        (5, "no study with this accession number and patient ID"),
        (6, "2 studies match this accession number and patient ID"),
        (7, "present must be yes or no"),
        (8, "bad finding code (expected scheme:value, e.g. SCT:233604007)"),
        (10, "source must be one of feedback, report, pathology, follow-up"),
        (11, "recorded_at must be an ISO 8601 date and time"),
        (12, "accession_number and patient_id must not contain * ? or \\"),
    ]
    for _, reason in report.rejected:
        for secret in (ACCESSION, PATIENT, "PID-999", "RIS0002", "RIS"):
            assert secret not in reason
    assert ("RIS*", PATIENT) not in asked  # never sent as a query
    rows = vigilance_db.execute(
        "SELECT study_uid, label, code, present, source, observer, recorded_at "
        "FROM ground_truth ORDER BY id").fetchall()
    assert [row[:6] for row in rows] == [
        (STUDY, "haemorrhage", "SCT:50960005", True, "report", "ris"),
        (STUDY, "1386000", "SCT:1386000", False, "pathology", "ris"),
        (OTHER_STUDY, "50960005", "SCT:50960005", True, "report", "ris"),
        (STUDY, "50960005", "SCT:50960005", False, "feedback", "ris"),
    ]
    assert rows[1][6] == datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    assert rows[3][6] > datetime.now(UTC) - timedelta(minutes=5)  # the time of the import

    # The same file again, including the row without a time: nothing new.
    again = import_outcomes_csv(vigilance_db, io.StringIO(CSV), resolve, observer="ris")
    assert (again.inserted, again.duplicates, len(again.rejected)) == (0, 4, 7)
    # Same rows from another observer are other statements.
    other = import_outcomes_csv(vigilance_db, io.StringIO(CSV), resolve, observer="pacs",
                                default_source="follow-up")
    assert other.inserted == 4


def test_csv_import_needs_the_columns(vigilance_db: psycopg.Connection) -> None:
    with pytest.raises(RecordError, match="lacks the columns present"):
        import_outcomes_csv(vigilance_db, io.StringIO("accession_number,patient_id,"
                                                      "finding_code\n"),
                            fake_resolver({}), observer="ris")
    with pytest.raises(RecordError, match="empty"):
        import_outcomes_csv(vigilance_db, io.StringIO(""), fake_resolver({}), observer="ris")


def ct_study(accession: str, patient_id: str, key: str) -> tuple[bytes, str]:
    ds = copy.deepcopy(pydicom.dcmread(str(get_testdata_file("CT_small.dcm"))))
    ds.StudyInstanceUID = derived_uid("records-study", key)
    ds.SeriesInstanceUID = derived_uid("records-series", key)
    ds.SOPInstanceUID = derived_uid("records-instance", key)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.AccessionNumber = patient_id, accession
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.StudyInstanceUID)


def test_orthanc_resolver_needs_accession_and_patient(clean_servers: Servers) -> None:
    uids = {}
    for key, accession, patient_id in (("a", "ACC1", "PAT-A"), ("b", "ACC1", "PAT-B"),
                                       ("c", "ACC10", "PAT-A")):
        data, uids[key] = ct_study(accession, patient_id, key)
        clean_servers.orthanc.store(data)
    resolve = orthanc_resolver(clean_servers.orthanc)
    assert resolve("ACC1", "PAT-A") == [uids["a"]]
    assert resolve("ACC1", "PAT-B") == [uids["b"]]
    assert resolve("ACC1", "PAT-C") == []
    assert resolve("ACC", "PAT-A") == []
    for accession, patient_id in (("ACC*", "PAT-A"), ("ACC1", "PAT-?"), ("", "PAT-A"),
                                  ("ACC1", ""), ("ACC1\\ACC10", "PAT-A")):
        with pytest.raises(RecordError):
            resolve(accession, patient_id)
    assert orthanc_resolver(clean_servers.settings)("ACC10", "PAT-A") == [uids["c"]]


@pytest.fixture
def cli_env(clean_servers: Servers, vigilance_database: Settings,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Servers]:
    """The CLI's environment: the test servers' Redis (audit) and a fresh, unmigrated
    database."""
    assert vigilance_database.database_url is not None
    monkeypatch.setenv("TRIAGE_DATABASE_URL", vigilance_database.database_url)
    yield clean_servers


def audited(servers: Servers, action: str) -> list[dict[str, Any]]:
    found = []
    for _, raw in records(servers.redis):
        entry = json.loads(raw)
        if entry["action"] == action:
            found.append(entry)
    return found


def test_cli_outcomes_import(cli_env: Servers, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def fake(_settings: Settings) -> Iterator[Resolver]:
        yield fake_resolver({(ACCESSION, PATIENT): [STUDY]})

    monkeypatch.setattr(cli, "_study_resolver", fake)
    export = tmp_path / "ris-2026-03.csv"
    export.write_text(CSV, encoding="utf-8-sig")  # as spreadsheets write it, with a BOM
    runner = CliRunner()
    result = runner.invoke(cli.main, ["outcomes", "import", str(export)])
    assert result.exit_code == 1, result.output
    assert "4 inserted, 0 already recorded, 7 rejected" in result.output
    assert "line 6: 2 studies match" not in result.output  # ambiguous only for the real one
    assert "line 6: no study with this accession number and patient ID" in result.output
    assert ACCESSION not in result.output and PATIENT not in result.output

    valid = tmp_path / "valid.csv"
    valid.write_text("\n".join(CSV.splitlines()[:4]) + "\n")
    result = runner.invoke(cli.main, ["outcomes", "import", str(valid), "--source",
                                      "pathology", "--observer", "lis"])
    assert result.exit_code == 0, result.output
    assert "3 inserted, 0 already recorded, 0 rejected" in result.output
    result = runner.invoke(cli.main, ["outcomes", "import", str(valid), "--source",
                                      "pathology", "--observer", "lis"])
    assert "0 inserted, 3 already recorded, 0 rejected" in result.output

    details = [entry["details"] for entry in audited(cli_env, "vigilance.outcomes_imported")]
    assert details == [{"inserted": 4, "duplicates": 0, "rejected": 7},
                       {"inserted": 3, "duplicates": 0, "rejected": 0},
                       {"inserted": 0, "duplicates": 3, "rejected": 0}]
    with psycopg.connect(str(Settings().database_connection_url)) as connection:
        observers = connection.execute(
            "SELECT DISTINCT observer, source FROM ground_truth ORDER BY 1, 2").fetchall()
    assert observers == [("import:ris-2026-03.csv", "feedback"),
                         ("import:ris-2026-03.csv", "pathology"),
                         ("import:ris-2026-03.csv", "report"),
                         ("lis", "pathology")]


def test_cli_models_promote_and_state(cli_env: Servers) -> None:
    runner = CliRunner()
    result = runner.invoke(cli.main, ["models", "versions"])  # migrates a fresh database
    assert result.exit_code == 0, result.output
    assert "no registered versions" in result.output
    with psycopg.connect(str(Settings().database_connection_url)) as connection:
        register_version(connection, "head-ct", "1.0", SHA_1, "registry")
        register_version(connection, "head-ct", "1.1", SHA_2, "registry")

    result = runner.invoke(cli.main, ["models", "promote", "head-ct", "1.1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["head-ct 1.0: active -> shadow",
                                          "head-ct 1.1: shadow -> active"]
    result = runner.invoke(cli.main, ["models", "state", "head-ct", "1.0", "retired"])
    assert result.output.splitlines() == ["head-ct 1.0: shadow -> retired"]
    result = runner.invoke(cli.main, ["models", "promote", "head-ct", "1.1"])
    assert result.output.splitlines() == ["head-ct 1.1 is already active"]
    result = runner.invoke(cli.main, ["models", "promote", "head-ct", "2.0"])
    assert result.exit_code == 1
    assert "no registered version 2.0" in result.output

    result = runner.invoke(cli.main, ["models", "versions", "head-ct"])
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "STATE"]
    assert [line.split()[:3] for line in lines[1:]] == [["head-ct", "1.0", "retired"],
                                                         ["head-ct", "1.1", "active"]]
    entries = audited(cli_env, "vigilance.model_state_changed")
    changes = [{k: v for k, v in entry["details"].items() if k != "actor"}
               for entry in entries]
    assert changes == [
        {"model": "head-ct", "version": "1.0", "old_state": "active", "new_state": "shadow"},
        {"model": "head-ct", "version": "1.1", "old_state": "shadow", "new_state": "active"},
        {"model": "head-ct", "version": "1.0", "old_state": "shadow", "new_state": "retired"},
    ]
    assert all(entry["actor"] == entry["details"]["actor"] and entry["role"] == "cli"
               for entry in entries)


def test_integration_api_records_report_outcomes(clean_servers: Servers,
                                                 vigilance_database: Settings,
                                                 vigilance_db: psycopg.Connection) -> None:
    """POST /api/v1/integration/outcomes: the same rules as the file import, for a RIS."""
    from fastapi.testclient import TestClient

    from triage.api.app import create_app
    from triage.tokens import Role, create_token

    uids = {}
    for key, accession, patient_id in (("p", "ACC7", "PAT-P"), ("q", "ACC7", "PAT-Q")):
        data, uids[key] = ct_study(accession, patient_id, key)
        clean_servers.orthanc.store(data)
    client = TestClient(create_app(clean_servers.settings.model_copy(
        update={"database_url": vigilance_database.database_url})))
    token = create_token(clean_servers.redis, role=Role.INTEGRATION, owner="ris")
    body = {"outcomes": [
        {"accession_number": "ACC7", "patient_id": "PAT-P", "finding_code": "SCT:1386000",
         "present": True, "recorded_at": "2026-11-30T08:00:00Z"},
        {"accession_number": "ACC7", "patient_id": "PAT-Z", "finding_code": "SCT:1386000",
         "present": False},
        {"study_instance_uid": uids["q"], "finding_code": "SCT:1386000", "present": False,
         "recorded_at": "2026-11-30T08:00:00+01:00"},
    ]}
    headers = {"Authorization": f"Bearer {token}"}
    first = client.post("/api/v1/integration/outcomes", json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"inserted": 2, "duplicates": 0, "rejected": [
        {"index": 1, "reason": "no study with this accession number and patient ID"}]}
    again = client.post("/api/v1/integration/outcomes", json=body, headers=headers).json()
    assert (again["inserted"], again["duplicates"]) == (0, 2)
    rows = vigilance_db.execute("SELECT study_uid, present, source, observer FROM ground_truth "
                                "ORDER BY study_uid").fetchall()
    assert sorted(rows) == sorted([(uids["p"], True, "report", "integration:ris"),
                                   (uids["q"], False, "report", "integration:ris")])
    assert len(audited(clean_servers, "vigilance.outcomes_imported")) == 2
    radiologist = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="dr")
    assert client.post("/api/v1/integration/outcomes", json=body, headers={
        "Authorization": f"Bearer {radiologist}"}).status_code == 403
