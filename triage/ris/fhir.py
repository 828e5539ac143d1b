"""Preliminary results to FHIR servers: one DiagnosticReport per result (FHIR R4 or R5).

The report carries one Observation per finding (its probability, positive or negative, and
the model and version that produced it as a Device), all contained in the report so that one
request writes everything and a retried request never writes anything twice. Its identifier
is the SR SOP Instance UID (``urn:dicom:uid``), the key of the conditional create; with
``put`` the report's id is derived from the same UID. Built and validated with fhir.resources
(R5 from ``fhir.resources``, R4 from ``fhir.resources.R4B``); what that library does not
enforce (status codes, URI and OID formats) is checked here.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import httpx
from fhir.resources.diagnosticreport import DiagnosticReport as DiagnosticReportR5
from fhir.resources.R4B.diagnosticreport import DiagnosticReport as DiagnosticReportR4B
from pydantic import ValidationError

from triage.delivery import _attempt, configured, current_result
from triage.errors import PermanentError, TransientError
from triage.ris.results import cleared, private_values
from triage.settings import FhirDestination, Settings
from triage.worklist import FindingItem, WorklistItem, utcnow

DICOM_UID = "urn:dicom:uid"
PRELIMINARY = "preliminary"
LOINC = "http://loinc.org"
IMAGING_REPORT = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
             "display": "Radiology"}
ACCESSION = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
             "display": "Accession ID"}
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
UCUM = "http://unitsofmeasure.org"
# Coding systems of the DICOM scheme designators the model manifests use (PS3.16, 8.2).
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": LOINC,
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "RADLEX": "http://radlex.org",
    "UCUM": UCUM,
}
MEDIA_TYPE = "application/fhir+json"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def report_id(sr_uid: str) -> str:
    """The DiagnosticReport's logical id for ``put``: derived from the SR SOP Instance UID,
    a valid FHIR id (not all digits, which some servers refuse for client-assigned ids)."""
    return "ai-" + hashlib.sha256(sr_uid.encode()).hexdigest()[:40]


def uid_identifier(uid: str) -> dict[str, str]:
    """A DICOM UID as a FHIR Identifier (``urn:dicom:uid``, ``urn:oid:`` value)."""
    if not _OID.match(uid):
        raise ValueError("not a valid DICOM UID")
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def diagnostic_report(settings: Settings, destination: FhirDestination,
                      item: WorklistItem) -> dict[str, Any]:
    """The preliminary DiagnosticReport of the item's result for ``destination``'s FHIR
    version, validated, as JSON-ready data."""
    if not item.sr_sop_instance_uid:
        raise ValueError("the study has no result to send")
    issued = (item.analysed_at or utcnow()).astimezone(settings.site_zone).isoformat()
    subject = _patient(item) if item.patient_id else None
    devices = _devices(destination, item)
    observations = [_observation(f"finding-{n}", finding, subject, issued,
                                 devices[(finding.model, finding.model_version)])
                    for n, finding in enumerate(item.findings, start=1)]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": [*devices.values(), *observations],
        "identifier": [uid_identifier(item.sr_sop_instance_uid)],
        "status": PRELIMINARY,
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [IMAGING_REPORT], "text": "AI triage of imaging study"},
        "subject": subject,  # none: a study without Patient ID
        "issued": issued,
        "result": [{"reference": f"#{o['id']}", "type": "Observation"} for o in observations],
        "conclusion": _conclusion(item),
    }
    study = [{"type": "ImagingStudy", "identifier": uid_identifier(item.study_instance_uid)}]
    report["study" if destination.fhir_version == "R5" else "imagingStudy"] = study
    accession = item.accession_number or next(
        (o.accession_number for o in item.orders if o.accession_number), "")
    if accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [ACCESSION]}, "value": accession}}]
    if destination.method == "put":
        report["id"] = report_id(item.sr_sop_instance_uid)
    model = DiagnosticReportR5 if destination.fhir_version == "R5" else DiagnosticReportR4B
    data: dict[str, Any] = model.model_validate(report).model_dump(mode="json",
                                                                   exclude_none=True)
    _check(data)
    return data


def _patient(item: WorklistItem) -> dict[str, Any]:
    """The subject by identifier: Patient ID, with the issuer as its system when the issuer
    is a URI or an OID, else as the identifier's assigner."""
    identifier: dict[str, Any] = {"value": item.patient_id}
    issuer = item.issuer_of_patient_id
    if _OID.match(issuer):
        identifier["system"] = f"urn:oid:{issuer}"
    elif _URI.match(issuer):
        identifier["system"] = issuer
    elif issuer:
        identifier["assigner"] = {"display": issuer}
    return {"type": "Patient", "identifier": identifier}


def _devices(destination: FhirDestination, item: WorklistItem
             ) -> dict[tuple[str, str], dict[str, Any]]:
    """One contained Device per model version that produced a finding."""
    names = {(r.model, r.model_version): r.model_name for r in item.results}
    devices = {}
    for n, key in enumerate(dict.fromkeys((f.model, f.model_version) for f in item.findings),
                            start=1):
        model, version = key
        name = names.get(key) or model
        device: dict[str, Any] = {"resourceType": "Device", "id": f"model-{n}",
                                  "version": [{"value": version}]}
        if destination.fhir_version == "R5":
            device["name"] = [{"value": name, "type": "user-friendly-name"}]
        else:
            device["deviceName"] = [{"name": name, "type": "user-friendly-name"}]
        device["identifier"] = [{"value": model}]
        devices[key] = device
    return devices


