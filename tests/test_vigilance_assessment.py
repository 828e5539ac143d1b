"""Radiologists' assessments of AI results: the assessment SR (conformance, reading it back),
the feedback route storing it in the study and its ground truth in PostgreSQL, and the
worklist's feedback and the ground truth rebuilt from Orthanc."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import highdicom as hd
import psycopg
import pydicom
import pytest
from fastapi.testclient import TestClient

from tests import validators
from tests.conftest import Servers, free_port
from tests.senders import storescu
from tests.test_pipeline import our_srs, watch_until, write_study
from tests.test_report import MODEL, head_ct_series, result_for
from triage import uids
from triage.api.app import create_app
from triage.ingest import snapshot_study
from triage.queues import queues
from triage.reindex import reindex
from triage.report import build_report
from triage.settings import Settings
from triage.tokens import Role, create_token
from triage.vigilance import trail
from triage.vigilance.assessment import (
    AssessmentError,
    assessment_of,
    build_assessment,
    encode,
    ground_truth,
    login_name,
    observer_person_name,
    read_assessment,
)
from triage.vigilance.figures import Truth, figures, latest_truth
from triage.vigilance.recording import flush
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import FeedbackRecord, FindingItem, FindingVerdict, Worklist, WorklistItem

# The test CT's patient name has a single component; the copies keep it.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

AWKWARD_USER = "Dr^Zoë=Ünal\\x"
WHEN = dt.datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)


# -- the SR on its own ------------------------------------------------------------------------

def ai_report() -> tuple[pydicom.Dataset, list[FindingItem]]:
    """An AI result SR as Orthanc returns it, and the worklist's findings of it."""
    evidence = head_ct_series()
    result = result_for(evidence)
    sr = pydicom.dcmread(io.BytesIO(encode(build_report(evidence=evidence, results=[result],
                                                        inputs_fingerprint="inputs"))))
    findings = [FindingItem(code=f.concept.value, scheme=f.concept.scheme,
                            meaning=f.concept.meaning, probability=f.probability,
                            threshold=0.5, positive=f.probability >= 0.5, model=MODEL.id,
                            model_version=MODEL.version) for f in result.findings]
    return sr, findings


def record(study_uid: str, findings: list[FindingItem], *, user: str = AWKWARD_USER,
           verdicts: dict[int, bool] | None = None,
           outcomes: dict[int, bool] | None = None) -> FeedbackRecord:
    return FeedbackRecord(
        study_instance_uid=study_uid, user=user, at=WHEN,
        findings=[FindingVerdict(model=findings[i].model, model_version=findings[i].model_version,
                                 code=findings[i].code, agree=agree)
                  for i, agree in (verdicts or {}).items()],
        outcomes={findings[i].code: present for i, present in (outcomes or {}).items()})


def test_assessment_sr_is_conformant_and_reads_back(tmp_path: Path) -> None:
    ai_sr, findings = ai_report()
    assert [f.positive for f in findings] == [True, False]
    feedback = record(str(ai_sr.StudyInstanceUID), findings, verdicts={0: False, 1: True},
                      outcomes={1: True})
    assessment = assessment_of(feedback, findings, str(ai_sr.SOPInstanceUID))
    sr = build_assessment(assessment, ai_sr)
    path = tmp_path / "assessment.dcm"
    path.write_bytes(encode(sr))

    assert validators.dciodvfy_errors(path) == []
    assert validators.pixelmed_sr_errors(path) == []
    assert "AI Result Assessment" in validators.dsrdump(path)

    stored = pydicom.dcmread(path)
    back = read_assessment(stored)
    assert back == assessment
    assert back.feedback_record() == feedback.model_copy(
        update={"sr_sop_instance_uid": assessment.sop_instance_uid})
    # The findings are named by the AI SR's own tracking UIDs.
    groups = hd.sr.Comprehensive3DSR.from_dataset(ai_sr).content.get_image_measurement_groups()
    ai_tracking = {str(g.tracking_uid) for g in groups}
    assert {f.tracking_uid for f in back.findings} == ai_tracking
    # Same patient and study, own series, the AI SR as evidence.
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert stored[keyword].value == ai_sr[keyword].value, keyword
    assert stored.SeriesInstanceUID == uids.assessment_series_uid(str(ai_sr.StudyInstanceUID))
    [evidence] = stored.CurrentRequestedProcedureEvidenceSequence
    [reference] = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert reference.ReferencedSOPInstanceUID == ai_sr.SOPInstanceUID
    assert stored.Manufacturer == ai_sr.Manufacturer
    # The observer: the user name exactly as login name, a safe family name as PN.
    assert back.observer == AWKWARD_USER
    names = [i for i in stored.ContentSequence if i.ValueType == "PNAME"]
    assert [str(i.PersonName) for i in names] == ["DrZoëÜnalx^"]
    # Built again from the same feedback: the same instance, byte for byte.
    assert encode(build_assessment(assessment, ai_sr)) == path.read_bytes()


