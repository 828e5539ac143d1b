"""What the service knows of a study in Orthanc before it analyses it.

A snapshot lists the study's source series (everything but the SRs the service wrote itself)
and a fingerprint of its source instances. Orthanc identifiers are hashes of the DICOM UIDs, so
the fingerprint is stable across restarts and re-imports, and it changes when a late instance
arrives, which is what triggers a re-analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from triage.orthanc import OrthancClient
from triage.selection import SeriesInfo
from triage.uids import fingerprint, sr_series_uid


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

    @property
    def inputs(self) -> str:
        """Fingerprint of the source instances."""
        return fingerprint(i for s in self.series for i in s.instance_ids)

    @property
    def modalities(self) -> str:
        return "/".join(sorted({s.info.modality for s in self.series if s.info.modality}))

    @property
    def n_instances(self) -> int:
        return sum(len(s.instance_ids) for s in self.series)


def _series(raw: dict[str, Any], sop_class_uid: str) -> SourceSeries:
    tags = raw.get("MainDicomTags", {})
    instances = tuple(raw.get("Instances", []))
    info = SeriesInfo(
        series_instance_uid=tags.get("SeriesInstanceUID", ""),
        modality=tags.get("Modality", ""),
        sop_class_uid=sop_class_uid,
        body_part=tags.get("BodyPartExamined", ""),
        description=tags.get("SeriesDescription", ""),
        n_instances=len(instances),
    )
    return SourceSeries(orthanc_id=raw["ID"], info=info, instance_ids=instances)


def snapshot_study(orthanc: OrthancClient, orthanc_id: str, *,
                   sop_classes: bool = False) -> StudySnapshot:
    """Read a study from Orthanc; ``sop_classes`` also looks up each series' SOP Class UID."""
    study = orthanc.study(orthanc_id)
    tags = study.get("MainDicomTags", {})
    patient = study.get("PatientMainDicomTags", {})
    study_uid = tags.get("StudyInstanceUID", "")
    own_series = str(sr_series_uid(study_uid))
    series = []
    for raw in orthanc.study_series(orthanc_id):
        if raw.get("MainDicomTags", {}).get("SeriesInstanceUID") == own_series:
            continue
        sop_class = ""
        if sop_classes and raw.get("Instances"):
            sop_class = orthanc.instance_metadata(raw["Instances"][0], "SopClassUid")
        series.append(_series(raw, sop_class))
    return StudySnapshot(
        orthanc_id=orthanc_id,
        study_instance_uid=study_uid,
        accession_number=tags.get("AccessionNumber", ""),
        patient_name=patient.get("PatientName", ""),
        patient_id=patient.get("PatientID", ""),
        study_description=tags.get("StudyDescription", ""),
        study_date=tags.get("StudyDate", ""),
        series=tuple(sorted(series, key=lambda s: s.info.series_instance_uid)),
    )
