"""Performance figures of a model version from the vigilance records (real PostgreSQL): flag
rates, ground-truth coverage, PPV/specificity/agreement and, only with complete report outcomes,
sensitivity/NPV, each checked against plain counting and scipy's Wilson interval; subgroups with
suppression of small cells; and the admin API that serves them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from scipy.stats import binomtest

from tests.conftest import free_port
from triage.api.app import create_app
from triage.settings import Settings
from triage.tokens import Role, create_token
from triage.vigilance.figures import (
    SENSITIVITY_NOTE,
    Truth,
    figures,
    latest_truth,
    slice_thickness_band,
    subgroups,
)
from triage.vigilance.statistics import Proportion

pytestmark = pytest.mark.servers

MODEL = "head-ct-hyperdensity"
ICH, ICH_CODE = "ich", "SCT:1386000"
FRACTURE, FRACTURE_CODE = "fracture", "SCT:72704001"
START = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 10
END = START + timedelta(days=DAYS)
STUDIES = 300
SHA = "ab" * 32
MANUFACTURERS = [("GE", "Revolution"), ("SIEMENS", "SOMATOM Force")]
RARE = ("Canon", "Aquilion ONE")
THICKNESSES = [0.625, 1.0, 1.25, 2.5, 3.0, 5.0, 7.5, None]
BANDS = {0.625: "<=1 mm", 1.0: "<=1 mm", 1.25: "1-2.5 mm", 2.5: "1-2.5 mm",
         3.0: "2.5-5 mm", 5.0: "2.5-5 mm", 7.5: ">5 mm", None: "unknown"}


@dataclass
class Study:
    uid: str
    analysed_at: datetime
    manufacturer: tuple[str, str]
    station: str
    thickness: float | None
    flagged: bool
    present: bool
    feedback: bool
    report: bool
    fracture_flagged: bool
    attributes: dict[str, str] = field(default_factory=dict)


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{1000 + n}"


def wilson(count: int, total: int) -> Proportion:
    """The independent expectation: plain counts and scipy's Wilson interval."""
    if total == 0:
        return Proportion(0, 0, None, None, None)
    interval = binomtest(count, total).proportion_ci(method="wilson")
    return Proportion(count, total, count / total, interval.low, interval.high)


def assert_proportion(actual: Proportion | None, expected: Proportion) -> None:
    assert actual is not None
    assert (actual.count, actual.total) == (expected.count, expected.total)
    if expected.total == 0:
        assert (actual.value, actual.low, actual.high) == (None, None, None)
        return
    assert actual.value == pytest.approx(expected.value)
    assert actual.low == pytest.approx(expected.low, abs=1e-9)
    assert actual.high == pytest.approx(expected.high, abs=1e-9)


def add_version(conn: psycopg.Connection, version: str, state: str) -> None:
    conn.execute("INSERT INTO model_versions (model_id, version, sha256, state, changed_by) "
                 "VALUES (%s, %s, %s, %s, 'test')", (MODEL, version, SHA, state))


def add_analysis(conn: psycopg.Connection, study_uid: str, version: str, role: str,
                 analysed_at: datetime, outputs: list[tuple[str, str, bool]],
                 **attributes: object) -> None:
    columns = ["study_uid", "model_id", "version", "role", "analysed_at", *attributes]
    values = [study_uid, MODEL, version, role, analysed_at, *attributes.values()]
    row = conn.execute(f"INSERT INTO analyses ({', '.join(columns)}) VALUES "
                       f"({', '.join(['%s'] * len(values))}) RETURNING id", values).fetchone()
    assert row is not None
    for label, code, flagged in outputs:
        conn.execute("INSERT INTO analysis_outputs (analysis_id, label, code, score, threshold, "
                     "flagged) VALUES (%s, %s, %s, %s, 0.5, %s)",
                     (row[0], label, code, 0.9 if flagged else 0.1, flagged))