def test_observer_names_are_made_valid() -> None:
    assert observer_person_name("a^b=c\\d\ne") == "abcde^"
    assert login_name("a^b\\c\x07") == "a^b\\c"
    assert observer_person_name("^^^") == "UNKNOWN^"
    long = observer_person_name("é" * 100, ("utf_8",))
    assert long.endswith("^") and len(long[:-1].encode()) <= 63


def test_outcomes_only_and_mismatched_ai_sr(tmp_path: Path) -> None:
    ai_sr, findings = ai_report()
    ai_sr.TimezoneOffsetFromUTC = "+0530"  # the SR's times are written at the AI SR's offset
    feedback = record(str(ai_sr.StudyInstanceUID), findings, user="dr.b", outcomes={0: False})
    assessment = assessment_of(feedback, findings, str(ai_sr.SOPInstanceUID))
    path = tmp_path / "outcomes.dcm"
    path.write_bytes(encode(build_assessment(assessment, ai_sr)))
    assert validators.dciodvfy_errors(path) == []
    stored = pydicom.dcmread(path)
    assert (stored.ContentTime, stored.TimezoneOffsetFromUTC) == ("153000.123456", "+0530")
    back = read_assessment(stored)
    assert back.findings == () and back.outcomes == assessment.outcomes
    assert back.at == WHEN and back.feedback_record().outcomes == feedback.outcomes
    # A stale worklist (findings of another SR) is refused rather than written.
    stale = assessment_of(record(str(ai_sr.StudyInstanceUID), findings, verdicts={0: True}),
                          findings, "1.2.3.4")
    with pytest.raises(AssessmentError, match="not the one"):
        build_assessment(stale, ai_sr)
    with pytest.raises(AssessmentError, match="no finding"):
        assessment_of(FeedbackRecord(study_instance_uid="1.2", user="u", at=WHEN,
                                     outcomes={"999": True}), findings, "1.2.3")
    with pytest.raises(AssessmentError, match="not a Comprehensive SR"):
        read_assessment(ai_sr)


def test_ground_truth_of_verdicts_and_outcomes() -> None:
    _, findings = ai_report()  # 0: flagged, 1: not flagged
    truth = {(o.code, o.model_id): o.present for o in ground_truth(assessment_of(
        record("1.2.3", findings, verdicts={0: True, 1: False}), findings, "1.2.3.4"))}
    # Agreeing with a flag: present; disagreeing with no flag: the model missed it.
    assert truth == {("SCT:50960005", MODEL.id): True, ("RADLEX:RID5036", MODEL.id): True}
    truth = {(o.code, o.model_id): o.present for o in ground_truth(assessment_of(
        record("1.2.3", findings, verdicts={0: False, 1: True}), findings, "1.2.3.4"))}
    assert truth == {("SCT:50960005", MODEL.id): False, ("RADLEX:RID5036", MODEL.id): False}
    # An explicit final read is the truth for its code; the verdict adds nothing there.
    rows = ground_truth(assessment_of(
        record("1.2.3", findings, verdicts={0: True}, outcomes={0: False}), findings, "1.2.3.4"))
    assert [(o.code, o.model_id, o.present) for o in rows] == [("SCT:50960005", None, False)]
    assert {o.source for o in rows} == {"feedback"}


# -- through the API, with Orthanc, Redis and PostgreSQL --------------------------------------

