"""A radiologist's assessment of the AI results of a study, stored as a DICOM SR in the study.

The feedback a radiologist gives on a study (agree or disagree with each AI finding; whether
each finding is present in their final read) becomes a Comprehensive SR in the study, beside
the AI result SR it assesses, following the intent of IHE Radiology "AI Result Assessment"
(keyed on the AI SR's SOP Instance UID and each finding's Tracking Unique Identifier, the
radiologist as Person Observer, TID 1002). The document's structure and every code it uses
are described in docs/assessment-sr.md.

- Patient and study attributes are copied from the AI result SR, as the AI SR copied them
  from the images (``triage.copying.header``: identifiers byte for byte, the rest made valid).
- The SR goes into its own series of the study (``uids.assessment_series_uid``); its SOP
  Instance UID follows from the study, the user and the time of the feedback, so storing the
  same feedback twice stores one instance.
- Orthanc is the source of truth: ``read_assessment`` gives back everything the feedback
  said, so the worklist's feedback and the ground truth in PostgreSQL can be rebuilt from
  the study (``triage reindex``).

Ground truth (``ground_truth``): an explicit "present / absent in the final read" is the
truth for that finding code in the study (no model in particular). A verdict on a model's
finding implies the truth where no explicit outcome for that code was given: agreeing with a
flagged finding means present, disagreeing means absent; agreeing with an unflagged finding
means absent, disagreeing means present (the model missed it). Those rows name the model.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import highdicom as hd
import psycopg
import pydicom
import redis
from psycopg.rows import TupleRow
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from triage import __version__, uids
from triage.copying import values
from triage.copying.header import source_header
from triage.errors import TransientError, TriageError
from triage.logs import pseudonym
from triage.orthanc import OrthancClient
from triage.report import MANUFACTURER
from triage.settings import Settings
from triage.vigilance import clock, db, trail
from triage.vigilance.records import Outcome, RecordError, record_ground_truth
from triage.workflow import StudyNotFound, add_feedback, check_feedback
from triage.worklist import Feedback, FeedbackRecord, FindingItem, FindingVerdict, Worklist

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI result assessment"
# Beside the AI results' series (7100), fixed so every assessment lands in one series.
SERIES_NUMBER = 7200
TRAIL_ACTION = "feedback.recorded"
SOURCE = "feedback"
CONNECT_TIMEOUT_SECONDS = 2
# Person Observer Name: one component group (64 bytes) is kept.
_PN_FORBIDDEN = re.compile(r"[\^=\\\x00-\x1f\x7f-\x9f]")
_LOGIN_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
LOGIN_NAME_LIMIT = 256

# Codes of the service, declared in the SR's Coding Scheme Identification Sequence: neither
# DICOM nor SNOMED CT has concepts for these (docs/assessment-sr.md).
LOCAL_SCHEME = "99TRIAGE"
ASSESSMENT_TITLE = Code("AIRASSESS", LOCAL_SCHEME, "AI Result Assessment")
AI_FLAGGED = Code("AIFLAGGED", LOCAL_SCHEME, "Flagged by AI")
AGREEMENT = Code("AIAGREE", LOCAL_SCHEME, "Agreement with AI result")
# DICOM and SNOMED CT codes (PS3.16).
SOURCE_REPORT = codes.DCM.SourceReport                      # DCM 128225
ASSESSED_GROUP = codes.DCM.MeasurementGroup                 # DCM 125007
TRACKING_UID = codes.DCM.TrackingUniqueIdentifier           # DCM 112040
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier          # DCM 112039
FINDING = codes.DCM.Finding                                 # DCM 121071
FINAL_READ = codes.DCM.Findings                             # DCM 121070
YES = codes.SCT.Yes                                         # SCT 373066001
NO = codes.SCT.No                                           # SCT 373067005
PRESENT = codes.SCT.Present                                 # SCT 52101004
ABSENT = codes.SCT.Absent                                   # SCT 272519000
PERSON = codes.DCM.Person                                   # DCM 121006
AI_RESULT_SOP_CLASS = str(Comprehensive3DSRStorage)  # the AI result SR (triage.report)


class AssessmentError(TriageError):
    """An assessment SR cannot be built or read as asked (the reason says why)."""


@dataclass(frozen=True)
class AssessedFinding:
    """A radiologist's verdict on one AI finding (a TID 1501 measurement group of the AI SR)."""

    tracking_uid: str
    model: str
    model_version: str
    code: str
    scheme: str
    meaning: str
    flagged: bool  # the AI's decision: probability at or above the threshold
    agree: bool