def _observation(id_: str, finding: FindingItem, subject: dict[str, Any] | None, issued: str,
                 device: dict[str, Any]) -> dict[str, Any]:
    coding = {"code": finding.code, "display": finding.meaning}
    if finding.scheme in SYSTEMS:
        coding["system"] = SYSTEMS[finding.scheme]
    positive = finding.positive
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": PRELIMINARY,
        "code": {"coding": [coding], "text": finding.meaning},
        "subject": subject,
        "issued": issued,
        "valueQuantity": {"value": round(finding.probability, 4), "unit": "probability",
                          "system": UCUM, "code": "1"},
        "interpretation": [{"coding": [{
            "system": INTERPRETATION, "code": "POS" if positive else "NEG",
            "display": "Positive" if positive else "Negative"}]}],
        "referenceRange": [{"high": {"value": finding.threshold, "system": UCUM, "code": "1"},
                            "text": "below the model's threshold: negative"}],
        "device": {"reference": f"#{device['id']}", "type": "Device",
                   "display": f"{finding.model} {finding.model_version}"},
    }


def _conclusion(item: WorklistItem) -> str:
    positive = [f.meaning for f in item.findings if f.positive]
    found = ", ".join(positive) if positive else "no finding"
    return (f"AI triage, {item.priority.value} priority: {found}. Preliminary, not verified "
            "by a radiologist.")


def _check(report: dict[str, Any]) -> None:
    """What fhir.resources does not enforce: the preliminary status of the report and its
    observations, absolute URIs as systems, valid OIDs as DICOM UIDs."""
    if report.get("status") != PRELIMINARY:
        raise ValueError("the report must be preliminary")
    for resource in report.get("contained", []):
        if resource["resourceType"] == "Observation" and resource.get("status") != PRELIMINARY:
            raise ValueError("every observation must be preliminary")
    for node in _nodes(report):
        system = node.get("system")
        if isinstance(system, str) and not _URI.match(system):
            raise ValueError("a coding or identifier system is not an absolute URI")
        if system == DICOM_UID and not (
                str(node.get("value", "")).startswith("urn:oid:")
                and _OID.match(str(node["value"])[len("urn:oid:"):])):
            raise ValueError("a DICOM UID is not a valid urn:oid")
    if "id" in report and not _ID.match(report["id"]):
        raise ValueError("not a valid FHIR id")


def _nodes(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        return [data, *(n for value in data.values() for n in _nodes(value))]
    if isinstance(data, list):
        return [n for value in data for n in _nodes(value)]
    return []


# -- sending ---------------------------------------------------------------------------------

def deliver_fhir(study_uid: str, sr_uid: str, destination_name: str) -> str:
    """RQ job: write the result ``sr_uid`` of the study to a FHIR server, once (conditional
    create on the SR's identifier, or PUT on the id derived from it)."""
    from triage.jobs import context

    ctx = context()
    destination = configured(ctx.settings.fhir_destinations, destination_name, "FHIR destination")

    def send() -> None:
        item = current_result(ctx.worklist, study_uid, sr_uid)
        try:
            report = diagnostic_report(ctx.settings, destination, item)
        except ValidationError as exc:  # its message would quote the values
            raise PermanentError(f"the result cannot be written as a FHIR "
                                 f"{destination.fhir_version} DiagnosticReport "
                                 f"({exc.error_count()} invalid values)") from exc
        except ValueError as exc:
            raise PermanentError(f"the result cannot be written as a FHIR "
                                 f"{destination.fhir_version} DiagnosticReport: {exc}") from exc
        write(destination, report, private=private_values(item))

    return _attempt(study_uid, sr_uid, destination_name, send, kind="fhir")


def write(destination: FhirDestination, report: dict[str, Any],
          private: list[str] | None = None) -> None:
    """One request that writes ``report`` on the server (never twice: see the module)."""
    base = destination.base_url.rstrip("/")
    headers = {"Content-Type": MEDIA_TYPE, "Accept": MEDIA_TYPE}
    if destination.token:
        headers["Authorization"] = f"Bearer {destination.token}"
    if destination.method == "put":
        method, url = "PUT", f"{base}/DiagnosticReport/{report['id']}"
    else:
        [identifier] = report["identifier"]
        method, url = "POST", f"{base}/DiagnosticReport"
        headers["If-None-Exist"] = f"identifier={identifier['system']}|{identifier['value']}"
    try:
        response = httpx.request(method, url, json=report, headers=headers,
                                 timeout=destination.timeout_seconds)
    except httpx.TransportError as exc:
        problem = "timed out" if isinstance(exc, httpx.TimeoutException) else (
            "connection failed")
        raise TransientError(f"{destination.name} unreachable: {problem}") from exc
    status = response.status_code
    if status >= 500 or status in (408, 429):
        raise TransientError(f"{destination.name} answered {status}")
    if status >= 400:
        reason = cleared(_outcome(response), [*(private or []), destination.token or ""])
        raise PermanentError(f"{destination.name} refused the report ({status})"
                             + (f": {reason}" if reason else ""))
    if status >= 300:
        raise PermanentError(f"{destination.name} answered {status}")


def _outcome(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome answer, if any."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    return "; ".join(str(i.get("diagnostics") or i.get("code") or "")
                     for i in body.get("issue", []) if isinstance(i, dict))