def analysed_study(servers: Servers, tmp_path: Path) -> WorklistItem:
    storescu(servers.settings, write_study(tmp_path, "head-ct-hyperdense"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
    run_worker(burst=True)
    [item] = Worklist(servers.redis).page()[0]
    assert item.sr_sop_instance_uid and any(f.positive for f in item.findings)
    return item


def wait_stable(servers: Servers, item: WorklistItem) -> None:
    servers.wait_until(lambda: servers.orthanc.study(item.orthanc_id)["IsStable"],
                       timeout=20, what="the study to be stable")


def headers(servers: Servers, owner: str) -> dict[str, str]:
    token = create_token(servers.redis, role=Role.RADIOLOGIST, owner=owner)
    return {"Authorization": f"Bearer {token}"}


def truth_rows(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT study_uid, model_id, label, code, present, source, observer, recorded_at, "
        "sr_sop_instance_uid FROM ground_truth ORDER BY recorded_at, code, model_id").fetchall()


def assessments_in(servers: Servers, item: WorklistItem) -> list[str]:
    snapshot = snapshot_study(servers.orthanc, item.orthanc_id)
    return snapshot.assessment_ids


@pytest.mark.servers
def test_feedback_is_stored_in_the_study_and_rebuilt_after_redis_is_lost(
        clean_servers: Servers, vigilance_db: psycopg.Connection,
        vigilance_database: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    servers = clean_servers
    url = str(vigilance_database.database_url)
    monkeypatch.setenv("TRIAGE_DATABASE_URL", url)  # the worker records the analysis there
    settings = servers.settings.model_copy(update={"database_url": url})
    item = analysed_study(servers, tmp_path)
    flush(servers.redis, settings)
    wait_stable(servers, item)
    watcher = Watcher(settings, servers.orthanc, servers.redis)
    assert watcher.poll_once() == 0
    finding = next(f for f in item.findings if f.positive)
    client = TestClient(create_app(settings))
    awkward = "Dr^Zoë Ünal=née\\ü"

    # An agreement by one radiologist, then two final reads by another (the later wins).
    posted = []
    for owner, body in [
        (awkward, {"findings": [{"model": finding.model, "model_version": finding.model_version,
                                 "code": finding.code, "agree": True}]}),
        ("dr.b", {"outcomes": {finding.code: False}}),
        ("dr.b", {"outcomes": {finding.code: True}}),
    ]:
        response = client.post(f"/api/v1/studies/{item.study_instance_uid}/feedback",
                               json=body, headers=headers(servers, owner))
        assert response.status_code == 201, response.text
        posted.append(response.json())
    assert [p["user"] for p in posted] == [awkward, "dr.b", "dr.b"]

    # One assessment SR per feedback, in the study's assessment series, conformant.
    ids = assessments_in(servers, item)
    assert len(ids) == 3
    datasets = [servers.orthanc.instance_dataset(i) for i in ids]
    assert sorted(str(ds.SOPInstanceUID) for ds in datasets) == sorted(
        p["sr_sop_instance_uid"] for p in posted)
    path = tmp_path / "stored.dcm"
    stored_awkward = next(ds for ds in datasets
                          if str(ds.SOPInstanceUID) == posted[0]["sr_sop_instance_uid"])
    stored_awkward.save_as(path)
    assert validators.dciodvfy_errors(path) == []
    assert read_assessment(stored_awkward).observer == awkward
    assert len(our_srs(servers, item)) == 1  # the AI result SR is still the only result

    # Storing them neither re-queued the study nor changed its status or priority.
    wait_stable(servers, item)
    assert watcher.poll_once() == 0
    assert all(q.count == 0 for q in queues(servers.redis))
    after = Worklist(servers.redis).get(item.study_instance_uid)
    assert after is not None
    assert (after.status, after.priority, after.job_id, after.analysis_runs) == (
        item.status, item.priority, item.job_id, item.analysis_runs)
    assert [f.model_dump(mode="json") for f in after.feedback] == posted

    # Ground truth: the agreement on a flagged finding (for the model), the final reads.
    rows = truth_rows(vigilance_db)
    code = f"{finding.scheme}:{finding.code}"
    assert [(r[1], r[3], r[4], r[6], r[8]) for r in rows] == [
        (finding.model, code, True, awkward, posted[0]["sr_sop_instance_uid"]),
        (None, code, False, "dr.b", posted[1]["sr_sop_instance_uid"]),
        (None, code, True, "dr.b", posted[2]["sr_sop_instance_uid"]),
    ]
    assert latest_truth([Truth(r[0], r[3], r[4], r[5], r[7]) for r in rows]) == {
        (item.study_instance_uid, code): True}
    entries = trail.entries(vigilance_db, action="feedback.recorded")
    assert sorted(e.actor for e in entries) == sorted([awkward, "dr.b", "dr.b"])
    start, end = (dt.datetime.now(dt.UTC) + dt.timedelta(days=d) for d in (-2, 2))
    before = figures(vigilance_db, finding.model, finding.model_version, start, end)
    assert before[0].coverage.count == 1 and before[0].ppv.count == 1

    # Redis and the ground truth lost: the rebuild brings both back from Orthanc, identical.
    servers.redis.flushall()
    vigilance_db.execute("DELETE FROM ground_truth")
    vigilance_db.commit()
    report = reindex(settings, servers.orthanc, servers.redis)
    assert (report.analysed_from_sr, report.assessments, report.ground_truth) == (1, 3, 3)
    rebuilt = Worklist(servers.redis).get(item.study_instance_uid)
    assert rebuilt is not None
    assert [f.model_dump(mode="json") for f in rebuilt.feedback] == posted
    assert truth_rows(vigilance_db) == rows
    assert figures(vigilance_db, finding.model, finding.model_version, start, end) == before
    again = reindex(settings, servers.orthanc, servers.redis)
    assert (again.assessments, again.ground_truth) == (3, 0)
    assert truth_rows(vigilance_db) == rows

    # PostgreSQL down: the feedback is still recorded, its truth comes with the next rebuild.
    down = settings.model_copy(update={
        "database_url": f"postgresql://triage:secret@127.0.0.1:{free_port()}/triage"})
    response = TestClient(create_app(down)).post(
        f"/api/v1/studies/{item.study_instance_uid}/feedback",
        json={"findings": [{"model": finding.model, "model_version": finding.model_version,
                            "code": finding.code, "agree": False}]},
        headers=headers(servers, "dr.c"))
    assert response.status_code == 201, response.text
    assert len(truth_rows(vigilance_db)) == 3
    wait_stable(servers, item)
    assert reindex(settings, servers.orthanc, servers.redis).ground_truth == 1
    assert truth_rows(vigilance_db)[-1][1:7] == (finding.model, finding.meaning, code, False,
                                                 "feedback", "dr.c")