@dataclass(frozen=True)
class FinalReadOutcome:
    """Whether a finding is present in the radiologist's final read of the study."""

    code: str
    scheme: str
    meaning: str
    present: bool


@dataclass(frozen=True)
class Assessment:
    """What one assessment SR says: who assessed which AI result when, and the decisions."""

    study_instance_uid: str
    observer: str
    at: dt.datetime  # aware
    ai_sr_sop_instance_uid: str
    findings: tuple[AssessedFinding, ...] = ()
    outcomes: tuple[FinalReadOutcome, ...] = ()
    ai_sr_sop_class_uid: str = AI_RESULT_SOP_CLASS

    @property
    def sop_instance_uid(self) -> str:
        return str(uids.assessment_instance_uid(self.study_instance_uid, self.observer,
                                                self.at.astimezone(dt.UTC).isoformat()))

    def feedback_record(self) -> FeedbackRecord:
        """The worklist's record of this feedback."""
        return FeedbackRecord(
            study_instance_uid=self.study_instance_uid, user=self.observer,
            at=self.at.astimezone(dt.UTC), sr_sop_instance_uid=self.sop_instance_uid,
            findings=[FindingVerdict(model=f.model, model_version=f.model_version,
                                     code=f.code, agree=f.agree) for f in self.findings],
            outcomes={o.code: o.present for o in self.outcomes})


def tracking_uid(ai_sr_sop_instance_uid: str, model: str, version: str, scheme: str,
                 code: str) -> str:
    """The Tracking Unique Identifier the AI result SR gives a finding (``triage.report``)."""
    return str(uids.derived_uid("tracking", ai_sr_sop_instance_uid, f"{model}@{version}",
                                scheme, code))


def assessment_of(record: FeedbackRecord, findings: Sequence[FindingItem],
                  ai_sr_sop_instance_uid: str) -> Assessment:
    """The assessment a feedback record makes of the AI findings of its study.

    Raises ``AssessmentError`` when the record names a finding ``findings`` lacks.
    """
    by_key = {(f.model, f.model_version, f.code): f for f in findings}
    by_code: dict[str, FindingItem] = {}
    for finding in findings:
        by_code.setdefault(finding.code, finding)
    assessed = []
    for verdict in record.findings:
        item = by_key.get((verdict.model, verdict.model_version, verdict.code))
        if item is None:
            raise AssessmentError(f"no finding {verdict.code} of {verdict.model} "
                                  f"{verdict.model_version} on this study")
        assessed.append(AssessedFinding(
            tracking_uid=tracking_uid(ai_sr_sop_instance_uid, item.model, item.model_version,
                                      item.scheme, item.code),
            model=item.model, model_version=item.model_version, code=item.code,
            scheme=item.scheme, meaning=item.meaning, flagged=item.positive,
            agree=verdict.agree))
    outcomes = []
    for code, present in record.outcomes.items():
        if code not in by_code:
            raise AssessmentError(f"no finding {code} on this study")
        item = by_code[code]
        outcomes.append(FinalReadOutcome(code=item.code, scheme=item.scheme,
                                         meaning=item.meaning, present=present))
    return Assessment(study_instance_uid=record.study_instance_uid, observer=record.user,
                      at=record.at, ai_sr_sop_instance_uid=ai_sr_sop_instance_uid,
                      findings=tuple(assessed), outcomes=tuple(outcomes))


# -- recording a feedback ---------------------------------------------------------------------

