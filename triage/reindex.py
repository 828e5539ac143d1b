"""Rebuild the worklist from Orthanc when Redis lost it (``triage reindex``).

Orthanc is the source of truth (DESIGN.md, "Data flow"): every study it holds, and the SRs the
service wrote into them, are enough to put the worklist back together.

For each study in Orthanc:

- The study has an SR of ours: the latest one (the one no other SR of ours names as its
  predecessor; the content date and time break ties) is read back with highdicom and the
  analysed item is rebuilt from it: findings (finding type, probability, model, version, key
  image), one result per model, the priority (the clinical floor raised by the findings) and
  the SR's UID and content date and time. Thresholds, the priority a finding implies, the
  weights' SHA-256 and the regulatory status come from the manifest of the same model id and
  version in the model registry. When that version is no longer installed the SR's values are
  kept, the threshold is unknown (recorded as 1.0, the finding not positive) and the finding
  raises nothing; the item's status reason says so.
- If that SR was made from another set of source instances than the study holds now (images
  arrived after the analysis), the rebuilt findings are kept and the study is queued for
  analysis again, exactly as the watcher queues a study that received late images.
- The study has no SR of ours: it is queued for analysis as the watcher queues a stable study.
  This includes studies that were skipped or failed before (neither writes an SR): they are
  analysed again and end with the same status and reason.
- A study still receiving images (not yet stable) is left to the watcher, which is told to
  watch it.

Finally the watcher's cursor is set to the last change Orthanc had logged when the rebuild
started, so the watcher does not queue the indexed studies again; changes logged during the
rebuild are still read, and the deterministic job ids make those re-reads no-ops.

The radiologists' feedback comes back from the assessment SRs in each study
(``triage.vigilance.assessment``): each item's feedback list is rebuilt from them, oldest
first, and their ground truth is recorded again in PostgreSQL (rows already there are left
as they are; PostgreSQL unreachable is logged and leaves the worklist rebuilt).

What Orthanc does not hold cannot come back: claims and reads of radiologists,
anti-starvation promotions (the watcher promotes overdue studies again on its next round) and
the per-step timings of the analyses.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import highdicom as hd
import pydicom
import redis
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from triage.errors import TransientError
from triage.ingest import StudySnapshot, snapshot_study
from triage.logs import pseudonym
from triage.manifest import OutputLabel
from triage.orthanc import OrthancClient, StudyGone
from triage.priority import ClinicalPriority, clinical_priority, highest
from triage.registry import ModelPackage, ModelRegistry
from triage.ris import intake
from triage.settings import Settings
from triage.uids import job_id as make_job_id
from triage.uids import sr_instance_uid
from triage.vigilance.assessment import (
    Assessment,
    AssessmentError,
    read_assessment,
    record_truth,
)
from triage.watcher import CURSOR_KEY, UNSTABLE_KEY, Watcher
from triage.worklist import (
    FeedbackRecord,
    FindingItem,
    ResultItem,
    SeriesItem,
    StudyStatus,
    WorklistItem,
)

log = logging.getLogger(__name__)

# Recorded for a finding whose model version is no longer installed: its threshold is unknown.
UNKNOWN_THRESHOLD = 1.0
UNKNOWN_REGULATORY_STATUS = "unknown (model version no longer installed)"


@dataclass
class ReindexReport:
    """What a rebuild did, in numbers of studies."""

    studies: int = 0
    analysed_from_sr: int = 0
    queued: int = 0
    late_images: int = 0
    unchanged: int = 0
    not_stable: int = 0
    without_images: int = 0
    unreadable: int = 0
    assessments: int = 0
    ground_truth: int = 0

    def summary(self) -> str:
        return (f"{self.studies} studies: {self.analysed_from_sr} analysed (rebuilt from their "
                f"SR), {self.queued} queued for analysis ({self.late_images} with images newer "
                f"than their SR), {self.unchanged} already on the worklist, {self.not_stable} "
                f"still receiving images (left to the watcher), {self.without_images} without "
                f"images, {self.unreadable} unreadable; {self.assessments} assessments read, "
                f"{self.ground_truth} ground-truth rows recorded again")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ReportedFinding:
    """One TID 1501 measurement group of an SR of ours, as read back."""

    model_id: str
    model_version: str
    model_name: str
    code: str
    scheme: str
    meaning: str
    probability: float
    key_sop_instance_uid: str | None


@dataclass(frozen=True)
class ReadReport:
    """What the worklist needs from one SR of ours."""

    sop_instance_uid: str
    content_datetime: dt.datetime
    findings: tuple[ReportedFinding, ...]
    # Series Instance UID of each evidence instance (SOP Instance UID -> series).
    evidence: dict[str, str]

    @property
    def model_keys(self) -> list[str]:
        return sorted({f"{f.model_id}@{f.model_version}" for f in self.findings})


def reindex(settings: Settings, orthanc: OrthancClient, connection: redis.Redis,
            registry: ModelRegistry | None = None) -> ReindexReport:
    """Rebuild the worklist of every study in Orthanc; see the module's documentation.

    Safe to run again, and on a worklist that was not lost: items already there for the same
    images are left as they are. Orthanc or Redis becoming unreachable stops the rebuild
    (without moving the watcher's cursor); running it again finishes the work.
    """
    if registry is None:
        registry = ModelRegistry.load(settings.models_dir)
    watcher = Watcher(settings, orthanc, connection)
    last = orthanc.last_change()
    report = ReindexReport()
    assessments: list[Assessment] = []
    for study_id in orthanc.studies():
        report.studies += 1
        try:
            _reindex_study(watcher, registry, study_id, last, report, assessments)
        except (TransientError, redis.ConnectionError, redis.TimeoutError):
            raise
        except StudyGone:
            log.info("study %s was deleted during the rebuild", study_id)
            report.studies -= 1
        except Exception:
            log.exception("study %s could not be rebuilt; moving on", study_id)
            report.unreadable += 1
    connection.set(CURSOR_KEY, last)
    report.assessments = len(assessments)
    report.ground_truth = record_truth(settings, assessments, via="reindex") or 0
    log.info("worklist rebuilt: %s", report.summary())
    return report


def _reindex_study(watcher: Watcher, registry: ModelRegistry, study_id: str, last_change: int,
                   report: ReindexReport, assessments: list[Assessment]) -> None:
    stable = watcher.orthanc.study(study_id).get("IsStable", True)
    if not stable:
        # Its StableStudy change is still to come, after the cursor; should Orthanc restart
        # first, the watcher's sweep finds it among the studies it remembers.
        watcher.redis.hsetnx(UNSTABLE_KEY, study_id, last_change)
    snapshot = snapshot_study(watcher.orthanc, study_id, first_instance=True)
    if not snapshot.series:
        if stable:
            report.without_images += 1  # only SRs of ours: nothing to analyse
        else:
            report.not_stable += 1
        return
    read = _latest_readable_report(watcher.orthanc, snapshot)
    if not stable and (read is None or read.sop_instance_uid != str(sr_instance_uid(
            snapshot.study_instance_uid, read.model_keys, snapshot.inputs))):
        # Images still arriving: the watcher queues the study once it is complete. A study
        # whose SR covers its images now is rebuilt at once: what made it unstable was an
        # object of the service's own (an assessment SR, say), which the watcher ignores.
        report.not_stable += 1
        return
    found = _read_assessments(watcher.orthanc, snapshot)
    assessments += found
    feedback = feedback_of(found)
    if read is None:
        _count_queued(report, watcher.queue_study(snapshot))
        return
    clinical = clinical_of(watcher.settings, snapshot)
    current_uid = sr_instance_uid(snapshot.study_instance_uid, read.model_keys, snapshot.inputs)
    if read.sop_instance_uid != str(current_uid):
        # The SR reports on another set of instances: keep its findings, analyse again.
        rebuilt = analysed_item(snapshot, read, registry, clinical, job_id="", inputs="")
        rebuilt = _with_orders(watcher, snapshot, rebuilt.model_copy(
            update={"feedback": feedback}))
        watcher.worklist.upsert(snapshot.study_instance_uid,
                                lambda existing: rebuilt if existing is None else None,
                                event="rebuilt")
        queued = watcher.queue_study(snapshot)
        report.late_images += queued
        _count_queued(report, queued)
        return
    job_id = make_job_id(snapshot.study_instance_uid, snapshot.inputs)
    rebuilt = analysed_item(snapshot, read, registry, clinical, job_id=job_id,
                            inputs=snapshot.inputs)
    rebuilt = _with_orders(watcher, snapshot, rebuilt.model_copy(update={"feedback": feedback}))
    stored = watcher.worklist.upsert(snapshot.study_instance_uid,
                                     lambda existing: _merge(existing, rebuilt),
                                     event="rebuilt")
    if stored is None:
        report.unchanged += 1
    else:
        report.analysed_from_sr += 1
        log.info("study %s rebuilt from its SR", pseudonym(snapshot.study_instance_uid))


def _with_orders(watcher: Watcher, snapshot: StudySnapshot, item: WorklistItem
                 ) -> WorklistItem:
    """``item`` with the RIS orders still kept for the study (and the floor they give)."""
    return intake.with_orders(item, intake.orders_of(watcher.redis, snapshot))


def _count_queued(report: ReindexReport, queued: bool) -> None:
    if queued:
        report.queued += 1
    else:
        report.unchanged += 1


def _merge(existing: WorklistItem | None, rebuilt: WorklistItem) -> WorklistItem | None:
    """The rebuilt item, or ``None`` to keep an item already there for the same images.

    An item from an earlier set of images gives way to the rebuilt one, but keeps what
    radiologists did with the study, and nothing lowers its priority.
    """
    if existing is None:
        return rebuilt
    if existing.job_id == rebuilt.job_id and existing.status.terminal:
        return None
    reasons = rebuilt.priority_reasons + [
        r for r in existing.priority_reasons if r not in rebuilt.priority_reasons]
    return rebuilt.model_copy(update={
        "priority": highest([existing.priority, rebuilt.priority]),
        "clinical_priority": highest([existing.clinical_priority, rebuilt.clinical_priority]),
        "priority_reasons": reasons,
        "claimed_by": existing.claimed_by, "claim_expires_at": existing.claim_expires_at,
        "read_by": existing.read_by, "read_at": existing.read_at,
        "feedback": existing.feedback,
        "orders": rebuilt.orders or existing.orders,
    })


def clinical_of(settings: Settings, snapshot: StudySnapshot) -> ClinicalPriority:
    """The clinical priority of a study, read as the watcher reads it."""
    return clinical_priority(snapshot.first_instance, calling_aet=snapshot.calling_aet,
                             emergency_locations=settings.emergency_locations,
                             emergency_aets=settings.emergency_aets)


# -- reading the SRs back -------------------------------------------------------------------

def _read_assessments(orthanc: OrthancClient, snapshot: StudySnapshot) -> list[Assessment]:
    """The radiologists' assessment SRs in the study, read back; an unreadable one is
    logged and left out."""
    found = []
    for instance in snapshot.assessment_ids:
        try:
            found.append(read_assessment(orthanc.instance_dataset(instance)))
        except AssessmentError as exc:
            log.warning("study %s: an assessment SR cannot be read back (%s)",
                        pseudonym(snapshot.study_instance_uid), exc)
    return found


def feedback_of(assessments: Sequence[Assessment]) -> list[FeedbackRecord]:
    """The worklist's feedback list of a study, oldest first, from its assessments."""
    ordered = sorted(assessments, key=lambda a: (a.at, a.sop_instance_uid))
    return [a.feedback_record() for a in ordered]


def _latest_readable_report(orthanc: OrthancClient, snapshot: StudySnapshot
                            ) -> ReadReport | None:
    """The latest SR of ours in the study, read back; ``None`` when there is none or it
    cannot be read (the study is then analysed again)."""
    if not snapshot.own_sr_ids:
        return None
    datasets = [orthanc.instance_dataset(i) for i in snapshot.own_sr_ids]
    latest = latest_report(datasets)
    try:
        return read_report(latest)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:
        log.warning("study %s: its latest SR cannot be read back (%s); analysing it again",
                    pseudonym(snapshot.study_instance_uid), exc)
        return None


def latest_report(datasets: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """The SR no other one names in its Predecessor Documents Sequence; among several such
    (none should be), the one with the latest content date and time."""
    superseded = {
        str(sop.ReferencedSOPInstanceUID)
        for ds in datasets
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    }
    current = [ds for ds in datasets if str(ds.SOPInstanceUID) not in superseded]
    candidates = current or list(datasets)  # a cycle cannot happen, but never return nothing
    return max(candidates, key=lambda ds: (_content_sort_key(ds), str(ds.SOPInstanceUID)))


def _content_sort_key(ds: pydicom.Dataset) -> str:
    return f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"


def content_datetime(ds: pydicom.Dataset) -> dt.datetime:
    """Content Date and Time of an SR as an aware datetime.

    The worker writes local time without Timezone Offset From UTC; with no offset in the SR,
    the time is taken as this machine's local time.
    """
    date, time = DA(ds.ContentDate), TM(ds.ContentTime)
    if date is None or time is None:
        raise ValueError("SR without Content Date or Content Time")
    naive = dt.datetime.combine(date, time)
    offset = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    if len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        sign = 1 if offset[0] == "+" else -1
        delta = dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:]))
        return naive.replace(tzinfo=dt.timezone(sign * delta)).astimezone(dt.UTC)
    return naive.astimezone().astimezone(dt.UTC)


