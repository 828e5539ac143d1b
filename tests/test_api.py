"""API: authentication, worklist order and fields, study detail (real Redis)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Servers
from triage.api.app import create_app
from triage.priority import PriorityClass
from triage.tokens import Role, create_token
from triage.worklist import FindingItem, StudyStatus, Worklist, WorklistItem, utcnow

pytestmark = pytest.mark.servers

ITEM_FIELDS = {
    "study_instance_uid", "accession_number", "modality", "study_description", "status",
    "status_reason", "priority", "score", "findings", "received_at", "analysed_at",
    "sr_sop_instance_uid",
}
FINDING_FIELDS = {"code", "scheme", "meaning", "probability", "model", "model_version"}


@pytest.fixture
def client(clean_servers: Servers) -> TestClient:
    return TestClient(create_app(clean_servers.settings))


def auth(servers: Servers, role: Role = Role.RADIOLOGIST) -> dict[str, str]:
    token = create_token(servers.redis, role=role, owner=f"test-{role.value}")
    return {"Authorization": f"Bearer {token}"}


def make_item(n: int, priority: PriorityClass, minutes_ago: float) -> WorklistItem:
    finding = FindingItem(code="1386000", scheme="SCT", meaning="Intracranial hemorrhage",
                          probability=0.9, threshold=0.5, positive=True,
                          priority=PriorityClass.CRITICAL, model="head-ct-hyperdensity",
                          model_version="1.0.0")
    return WorklistItem(
        study_instance_uid=f"1.2.3.{n}", orthanc_id=f"id-{n}", accession_number=f"A{n}",
        modality="CT", study_description="CT HEAD", status=StudyStatus.ANALYSED,
        priority=priority, clinical_priority=PriorityClass.ROUTINE,
        findings=[finding] if priority is PriorityClass.CRITICAL else [],
        received_at=utcnow() - timedelta(minutes=minutes_ago),
    )


def test_health_needs_no_token(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/api/v1/worklist", "/api/v1/studies/1.2.3"])
def test_api_refuses_missing_or_bad_tokens(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    bad = client.get(path, headers={"Authorization": "Bearer trg_not-a-real-token"})
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == "Bearer"


def test_integration_role_may_not_list_patients(client: TestClient, clean_servers: Servers
                                                ) -> None:
    response = client.get("/api/v1/worklist", headers=auth(clean_servers, Role.INTEGRATION))
    assert response.status_code == 403


def test_worklist_orders_by_priority_then_arrival(client: TestClient,
                                                  clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    # (n, class, minutes ago): expected order is critical, urgent, then routine oldest first.
    for n, priority, age in [(1, PriorityClass.ROUTINE, 30), (2, PriorityClass.CRITICAL, 1),
                             (3, PriorityClass.ROUTINE, 60), (4, PriorityClass.URGENT, 5),
                             (5, PriorityClass.CRITICAL, 10)]:
        worklist.put(make_item(n, priority, age))
    response = client.get("/api/v1/worklist", headers=auth(clean_servers))
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 5
    assert [i["study_instance_uid"] for i in body["items"]] == [
        "1.2.3.5", "1.2.3.2", "1.2.3.4", "1.2.3.3", "1.2.3.1"]
    first = body["items"][0]
    assert set(first) >= ITEM_FIELDS
    assert set(first["findings"][0]) >= FINDING_FIELDS
    assert first["priority"] == "critical" and first["status"] == "analysed"

    page = client.get("/api/v1/worklist?limit=2&offset=2", headers=auth(clean_servers)).json()
    assert [i["study_instance_uid"] for i in page["items"]] == ["1.2.3.4", "1.2.3.3"]
    assert page["total"] == 5
    too_many = client.get("/api/v1/worklist?limit=1001", headers=auth(clean_servers))
    assert too_many.status_code == 422


def test_study_detail(client: TestClient, clean_servers: Servers) -> None:
    Worklist(clean_servers.redis).put(make_item(7, PriorityClass.CRITICAL, 2))
    headers = auth(clean_servers, Role.ADMIN)
    detail = client.get("/api/v1/studies/1.2.3.7", headers=headers)
    assert detail.status_code == 200
    assert detail.json()["accession_number"] == "A7"
    assert {"series", "results"} <= set(detail.json())
    assert client.get("/api/v1/studies/9.9.9", headers=headers).status_code == 404


def test_openapi_is_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/api/v1/worklist" in schema["paths"]
    assert client.get("/docs").status_code == 200