def give_feedback(settings: Settings, worklist: Worklist, connection: redis.Redis,
                  orthanc: OrthancClient, study_instance_uid: str, user: str,
                  feedback: Feedback) -> FeedbackRecord:
    """Record ``user``'s feedback on a study: its assessment SR stored in the study (when the
    study has an AI result SR), the record on the worklist item and in the feedback log,
    then its ground truth and audit trail entry in PostgreSQL.

    The time of the feedback comes from the vigilance clock. Raises ``StudyNotFound``,
    ``InvalidFeedback`` (nothing recorded), and ``TransientError`` when Orthanc cannot be
    reached (nothing recorded: Orthanc holds the assessment first). PostgreSQL being down
    only costs the ground truth until the next ``triage reindex``; it is logged.
    """
    item = worklist.get(study_instance_uid)
    if item is None:
        raise StudyNotFound(f"study {study_instance_uid} is not on the worklist")
    check_feedback(item, feedback)
    at = clock.now(settings)
    assessment: Assessment | None = None
    if item.sr_sop_instance_uid:
        draft = FeedbackRecord(study_instance_uid=study_instance_uid, user=user, at=at,
                               **feedback.model_dump())
        assessment = assessment_of(draft, item.findings, item.sr_sop_instance_uid)
        ai_sr_id = orthanc.lookup_instance(item.sr_sop_instance_uid)
        if ai_sr_id is None:
            log.warning("study %s: its AI result SR is not in Orthanc; feedback kept on the "
                        "worklist only", pseudonym(study_instance_uid))
            assessment = None
        else:
            sr = build_assessment(assessment, orthanc.instance_dataset(ai_sr_id),
                                  site_zone=settings.site_zone)
            orthanc.store(encode(sr))
    record = add_feedback(worklist, connection, study_instance_uid, user, feedback, at=at,
                          sr_sop_instance_uid=assessment.sop_instance_uid if assessment
                          else None)
    if assessment is not None:
        record_truth(settings, [assessment])
    return record


# -- building the SR -------------------------------------------------------------------------

def observer_person_name(user: str, encodings: Sequence[str] = ()) -> str:
    """Person Observer Name (PN) for a user name: the name as the family name component,
    without the PN delimiters (^ =), backslash and control characters, cut to one component
    group's 64 bytes; "UNKNOWN" when nothing is left. The trailing caret marks the single
    component as the family name (PS3.5 6.2.1.2)."""
    cleaned = values.encodable(_PN_FORBIDDEN.sub("", user).strip(), encodings)
    family = values.fit(cleaned, values.MAX_BYTES["PN"] - 1, encodings).rstrip(" ")
    return f"{family or 'UNKNOWN'}^"


def login_name(user: str) -> str:
    """Person Observer's Login Name (TEXT): the user name, without control characters."""
    return _LOGIN_FORBIDDEN.sub("", user)[:LOGIN_NAME_LIMIT] or "unknown"


def build_assessment(assessment: Assessment, ai_sr: pydicom.Dataset, *,
                     site_zone: dt.tzinfo = dt.UTC) -> hd.sr.ComprehensiveSR:
    """The assessment SR of ``assessment``, in the study of ``ai_sr`` (the AI result SR it
    assesses, as stored in Orthanc).

    Patient and study attributes are copied from ``ai_sr``; dates and times are written at
    its UTC offset (or ``site_zone``'s). Raises ``AssessmentError`` when ``ai_sr`` is not the
    SR the assessment names, or lacks a finding it assesses.
    """
    _check_ai_sr(assessment, ai_sr)
    texts = [assessment.observer, *(f.meaning for f in assessment.findings),
             *(o.meaning for o in assessment.outcomes)]
    header = source_header(ai_sr, site_zone=site_zone, own_texts=texts,
                           created=assessment.at)
    when = header.when
    study_uid = str(header.dataset.StudyInstanceUID)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_as_evidence(header.dataset, ai_sr)],
        content=_content(assessment, header.encodings),
        series_instance_uid=uids.assessment_series_uid(study_uid),
        series_number=SERIES_NUMBER,
        sop_instance_uid=assessment.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name="Triage service codes",
            responsible_organization=MANUFACTURER)],
        specific_character_set=None,  # set by header.finish
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    header.pin_times(sr)
    if sr.get("PatientIdentityRemoved") == "YES" and not any(
            k in sr for k in ("DeidentificationMethod", "DeidentificationMethodCodeSequence")):
        del sr.PatientIdentityRemoved  # the AI SR dropped it the same way (report.py)
    header.finish(sr)
    return sr