def read_report(ds: pydicom.Dataset) -> ReadReport:
    """Read the findings of one SR of ours back with highdicom's SR API.

    Raises ``ValueError`` when the SR is not one the service writes (no measurement group,
    a group without the model, finding type or probability).
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("SR content is not a TID 1500 measurement report")
    groups = content.get_image_measurement_groups()
    if not groups:
        raise ValueError("SR has no measurement group")
    findings = tuple(_reported_finding(group) for group in groups)
    evidence = {str(sop): str(series) for _study, series, sop, _cls in sr.get_evidence()}
    return ReadReport(sop_instance_uid=str(ds.SOPInstanceUID),
                      content_datetime=content_datetime(ds), findings=findings,
                      evidence=evidence)


def _reported_finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> ReportedFinding:
    # The Tracking Identifier is "<model id>@<version> <scheme>:<code>" (report.py); the model
    # id appears nowhere else in the content.
    model_key = str(group.tracking_identifier or "").split(" ", 1)[0]
    model_id, at, tracked_version = model_key.rpartition("@")
    if not at or not model_id:
        raise ValueError(f"tracking identifier {group.tracking_identifier!r} names no model")
    items = group[0].ContentSequence
    name = _text(items, codes.DCM.AlgorithmName)
    version = _text(items, codes.DCM.AlgorithmVersion)
    if version != tracked_version:
        raise ValueError(f"algorithm version {version!r} differs from the tracking "
                         f"identifier's {tracked_version!r}")
    finding_type = group.finding_type
    if finding_type is None:
        raise ValueError("measurement group without a finding type")
    probabilities = group.get_measurements(name=codes.DCM.Probability)
    if len(probabilities) != 1:
        raise ValueError(f"measurement group with {len(probabilities)} probabilities")
    key = None
    if group.source_images:
        key = str(group.source_images[0].referenced_sop_instance_uid)
    return ReportedFinding(model_id=model_id, model_version=version, model_name=name,
                           code=str(finding_type.value), scheme=str(finding_type.scheme_designator),
                           meaning=str(finding_type.meaning),
                           probability=float(probabilities[0].value), key_sop_instance_uid=key)


def _text(items: hd.sr.ContentSequence, name: Code) -> str:
    found = items.find(name)
    if len(found) != 1:
        raise ValueError(f"measurement group with {len(found)} {name.meaning!r} items")
    return str(found[0].value)


# -- the rebuilt item -----------------------------------------------------------------------

def _installed(registry: ModelRegistry, model_id: str, version: str) -> ModelPackage | None:
    for package in registry.packages:
        if package.manifest.id == model_id and package.manifest.version == version:
            return package
    return None


def _output(package: ModelPackage | None, finding: ReportedFinding) -> OutputLabel | None:
    if package is None:
        return None
    for output in package.manifest.outputs:
        if (output.concept.code_value, output.concept.scheme_designator) == (
                finding.code, finding.scheme):
            return output
    return None


def analysed_item(snapshot: StudySnapshot, read: ReadReport, registry: ModelRegistry,
                  clinical: ClinicalPriority, *, job_id: str, inputs: str) -> WorklistItem:
    """The worklist item of a study analysed as ``read`` says, as the worker would have
    recorded it (``triage.jobs``)."""
    findings: list[FindingItem] = []
    unknown: list[str] = []
    for reported in read.findings:
        output = _output(_installed(registry, reported.model_id, reported.model_version),
                         reported)
        if output is None:
            key = f"{reported.model_id} {reported.model_version}"
            unknown += [key] if key not in unknown else []
            threshold, positive, priority = UNKNOWN_THRESHOLD, False, None
        else:
            threshold = output.threshold
            positive = reported.probability >= threshold
            priority = output.priority if positive else None
        findings.append(FindingItem(
            code=reported.code, scheme=reported.scheme, meaning=reported.meaning,
            probability=reported.probability, threshold=threshold, positive=positive,
            priority=priority, model=reported.model_id, model_version=reported.model_version,
            key_sop_instance_uid=reported.key_sop_instance_uid))
    raised = [f for f in findings if f.positive and f.priority is not None]
    reasons = list(clinical.reasons)
    reasons += [r for r in (f"AI: {f.meaning} (p={f.probability:.2f}, {f.model} "
                            f"{f.model_version})" for f in raised) if r not in reasons]
    status_reason = ""
    if unknown:
        status_reason = (f"rebuilt from the SR; no longer installed: {', '.join(unknown)} "
                         "(thresholds unknown, its findings raise no priority)")
    base = Watcher._queued_item(snapshot, job_id, clinical, None)
    return base.model_copy(update={
        "inputs": inputs,
        "status": StudyStatus.ANALYSED, "status_reason": status_reason,
        "priority": highest([clinical.priority, *(f.priority for f in raised)]),
        "priority_reasons": reasons,
        "score": max((f.probability for f in findings), default=0.0),
        "findings": findings,
        "results": _results(read, registry),
        "analysed_at": read.content_datetime,
        "sr_sop_instance_uid": read.sop_instance_uid,
        "series": [SeriesItem(series_instance_uid=s.info.series_instance_uid,
                              modality=s.info.modality, description=s.info.description,
                              body_part=s.info.body_part, n_instances=s.info.n_instances)
                   for s in snapshot.series],
    })


def _results(read: ReadReport, registry: ModelRegistry) -> list[ResultItem]:
    """One result per model of the SR. Its series is that of its key images; its instance
    count, the SR's evidence in that series (timings are not in the SR)."""
    results: list[ResultItem] = []
    seen: set[tuple[str, str]] = set()
    for finding in read.findings:
        key = (finding.model_id, finding.model_version)
        if key in seen:
            continue
        seen.add(key)
        package = _installed(registry, *key)
        series = next((read.evidence[f.key_sop_instance_uid] for f in read.findings
                       if (f.model_id, f.model_version) == key and f.key_sop_instance_uid
                       in read.evidence), "")
        results.append(ResultItem(
            model=finding.model_id, model_version=finding.model_version,
            model_name=finding.model_name,
            weights_sha256=package.manifest.sha256 if package else "",
            regulatory_status=(package.manifest.regulatory_status if package
                               else UNKNOWN_REGULATORY_STATUS),
            series_instance_uid=series,
            n_instances=sum(1 for s in read.evidence.values() if s == series)))
    return results