def add_truth(conn: psycopg.Connection, study_uid: str, present: bool, source: str,
              observer: str, recorded_at: datetime, model_id: str | None = MODEL,
              code: str = ICH_CODE) -> None:
    conn.execute("INSERT INTO ground_truth (study_uid, model_id, label, code, present, source, "
                 "observer, recorded_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                 (study_uid, model_id, ICH, code, present, source, observer, recorded_at))


def populate(conn: psycopg.Connection, *, report_share: float = 0.5,
             seed: int = 20261101) -> list[Study]:
    """300 studies over 10 days analysed by version 1.0 (active), with feedback mostly on
    flagged studies, report outcomes on ``report_share`` of them, superseded and unrelated
    truth rows, and analyses that must not count (shadow, outside the period)."""
    rng = random.Random(seed)
    add_version(conn, "1.0", "active")
    add_version(conn, "2.0", "shadow")
    studies: list[Study] = []
    for n in range(STUDIES):
        flagged = rng.random() < 0.3
        present = rng.random() < (0.7 if flagged else 0.1)
        station_name = rng.choice(["CT-NORTH-1", None, None])
        calling_aet = rng.choice(["CTSOUTH2", None])
        study = Study(
            uid=uid(n), analysed_at=START + timedelta(seconds=rng.randrange(DAYS * 86400)),
            manufacturer=RARE if n < 3 else rng.choice(MANUFACTURERS),
            station=station_name or calling_aet or "unknown",
            thickness=rng.choice(THICKNESSES), flagged=flagged, present=present,
            feedback=rng.random() < (0.8 if flagged else 0.2),
            report=rng.random() < report_share, fracture_flagged=rng.random() < 0.2)
        institution = rng.choice(["North", "South", None])
        age_band = rng.choice(["40-49", "50-59", "90+", None])
        sex = rng.choice(["M", "F", "O", None])
        study.attributes = {
            "manufacturer": " ".join(study.manufacturer), "station": study.station,
            "institution": institution or "unknown", "age_band": age_band or "unknown",
            "sex": sex or "unknown", "slice_thickness_band": BANDS[study.thickness]}
        add_analysis(conn, study.uid, "1.0", "active", study.analysed_at,
                     [(ICH, ICH_CODE, flagged), (FRACTURE, FRACTURE_CODE, study.fracture_flagged)],
                     manufacturer=study.manufacturer[0],
                     manufacturer_model_name=study.manufacturer[1], station_name=station_name,
                     calling_aet=calling_aet, institution=institution, age_band=age_band,
                     sex=sex, slice_thickness_mm=study.thickness)
        # The shadow candidate flags everything: none of it may reach the active figures.
        add_analysis(conn, study.uid, "2.0", "shadow", study.analysed_at,
                     [(ICH, ICH_CODE, True)])
        at = study.analysed_at
        if study.feedback:
            if rng.random() < 0.3:  # the radiologist first said the opposite, then corrected
                add_truth(conn, study.uid, not present, "feedback", "dr-a",
                          at + timedelta(minutes=30))
            add_truth(conn, study.uid, present, "feedback", "dr-a", at + timedelta(hours=1))
        if study.report:
            add_truth(conn, study.uid, present, "report", "ris", at + timedelta(hours=5),
                      model_id=None)
        # Assessments of another model and of another finding never count.
        add_truth(conn, study.uid, not present, "feedback", "dr-b", at + timedelta(days=3),
                  model_id="other-model")
        add_truth(conn, study.uid, not present, "report", "ris", at + timedelta(days=3),
                  model_id=None, code="SCT:999999")
        studies.append(study)
    # Version 1.0 also ran in shadow on some studies, and analysed others outside the period.
    for n in range(STUDIES, STUDIES + 20):
        add_analysis(conn, uid(n), "1.0", "shadow", START + timedelta(hours=n % 200),
                     [(ICH, ICH_CODE, True)])
        add_truth(conn, uid(n), True, "report", "ris", START + timedelta(days=1), model_id=None)
    add_analysis(conn, uid(900), "1.0", "active", START - timedelta(microseconds=1),
                 [(ICH, ICH_CODE, True)])
    add_analysis(conn, uid(901), "1.0", "active", END, [(ICH, ICH_CODE, True)])
    conn.commit()
    return studies


def expected_table(studies: list[Study]) -> tuple[int, int, int, int]:
    tp = sum(s.flagged and s.present for s in studies)
    fp = sum(s.flagged and not s.present for s in studies)
    fn = sum(not s.flagged and s.present for s in studies)
    tn = sum(not s.flagged and not s.present for s in studies)
    return tp, fp, fn, tn


def test_figures_match_plain_counting(vigilance_db: psycopg.Connection) -> None:
    studies = populate(vigilance_db)
    found = figures(vigilance_db, MODEL, "1.0", START, END)
    assert [(f.label, f.code) for f in found] == [(FRACTURE, FRACTURE_CODE), (ICH, ICH_CODE)]
    fracture, ich = found
    assert (ich.model_id, ich.version, ich.start, ich.end) == (MODEL, "1.0", START, END)
    assert ich.analysed == STUDIES
    assert_proportion(ich.flagged, wilson(sum(s.flagged for s in studies), STUDIES))
    assert [day.date for day in ich.daily] == [date(2026, 11, d) for d in range(1, 11)]
    for day in ich.daily:
        on_day = [s for s in studies if s.analysed_at.date() == day.date]
        assert day.analysed == len(on_day) > 0
        assert_proportion(day.flagged, wilson(sum(s.flagged for s in on_day), len(on_day)))
    assert sum(day.analysed for day in ich.daily) == STUDIES

    known = [s for s in studies if s.feedback or s.report]
    assert_proportion(ich.coverage, wilson(len(known), STUDIES))
    assert_proportion(ich.report_coverage, wilson(sum(s.report for s in studies), STUDIES))
    tp, fp, fn, tn = expected_table(known)
    assert_proportion(ich.ppv, wilson(tp, tp + fp))
    assert_proportion(ich.specificity, wilson(tn, tn + fp))
    assert_proportion(ich.agreement, wilson(tp + tn, len(known)))
    # Feedback follows the flags: sensitivity and NPV from it would be biased, so none.
    assert ich.sensitivity is None and ich.npv is None
    assert ich.sensitivity_note == SENSITIVITY_NOTE

    assert fracture.analysed == STUDIES
    assert_proportion(fracture.flagged, wilson(sum(s.fracture_flagged for s in studies),
                                               STUDIES))
    assert_proportion(fracture.coverage, wilson(0, STUDIES))
    assert_proportion(fracture.ppv, wilson(0, 0))

    assert [f.label for f in figures(vigilance_db, MODEL, "1.0", START, END, label=ICH)] == [ICH]
    # Version 2.0 only ran in shadow: it has no figures as the active model.
    assert figures(vigilance_db, MODEL, "2.0", START, END) == []


def test_sensitivity_and_npv_need_a_report_for_every_study(
        vigilance_db: psycopg.Connection) -> None:
    studies = populate(vigilance_db, report_share=1.0)
    ich = figures(vigilance_db, MODEL, "1.0", START, END, label=ICH)[0]
    assert_proportion(ich.report_coverage, wilson(STUDIES, STUDIES))
    tp, fp, fn, tn = expected_table(studies)
    assert_proportion(ich.sensitivity, wilson(tp, tp + fn))
    assert_proportion(ich.npv, wilson(tn, tn + fn))
    assert ich.sensitivity_note is None
    # One study fewer in the period with a report: no sensitivity at all.
    vigilance_db.execute("DELETE FROM ground_truth WHERE study_uid = %s AND source = 'report'",
                         (studies[0].uid,))
    ich = figures(vigilance_db, MODEL, "1.0", START, END, label=ICH)[0]
    assert ich.report_coverage.count == STUDIES - 1
    assert ich.sensitivity is None and ich.npv is None


def test_latest_truth_wins_and_a_tie_counts_present(vigilance_db: psycopg.Connection) -> None:
    add_version(vigilance_db, "1.0", "active")
    at = START + timedelta(hours=1)
    for n in range(3):
        add_analysis(vigilance_db, uid(n), "1.0", "active", at, [(ICH, ICH_CODE, True)])
    # Study 0: a report said present, a later pathology result says absent.
    add_truth(vigilance_db, uid(0), True, "report", "ris", at + timedelta(hours=2),
              model_id=None)
    add_truth(vigilance_db, uid(0), False, "pathology", "lab", at + timedelta(days=2))
    # Study 1: two observers disagree at the same instant.
    add_truth(vigilance_db, uid(1), False, "feedback", "dr-a", at + timedelta(hours=1))
    add_truth(vigilance_db, uid(1), True, "feedback", "dr-b", at + timedelta(hours=1))
    ich = figures(vigilance_db, MODEL, "1.0", START, END)[0]
    assert_proportion(ich.coverage, wilson(2, 3))
    assert_proportion(ich.ppv, wilson(1, 2))  # study 1 true positive, study 0 false positive
    rows = [Truth(uid(0), ICH_CODE, True, "report", at), Truth(uid(0), ICH_CODE, False,
                                                               "feedback", at)]
    assert latest_truth(rows) == latest_truth(reversed(rows)) == {(uid(0), ICH_CODE): True}


def test_period_must_be_aware_and_ordered(vigilance_db: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="aware"):
        figures(vigilance_db, MODEL, "1.0", START.replace(tzinfo=None), END)
    with pytest.raises(ValueError, match="end after"):
        figures(vigilance_db, MODEL, "1.0", END, START)


def test_slice_thickness_bands() -> None:
    for thickness, band in BANDS.items():
        assert slice_thickness_band(thickness) == band


def test_subgroups_and_suppression(vigilance_db: psycopg.Connection) -> None:
    studies = populate(vigilance_db)
    cells = subgroups(vigilance_db, MODEL, "1.0", START, END, min_count=5)
    ich_cells = {(c.dimension, c.value): c for c in cells if c.label == ICH}
    for dimension in ("manufacturer", "station", "institution", "age_band", "sex",
                      "slice_thickness_band"):
        values = {s.attributes[dimension] for s in studies}
        assert {v for d, v in ich_cells if d == dimension} == values
        for value in values:
            members = [s for s in studies if s.attributes[dimension] == value]
            cell = ich_cells[(dimension, value)]
            if len(members) < 5:
                assert cell.suppressed
                continue
            assert not cell.suppressed and cell.analysed == len(members)
            assert_proportion(cell.flagged, wilson(sum(s.flagged for s in members),
                                                   len(members)))
            known = [s for s in members if s.feedback or s.report]
            assert_proportion(cell.coverage, wilson(len(known), len(members)))
            tp, fp, _, tn = expected_table(known)
            assert_proportion(cell.ppv, wilson(tp, tp + fp))
            assert_proportion(cell.specificity, wilson(tn, tn + fp))
    rare = ich_cells[("manufacturer", "Canon Aquilion ONE")]
    assert rare.suppressed
    assert (rare.analysed, rare.flagged, rare.coverage, rare.ppv, rare.specificity) == (
        None, None, None, None, None)
    assert {c.value for c in cells if c.dimension == "slice_thickness_band"} == set(
        BANDS.values())
    assert {c.value for c in cells if c.dimension == "station"} == {
        "CT-NORTH-1", "CTSOUTH2", "unknown"}
    # With a minimum of 1, the three studies show.
    cells = subgroups(vigilance_db, MODEL, "1.0", START, END, min_count=1)
    rare = next(c for c in cells if c.value == "Canon Aquilion ONE" and c.label == ICH)
    assert not rare.suppressed and rare.analysed == 3
    with pytest.raises(ValueError, match="at least 1"):
        subgroups(vigilance_db, MODEL, "1.0", START, END, min_count=0)


# -- The admin API -------------------------------------------------------------------------

def api(redis_settings: Settings, database_url: str) -> tuple[TestClient, redis.Redis]:
    settings = redis_settings.model_copy(update={"database_url": database_url})
    app = create_app(settings)
    connection = redis.Redis.from_url(settings.redis_connection_url)
    connection.flushall()
    return TestClient(app), connection


def bearer(connection: redis.Redis, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(connection, role=role, owner='test')}"}


def test_api_serves_figures_and_subgroups_to_admins(
        vigilance_db: psycopg.Connection, vigilance_database: Settings,
        redis_settings: Settings) -> None:
    studies = populate(vigilance_db)
    assert vigilance_database.database_url is not None
    client, connection = api(redis_settings, vigilance_database.database_url)
    admin = bearer(connection, Role.ADMIN)
    query = {"model": MODEL, "version": "1.0", "start": "2026-11-01", "end": "2026-11-11"}

    assert client.get("/api/v1/admin/vigilance/figures", params=query).status_code == 401
    for role in (Role.RADIOLOGIST, Role.INTEGRATION):
        answer = client.get("/api/v1/admin/vigilance/figures", params=query,
                            headers=bearer(connection, role))
        assert answer.status_code == 403

    answer = client.get("/api/v1/admin/vigilance/figures", params=query, headers=admin)
    assert answer.status_code == 200, answer.text
    body = {entry["label"]: entry for entry in answer.json()}
    ich = body[ICH]
    assert ich["analysed"] == STUDIES and len(ich["daily"]) == DAYS
    flagged = wilson(sum(s.flagged for s in studies), STUDIES)
    assert set(ich["flagged"]) == {"count", "total", "value", "low", "high"}
    assert ich["flagged"]["count"] == flagged.count
    assert ich["flagged"]["low"] == pytest.approx(flagged.low)
    assert ich["sensitivity"] is None and ich["sensitivity_note"] == SENSITIVITY_NOTE
    assert ich["daily"][0]["date"] == "2026-11-01"
    assert datetime.fromisoformat(ich["start"]) == START
    assert datetime.fromisoformat(ich["end"]) == END

    # Without a version, the active one.
    answer = client.get("/api/v1/admin/vigilance/figures", headers=admin,
                        params={k: v for k, v in query.items() if k != "version"})
    assert {entry["version"] for entry in answer.json()} == {"1.0"}

    answer = client.get("/api/v1/admin/vigilance/subgroups", headers=admin,
                        params={**query, "min_count": 5})
    assert answer.status_code == 200, answer.text
    rare = next(c for c in answer.json()
                if c["value"] == "Canon Aquilion ONE" and c["label"] == ICH)
    assert rare == {"dimension": "manufacturer", "value": "Canon Aquilion ONE", "label": ICH,
                    "code": ICH_CODE, "suppressed": True, "analysed": None, "flagged": None,
                    "coverage": None, "ppv": None, "specificity": None}

    assert client.get("/api/v1/admin/vigilance/figures", headers=admin,
                      params={**query, "version": "9.9"}).status_code == 404
    assert client.get("/api/v1/admin/vigilance/figures", headers=admin,
                      params={**query, "start": "2026-11-11"}).status_code == 422
    assert client.get("/api/v1/admin/vigilance/subgroups", headers=admin,
                      params={**query, "min_count": 0}).status_code == 422


def test_api_default_period_is_the_last_30_days(
        vigilance_db: psycopg.Connection, vigilance_database: Settings,
        redis_settings: Settings) -> None:
    add_version(vigilance_db, "1.0", "active")
    now = datetime.now(UTC)
    add_analysis(vigilance_db, uid(0), "1.0", "active", now, [(ICH, ICH_CODE, True)])
    add_analysis(vigilance_db, uid(1), "1.0", "active", now - timedelta(days=40),
                 [(ICH, ICH_CODE, True)])
    vigilance_db.commit()
    assert vigilance_database.database_url is not None
    client, connection = api(redis_settings, vigilance_database.database_url)
    answer = client.get("/api/v1/admin/vigilance/figures", params={"model": MODEL},
                        headers=bearer(connection, Role.ADMIN))
    assert answer.status_code == 200, answer.text
    (ich,) = answer.json()
    assert ich["analysed"] == 1 and len(ich["daily"]) == 30
    assert ich["daily"][-1]["date"] == now.date().isoformat()


def test_api_answers_503_without_postgres(redis_settings: Settings) -> None:
    client, connection = api(redis_settings,
                             f"postgresql://triage:s3cr3t-Pa55@127.0.0.1:{free_port()}/triage")
    for path in ("figures", "subgroups"):
        answer = client.get(f"/api/v1/admin/vigilance/{path}", params={"model": MODEL},
                            headers=bearer(connection, Role.ADMIN))
        assert answer.status_code == 503
        assert "PostgreSQL unreachable" in answer.json()["detail"]