def encode(sr: pydicom.Dataset) -> bytes:
    """The SR as a DICOM file, as Orthanc stores it."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def _check_ai_sr(assessment: Assessment, ai_sr: pydicom.Dataset) -> None:
    if str(ai_sr.get("SOPInstanceUID", "")) != assessment.ai_sr_sop_instance_uid:
        raise AssessmentError("the AI result SR given is not the one the assessment names")
    if str(ai_sr.get("StudyInstanceUID", "")) != assessment.study_instance_uid:
        raise AssessmentError("the AI result SR belongs to another study")
    known = set(_tracking_uids(ai_sr.get("ContentSequence", [])))
    for finding in assessment.findings:
        if finding.tracking_uid not in known:
            raise AssessmentError(f"the AI result SR has no finding {finding.code} of "
                                  f"{finding.model} {finding.model_version}")


def _tracking_uids(items: Sequence[pydicom.Dataset]) -> Iterator[str]:
    for item in items:
        concept = item.get("ConceptNameCodeSequence") or [None]
        if (item.get("ValueType") == "UIDREF" and concept[0] is not None
                and concept[0].get("CodeValue") == TRACKING_UID.value):
            yield str(item.UID)
        yield from _tracking_uids(item.get("ContentSequence", []))


def _as_evidence(header: pydicom.Dataset, ai_sr: pydicom.Dataset) -> pydicom.Dataset:
    """The cleaned header with the AI SR's identity: highdicom copies the patient and study
    from it and lists the AI SR in the Current Requested Procedure Evidence Sequence."""
    header.SOPClassUID = ai_sr.SOPClassUID
    header.SOPInstanceUID = ai_sr.SOPInstanceUID
    header.SeriesInstanceUID = ai_sr.SeriesInstanceUID
    return header


def _yes_no(value: bool) -> Code:
    return YES if value else NO


def _code(code: str, scheme: str, meaning: str) -> Code:
    return Code(code, scheme, meaning)


def _content(assessment: Assessment, encodings: Sequence[str]) -> hd.sr.ContainerContentItem:
    """The content tree (docs/assessment-sr.md)."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    root = hd.sr.ContainerContentItem(name=ASSESSMENT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(
        hd.sr.templates.DEFAULT_LANGUAGE))
    root.ContentSequence.extend(hd.sr.ObserverContext(
        observer_type=PERSON,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=observer_person_name(assessment.observer, encodings),
            login_name=login_name(assessment.observer))))
    root.ContentSequence.append(hd.sr.CompositeContentItem(
        name=SOURCE_REPORT, referenced_sop_class_uid=assessment.ai_sr_sop_class_uid,
        referenced_sop_instance_uid=assessment.ai_sr_sop_instance_uid,
        relationship_type=contains))
    for finding in assessment.findings:
        group = hd.sr.ContainerContentItem(name=ASSESSED_GROUP, relationship_type=contains)
        group.ContentSequence = hd.sr.ContentSequence([
            hd.sr.UIDRefContentItem(name=TRACKING_UID, value=finding.tracking_uid,
                                    relationship_type=contains),
            hd.sr.TextContentItem(
                name=TRACKING_IDENTIFIER,
                value=f"{finding.model}@{finding.model_version} "
                      f"{finding.scheme}:{finding.code}",
                relationship_type=contains),
            hd.sr.CodeContentItem(name=FINDING, value=_code(finding.code, finding.scheme,
                                                            finding.meaning),
                                  relationship_type=contains),
            hd.sr.CodeContentItem(name=AI_FLAGGED, value=_yes_no(finding.flagged),
                                  relationship_type=contains),
            hd.sr.CodeContentItem(name=AGREEMENT, value=_yes_no(finding.agree),
                                  relationship_type=contains),
        ])
        root.ContentSequence.append(group)
    if assessment.outcomes:
        final = hd.sr.ContainerContentItem(name=FINAL_READ, relationship_type=contains)
        final.ContentSequence = hd.sr.ContentSequence([
            hd.sr.CodeContentItem(name=_code(o.code, o.scheme, o.meaning),
                                  value=PRESENT if o.present else ABSENT,
                                  relationship_type=contains)
            for o in assessment.outcomes])
        root.ContentSequence.append(final)
    return root


