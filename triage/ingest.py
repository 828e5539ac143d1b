"""What the service knows of a study in Orthanc before it analyses it.

A snapshot lists the study's source series (everything but the series the service wrote
itself: AI result SRs, key images, radiologists' assessments)
and a fingerprint of its source instances. Orthanc identifiers are hashes of the DICOM UIDs, so
the fingerprint is stable across restarts and re-imports, and it changes when a late instance
arrives, which is what triggers a re-analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from triage.orthanc import OrthancClient, orthanc_time
from triage.selection import SeriesInfo, series_info
from triage.uids import assessment_series_uid, fingerprint, own_series_uids, sr_series_uid


@dataclass(frozen=True)
class SourceSeries:
    orthanc_id: str
    info: SeriesInfo
    instance_ids: tuple[str, ...]


@dataclass(frozen=True)
class StudySnapshot:
    orthanc_id: str
    study_instance_uid: str
    accession_number: str
    patient_name: str
    patient_id: str
    study_description: str
    study_date: str
    series: tuple[SourceSeries, ...]
    # One source instance's attributes and how it arrived: what the clinical priority reads.
    first_instance: dict[str, Any] = field(default_factory=dict)
    calling_aet: str = ""
    # When Orthanc received that instance: the study's arrival time on the worklist, which
    # a rebuild of the worklist from Orthanc finds again.
    received_at: datetime | None = None
    # Instances of the SRs the service wrote into this study earlier.
    own_sr_ids: tuple[str, ...] = ()
    # Instances of the radiologists' assessment SRs (``triage.vigilance.assessment``).
    assessment_ids: tuple[str, ...] = ()
    # The second and third identifiers reading rooms show beside the name and ID.
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""

    @property
    def inputs(self) -> str:
        """Fingerprint of the source instances."""
        return fingerprint(i for s in self.series for i in s.instance_ids)

    @property
    def issuer_of_patient_id(self) -> str:
        return str(self.first_instance.get("IssuerOfPatientID") or "")

    @property
    def modalities(self) -> str:
        return "/".join(sorted({s.info.modality for s in self.series if s.info.modality}))

    @property
    def n_instances(self) -> int:
        return sum(len(s.instance_ids) for s in self.series)


def _series(raw: dict[str, Any], tags: dict[str, Any] | None) -> SourceSeries:
    """A source series from Orthanc's series resource and, if read, one instance's tags."""
    instances = tuple(raw.get("Instances", []))
    attributes = {**(tags or {}), **raw.get("MainDicomTags", {})}
    return SourceSeries(orthanc_id=raw["ID"], info=series_info(attributes, len(instances)),
                        instance_ids=instances)


def snapshot_study(orthanc: OrthancClient, orthanc_id: str, *, details: bool = False,
                   first_instance: bool = False,
                   study_instance_uid: str | None = None) -> StudySnapshot:
    """Read a study from Orthanc.

    With ``details``, the tags of one instance per series are read too (storage class, slice
    thickness, image type, orientation, patient age): what model selection needs. With
    ``first_instance``, the tags of one source instance and its calling AE title are read.
    A caller that knows the ``study_instance_uid`` (a worker) gets the series without the
    study's own resource: patient and study attributes are then left empty.
    """
    study = orthanc.study(orthanc_id) if study_instance_uid is None else {}
    tags = study.get("MainDicomTags", {})
    patient = study.get("PatientMainDicomTags", {})
    study_uid = tags.get("StudyInstanceUID", "") if study_instance_uid is None else (
        study_instance_uid)
    results = str(sr_series_uid(study_uid))
    assessments = str(assessment_series_uid(study_uid))
    # Key images and assessments the service stores are its own output too, never input.
    own_series = own_series_uids(study_uid)
    series = []
    own_sr_ids: list[str] = []
    assessment_ids: list[str] = []
    for raw in orthanc.study_series(orthanc_id):
        series_uid = raw.get("MainDicomTags", {}).get("SeriesInstanceUID")
        if series_uid == results:
            own_sr_ids += raw.get("Instances", [])
        elif series_uid == assessments:
            assessment_ids += raw.get("Instances", [])
        if series_uid in own_series:
            continue
        first_tags = None
        if details and raw.get("Instances"):
            first_tags = orthanc.instance_tags(raw["Instances"][0])
        series.append(_series(raw, first_tags))
    ordered = tuple(sorted(series, key=lambda s: s.info.series_instance_uid))
    first: dict[str, Any] = {}
    calling_aet = ""
    received_at = None
    if first_instance and ordered and ordered[0].instance_ids:
        instance = ordered[0].instance_ids[0]
        first = orthanc.instance_tags(instance)
        metadata = orthanc.instance_metadata(instance)
        calling_aet = metadata.get("RemoteAET", "")
        received_at = orthanc_time(metadata.get("ReceptionDate", ""))
    return StudySnapshot(
        orthanc_id=orthanc_id,
        study_instance_uid=study_uid,
        accession_number=tags.get("AccessionNumber", ""),
        patient_name=patient.get("PatientName", ""),
        patient_id=patient.get("PatientID", ""),
        study_description=tags.get("StudyDescription", ""),
        study_date=tags.get("StudyDate", ""),
        series=ordered,
        first_instance=first,
        calling_aet=calling_aet,
        received_at=received_at,
        own_sr_ids=tuple(own_sr_ids),
        assessment_ids=tuple(assessment_ids),
        patient_birth_date=str(patient.get("PatientBirthDate", "")),
        patient_sex=str(patient.get("PatientSex", "")),
        patient_age=str(first.get("PatientAge", "") or ""),
    )

