"""Deterministic DICOM UIDs and job identifiers.

A retried or duplicated job must never write a second, different SR, so every identifier the
worker creates is derived from what it analysed: the study, the model id and version, and the
exact set of input instances (DESIGN.md, "Idempotency").
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

from pydicom.uid import UID

# Name-based (version 5) UUIDs under the 2.25 root (PS3.5 B.2) need no registered root.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "triage")


def derived_uid(*parts: str) -> UID:
    """A 2.25 UID that is a pure function of ``parts``."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}")


def fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """A short stable digest of a set of instances (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode())
    return digest.hexdigest()[:24]


def sr_series_uid(study_instance_uid: str) -> UID:
    """The series that holds every SR the service writes into a study."""
    return derived_uid("sr-series", study_instance_uid)


def key_image_series_uid(study_instance_uid: str) -> UID:
    """The series that holds the burned-in key images the service writes into a study."""
    return derived_uid("key-image-series", study_instance_uid)


def assessment_series_uid(study_instance_uid: str) -> UID:
    """The series that holds the radiologists' assessments of the AI results in a study."""
    return derived_uid("assessment-series", study_instance_uid)


def own_series_uids(study_instance_uid: str) -> frozenset[str]:
    """Every series the service writes into a study (AI results, key images, assessments):
    never analysis input, and storing into them never makes the study new again."""
    return frozenset({str(sr_series_uid(study_instance_uid)),
                      str(key_image_series_uid(study_instance_uid)),
                      str(assessment_series_uid(study_instance_uid))})


def assessment_instance_uid(study_instance_uid: str, user: str, at: str) -> UID:
    """The assessment SR of one feedback: the study, who gave it and when (ISO 8601), so that
    storing the same feedback again writes the same instance."""
    return derived_uid("assessment", study_instance_uid, user, at)


def sr_instance_uid(study_instance_uid: str, model_keys: Iterable[str], inputs: str) -> UID:
    """The SR of one analysis: study, the models (``id@version``) and the input fingerprint."""
    return derived_uid("sr", study_instance_uid, *sorted(model_keys), inputs)


def job_id(study_instance_uid: str, inputs: str) -> str:
    """RQ job id of the analysis of a study with a given set of source instances."""
    study = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]
    return f"analyse-{study}-{inputs}"