# -- reading it back -------------------------------------------------------------------------

def read_assessment(ds: pydicom.Dataset) -> Assessment:
    """What an assessment SR of the service says (highdicom's SR reader).

    Raises ``AssessmentError`` when ``ds`` is not such an SR.
    """
    try:
        sr = hd.sr.ComprehensiveSR.from_dataset(ds, copy=True)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise AssessmentError(f"not a readable SR: {exc}") from exc
    [root] = sr.content
    if not _is(root.name, ASSESSMENT_TITLE):
        raise AssessmentError("the SR is not an AI result assessment (document title)")
    items = root.ContentSequence
    sources = [i for i in items if i.value_type == hd.sr.ValueTypeValues.COMPOSITE
               and _is(i.name, SOURCE_REPORT)]
    if len(sources) != 1:
        raise AssessmentError(f"the SR references {len(sources)} AI result SRs, not one")
    reference = sources[0].value
    findings = tuple(_assessed(group) for group in items
                     if group.value_type == hd.sr.ValueTypeValues.CONTAINER
                     and _is(group.name, ASSESSED_GROUP))
    outcomes = tuple(
        FinalReadOutcome(code=str(item.name.value), scheme=str(item.name.scheme_designator),
                         meaning=str(item.name.meaning), present=_present(item.value))
        for final in items
        if final.value_type == hd.sr.ValueTypeValues.CONTAINER and _is(final.name, FINAL_READ)
        for item in final.ContentSequence)
    return Assessment(study_instance_uid=str(ds.StudyInstanceUID),
                      observer=_observer(items), at=content_datetime(ds),
                      ai_sr_sop_instance_uid=str(reference[1]),
                      ai_sr_sop_class_uid=str(reference[0]),
                      findings=findings, outcomes=outcomes)


def _is(concept: hd.sr.CodedConcept, code: Code) -> bool:
    return (concept.value, concept.scheme_designator) == (code.value, code.scheme_designator)


def _observer(items: hd.sr.ContentSequence) -> str:
    for code in (codes.DCM.PersonObserverLoginName, codes.DCM.PersonObserverName):
        found = items.find(code)
        if found:
            return str(found[0].value)
    raise AssessmentError("the SR names no person observer")


def _one(items: hd.sr.ContentSequence, name: Code) -> Any:
    found = items.find(name)
    if len(found) != 1:
        raise AssessmentError(f"an assessed finding with {len(found)} {name.meaning!r} items")
    return found[0]


def _yes(value: hd.sr.CodedConcept) -> bool:
    if _is(value, YES):
        return True
    if _is(value, NO):
        return False
    raise AssessmentError(f"expected Yes or No, got {value.meaning!r}")


def _present(value: hd.sr.CodedConcept) -> bool:
    if _is(value, PRESENT):
        return True
    if _is(value, ABSENT):
        return False
    raise AssessmentError(f"expected Present or Absent, got {value.meaning!r}")


def _assessed(group: hd.sr.ContainerContentItem) -> AssessedFinding:
    items = group.ContentSequence
    finding = _one(items, FINDING).value
    # "<model id>@<version> <scheme>:<code>", as in the AI result SR (triage.report).
    identifier = str(_one(items, TRACKING_IDENTIFIER).value)
    model, at, version = identifier.split(" ", 1)[0].rpartition("@")
    if not at or not model:
        raise AssessmentError(f"tracking identifier {identifier!r} names no model")
    return AssessedFinding(
        tracking_uid=str(_one(items, TRACKING_UID).value), model=model, model_version=version,
        code=str(finding.value), scheme=str(finding.scheme_designator),
        meaning=str(finding.meaning), flagged=_yes(_one(items, AI_FLAGGED).value),
        agree=_yes(_one(items, AGREEMENT).value))


