"""Preliminary results reach a real HTTP server acting as a FHIR server (conditional create
and PUT, as FHIR servers implement them): one valid preliminary DiagnosticReport per result,
also when a request was stored but its answer lost, in R4 and R5, with the bearer token."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fhir.resources.diagnosticreport import DiagnosticReport as DiagnosticReportR5
from fhir.resources.R4B.diagnosticreport import DiagnosticReport as DiagnosticReportR4B

from tests.test_ris_results import all_delivered, drain, produce, result_item, stack
from triage.ris.fhir import report_id
from triage.workers import run_worker
from triage.worklist import DeliveryStatus, Worklist

pytestmark = pytest.mark.servers
TOKEN = "s3cret-token-of-the-fhir-server"
__all__ = ["stack"]  # the fixture, shared with the HL7 v2 tests


class FhirServer:
    """Stores DiagnosticReports by identifier (conditional create: a POST whose
    If-None-Exist matches a stored report answers 200 and creates nothing) or by id (PUT).
    Each planned failure applies to one request, after the report was stored: ``500``
    (an error answer) or ``drop`` (the connection closed without an answer)."""

    def __init__(self, plan: list[str] | None = None, refuse: int = 0) -> None:
        self.plan = list(plan or [])
        self.refuse = refuse
        self.reports: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fhir = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self._read()
                if self.path != "/fhir/DiagnosticReport":
                    return self._answer(404)
                system, _, value = self.headers["If-None-Exist"].partition("=")[2].partition("|")
                key = f"{system}|{value}"
                with fhir.lock:
                    if key in fhir.reports:
                        return self._answer(200, fhir.reports[key])
                    if fhir.refuse:
                        return self._answer(fhir.refuse, {
                            "resourceType": "OperationOutcome", "issue": [{
                                "severity": "error", "code": "invalid",
                                "diagnostics": f"token {TOKEN} may not write patient "
                                               f"{body['subject']['identifier']['value']}"}]})
                    fhir.reports[key] = body
                self._after_store(201, body)

            def do_PUT(self) -> None:  # noqa: N802 - the http.server API
                body = self._read()
                id_ = self.path.rsplit("/", 1)[-1]
                if not self.path.startswith("/fhir/DiagnosticReport/") or body.get("id") != id_:
                    return self._answer(400)
                with fhir.lock:
                    created = id_ not in fhir.reports
                    fhir.reports[id_] = body
                self._after_store(201 if created else 200, body)

            def _read(self) -> dict[str, Any]:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fhir.lock:
                    fhir.requests.append((self.command, self.path, dict(self.headers)))
                return body

            def _after_store(self, status: int, body: dict[str, Any]) -> None:
                with fhir.lock:
                    failure = fhir.plan.pop(0) if fhir.plan else ""
                if failure == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return None
                return self._answer(500 if failure == "500" else status, body)

            def _answer(self, status: int, body: dict[str, Any] | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def destination(server: FhirServer, version: str, method: str = "conditional-create"
                ) -> list[dict[str, Any]]:
    return [{"name": "ehr", "base_url": server.url, "fhir_version": version, "token": TOKEN,
             "method": method, "timeout_seconds": 2}]


@pytest.fixture
def fhir_server(request: pytest.FixtureRequest) -> Iterator[FhirServer]:
    plan, refuse = getattr(request, "param", ([], 0))
    server = FhirServer(plan, refuse)
    yield server
    server.stop()


@pytest.mark.parametrize("version", ["R4", "R5"])
@pytest.mark.parametrize("fhir_server", [(["500", "drop"], 0)], indirect=True)
def test_one_preliminary_report_per_result_also_when_a_request_is_retried(
        stack, fhir_server: FhirServer, version: str) -> None:
    connection = stack(fhir_destinations=destination(fhir_server, version))
    items = [result_item(n, positive=n != 3) for n in (1, 2, 3)]
    produce(connection, items)
    drain(connection, all_delivered(connection, "fhir"))

    assert len(fhir_server.requests) == 5  # two answers lost: their reports were stored
    assert len(fhir_server.reports) == 3
    model = DiagnosticReportR5 if version == "R5" else DiagnosticReportR4B
    for item in items:
        stored = fhir_server.reports[f"urn:dicom:uid|urn:oid:{item.sr_sop_instance_uid}"]
        report = model.model_validate(stored)
        assert report.status == "preliminary"
        assert stored["subject"]["identifier"]["value"] == item.patient_id
        study = stored["study" if version == "R5" else "imagingStudy"]
        assert study == [{"type": "ImagingStudy", "identifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{item.study_instance_uid}"}}]
        assert stored["basedOn"][0]["identifier"]["value"] == item.accession_number
        assert stored["issued"].endswith(("Z", "+00:00"))
        observations = [r for r in stored["contained"] if r["resourceType"] == "Observation"]
        [finding] = item.findings
        [observation] = observations
        assert stored["result"] == [{"reference": f"#{observation['id']}",
                                     "type": "Observation"}]
        assert observation["status"] == "preliminary"
        assert observation["code"]["coding"][0]["code"] == finding.code
        assert observation["valueQuantity"]["value"] == pytest.approx(finding.probability)
        assert observation["interpretation"][0]["coding"][0]["code"] == (
            "POS" if finding.positive else "NEG")
        [device] = [r for r in stored["contained"] if r["resourceType"] == "Device"]
        assert observation["device"]["reference"] == f"#{device['id']}"
        assert device["version"] == [{"value": finding.model_version}]
    for method, _path, headers in fhir_server.requests:
        assert method == "POST"
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"] == "application/fhir+json"


@pytest.mark.parametrize("fhir_server", [(["500"], 0)], indirect=True)
def test_put_writes_the_report_under_an_id_derived_from_the_result(
        stack, fhir_server: FhirServer) -> None:
    connection = stack(fhir_destinations=destination(fhir_server, "R4", "put"))
    item = result_item(4)
    produce(connection, [item])
    drain(connection, all_delivered(connection, "fhir"))
    assert [(m, p) for m, p, _h in fhir_server.requests] == [
        ("PUT", f"/fhir/DiagnosticReport/{report_id(item.sr_sop_instance_uid or '')}")] * 2
    [(id_, stored)] = fhir_server.reports.items()
    assert DiagnosticReportR4B.model_validate(stored).status == "preliminary"
    assert stored["identifier"] == [{"system": "urn:dicom:uid",
                                     "value": f"urn:oid:{item.sr_sop_instance_uid}"}]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _m, _p, h in fhir_server.requests)


@pytest.mark.parametrize("fhir_server", [([], 422)], indirect=True)
def test_a_refused_report_fails_with_the_reason_and_never_the_token(
        stack, fhir_server: FhirServer, caplog: pytest.LogCaptureFixture) -> None:
    connection = stack(fhir_destinations=destination(fhir_server, "R5"))
    item = result_item(5)
    produce(connection, [item])
    run_worker(burst=True)
    assert len(fhir_server.requests) == 1  # not retried
    [state] = Worklist(connection).get(item.study_instance_uid).deliveries  # type: ignore[union-attr]
    assert state.status is DeliveryStatus.FAILED
    assert "refused the report (422)" in state.last_error and "may not write" in state.last_error
    assert TOKEN not in state.last_error and item.patient_id not in state.last_error
    assert TOKEN not in caplog.text and item.patient_id not in caplog.text


@pytest.mark.parametrize(("issuer", "expected"), [
    ("2.16.840.1.113883.19.5", {"system": "urn:oid:2.16.840.1.113883.19.5"}),
    ("https://hospital.example/patients", {"system": "https://hospital.example/patients"}),
    ("HOSP", {"assigner": {"display": "HOSP"}}),
])
def test_the_issuer_of_the_patient_id_becomes_a_system_only_when_it_is_a_uri(
        issuer: str, expected: dict[str, Any]) -> None:
    from triage.ris.fhir import diagnostic_report
    from triage.settings import FhirDestination, Settings

    item = result_item(6).model_copy(update={"issuer_of_patient_id": issuer})
    report = diagnostic_report(Settings(), FhirDestination(name="ehr",
                                                           base_url="http://127.0.0.1"), item)
    assert report["subject"]["identifier"] == {"value": item.patient_id, **expected}