def content_datetime(ds: pydicom.Dataset) -> dt.datetime:
    """Content Date and Time at the SR's Timezone Offset From UTC, as an aware UTC time."""
    date, time = DA(ds.get("ContentDate")), TM(ds.get("ContentTime"))
    if date is None or time is None:
        raise AssessmentError("SR without Content Date or Content Time")
    offset = values.utc_offset(ds.get("TimezoneOffsetFromUTC") or "+0000")
    if offset is None:
        raise AssessmentError("invalid Timezone Offset From UTC")
    return dt.datetime.combine(date, time, tzinfo=offset).astimezone(dt.UTC)


# -- ground truth ----------------------------------------------------------------------------

def ground_truth(assessment: Assessment) -> list[Outcome]:
    """The ground-truth rows an assessment states (see the module's documentation)."""
    common = Outcome(study_uid=assessment.study_instance_uid, label="-", code="-:-",
                     present=False, source=SOURCE, observer=assessment.observer,
                     recorded_at=assessment.at, sr_sop_instance_uid=assessment.sop_instance_uid)
    rows = [replace(common, label=o.meaning, code=f"{o.scheme}:{o.code}", present=o.present)
            for o in assessment.outcomes]
    explicit = {(o.scheme, o.code) for o in assessment.outcomes}
    for finding in assessment.findings:
        if (finding.scheme, finding.code) in explicit:
            continue  # the final read says it outright
        rows.append(replace(common, label=finding.meaning,
                            code=f"{finding.scheme}:{finding.code}",
                            present=finding.flagged == finding.agree, model_id=finding.model))
    return rows


def _connect(settings: Settings) -> psycopg.Connection[TupleRow]:
    return db.connect(settings, timeout_seconds=CONNECT_TIMEOUT_SECONDS)


def record_truth(settings: Settings, assessments: Sequence[Assessment], *,
                 via: str = "api") -> int | None:
    """Record the ground truth of ``assessments`` in PostgreSQL, each with its audit trail
    entry (``feedback.recorded``) in the same transaction; return how many rows were new, or
    ``None`` when PostgreSQL could not take them (logged: the assessment SRs in Orthanc keep
    them, and ``triage reindex`` records them again).

    An assessment whose rows are already recorded (found by its SR's SOP Instance UID) is
    left as it is, trail included, so recording the same assessments again changes nothing.
    ``via`` says in the trail what recorded it ("api", "reindex"); a rebuild records no
    trail entry for an assessment that states no ground truth.
    """
    if not assessments:
        return 0
    try:
        conn = _connect(settings)
    except (psycopg.Error, TransientError) as exc:
        log.warning("ground truth of %d assessments not recorded: PostgreSQL unreachable (%s)",
                    len(assessments), type(exc).__name__)
        return None
    inserted = 0
    try:
        with conn:
            for assessment in assessments:
                inserted += _record_one(conn, assessment, via)
    except (psycopg.Error, RecordError) as exc:
        log.warning("ground truth of study %s not recorded (%s)",
                    pseudonym(assessments[0].study_instance_uid), type(exc).__name__)
        return None
    return inserted


def _record_one(conn: psycopg.Connection[TupleRow], assessment: Assessment, via: str) -> int:
    rows = ground_truth(assessment)
    if not rows and via != "api":
        return 0
    if conn.execute("SELECT 1 FROM ground_truth WHERE sr_sop_instance_uid = %s LIMIT 1",
                    (assessment.sop_instance_uid,)).fetchone() is not None:
        conn.commit()
        return 0
    trail.record(conn, actor=assessment.observer, action=TRAIL_ACTION,
                 study_uid=assessment.study_instance_uid, at=assessment.at, details={
                     "via": via,
                     "sr_sop_instance_uid": assessment.sop_instance_uid,
                     "ai_sr_sop_instance_uid": assessment.ai_sr_sop_instance_uid,
                     "models": sorted({f"{f.model}@{f.model_version}"
                                       for f in assessment.findings}),
                     "verdicts": len(assessment.findings),
                     "outcomes": len(assessment.outcomes),
                     "ground_truth": len(rows)})
    if not rows:
        conn.commit()
        return 0
    # Commits the trail entry with the rows; an invalid row rolls both back.
    return record_ground_truth(conn, rows)
