"""The radiologist's workflow: filters, stable pages, claims, reading, feedback, live events,
and late instances superseding an earlier result."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Servers
from tests.senders import storescu
from tests.test_api import auth, make_item
from tests.test_pipeline import SAMPLE, our_srs, watch_until
from tests.validators import dciodvfy_errors, dsrdump
from triage.api.app import create_app
from triage.priority import PriorityClass
from triage.samples import build_sample
from triage.tokens import Role, create_token
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.workflow import FEEDBACK_LOG_KEY, claim
from triage.worklist import (
    ResultItem,
    StudyStatus,
    Worklist,
    WorklistQuery,
    utcnow,
)

pytestmark = pytest.mark.servers


@pytest.fixture
def client(clean_servers: Servers) -> TestClient:
    return TestClient(create_app(clean_servers.settings))


def seed(worklist: Worklist) -> None:
    """Six studies with different status, class, modality, model, finding and age."""
    for n, priority, age, status, modality in [
        (1, PriorityClass.CRITICAL, 5, StudyStatus.ANALYSED, "CT"),
        (2, PriorityClass.ROUTINE, 50, StudyStatus.ANALYSED, "CT"),
        (3, PriorityClass.ROUTINE, 20, StudyStatus.SKIPPED, "MR"),
        (4, PriorityClass.URGENT, 10, StudyStatus.QUEUED, "CR"),
        (5, PriorityClass.ROUTINE, 3000, StudyStatus.FAILED, "CT"),
        (6, PriorityClass.CRITICAL, 1, StudyStatus.ANALYSED, "CT/SR"),
    ]:
        item = make_item(n, priority, age).model_copy(update={"status": status,
                                                              "modality": modality})
        if status is StudyStatus.ANALYSED:
            item = item.model_copy(update={"results": [ResultItem(
                model="head-ct-hyperdensity", model_version="1.0.0", model_name="Head CT",
                weights_sha256="0" * 64, regulatory_status="research-use-only",
                series_instance_uid="1.2", n_instances=1)]})
        worklist.put(item)


def uids(page: dict) -> list[str]:
    return [i["study_instance_uid"] for i in page["items"]]


def test_filters_and_counts(client: TestClient, clean_servers: Servers) -> None:
    seed(Worklist(clean_servers.redis))
    headers = auth(clean_servers)

    def get(**params: str) -> dict:
        response = client.get("/api/v1/worklist", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    everything = get()
    assert everything["counts"] == {"critical": 2, "urgent": 1, "routine": 3}
    assert uids(get(status="analysed")) == ["1.2.3.1", "1.2.3.6", "1.2.3.2"]
    assert uids(get(priority="routine")) == ["1.2.3.5", "1.2.3.2", "1.2.3.3"]
    assert get(priority="routine")["total"] == 3
    assert uids(get(modality="SR")) == ["1.2.3.6"]
    assert uids(get(modality="CT", status="analysed", priority="critical")) == [
        "1.2.3.1", "1.2.3.6"]
    assert uids(get(model="head-ct-hyperdensity")) == ["1.2.3.1", "1.2.3.6", "1.2.3.2"]
    assert uids(get(finding="1386000")) == ["1.2.3.1", "1.2.3.6"]
    since = (utcnow() - timedelta(minutes=15)).isoformat()
    recent = get(received_from=since)
    assert uids(recent) == ["1.2.3.1", "1.2.3.6", "1.2.3.4"]
    assert recent["counts"] == {"critical": 2, "urgent": 1, "routine": 0}
    until = (utcnow() - timedelta(minutes=30)).isoformat()
    assert uids(get(received_to=until)) == ["1.2.3.5", "1.2.3.2"]
    assert client.get("/api/v1/worklist", params={"status": "bogus"},
                      headers=headers).status_code == 422


def test_pages_are_stable_when_arrivals_tie(clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    arrival = utcnow()
    for n in range(25):
        worklist.put(make_item(n, PriorityClass.ROUTINE, 0).model_copy(
            update={"received_at": arrival}))
    whole = [i.study_instance_uid for i in worklist.query(WorklistQuery(), limit=100).items]
    paged = []
    for offset in range(0, 25, 7):
        for _ in range(2):  # the same page twice gives the same items
            page = worklist.query(WorklistQuery(), limit=7, offset=offset).items
        paged += [i.study_instance_uid for i in page]
    assert paged == whole and len(set(paged)) == 25


def test_claims_conflict_release_expiry_and_read(client: TestClient,
                                                 clean_servers: Servers) -> None:
    worklist = Worklist(clean_servers.redis)
    worklist.put(make_item(1, PriorityClass.URGENT, 5))
    alice = {"Authorization": f"Bearer {create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner='alice')}"}  # noqa: E501
    bob = {"Authorization": f"Bearer {create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner='bob')}"}  # noqa: E501
    base = "/api/v1/studies/1.2.3.1"

    taken = client.post(f"{base}/claim", headers=alice)
    assert taken.status_code == 200 and taken.json()["claimed_by"] == "alice"
    assert client.post(f"{base}/claim", headers=bob).status_code == 409
    assert client.post(f"{base}/release", headers=bob).status_code == 409
    assert client.post(f"{base}/read", headers=bob).status_code == 409
    mine = client.get("/api/v1/worklist", params={"claimed_by": "alice"}, headers=alice)
    assert uids(mine.json()) == ["1.2.3.1"]
    assert client.post(f"{base}/claim", headers=alice).status_code == 200  # renew
    released = client.post(f"{base}/release", headers=alice)
    assert released.status_code == 200 and released.json()["claimed_by"] is None
    assert client.post(f"{base}/claim", headers=bob).json()["claimed_by"] == "bob"
    assert client.post("/api/v1/studies/9.9.9/claim", headers=bob).status_code == 404

    # A claim ends on its own: one taken 31 minutes ago with a 30-minute lease is free.
    worklist.put(make_item(2, PriorityClass.ROUTINE, 5))
    claim(worklist, "1.2.3.2", "carol", minutes=30, now=utcnow() - timedelta(minutes=31))
    assert client.post("/api/v1/studies/1.2.3.2/claim", headers=alice).status_code == 200

    read = client.post(f"{base}/read", headers=bob)
    assert read.status_code == 200
    assert read.json()["read_by"] == "bob" and read.json()["claimed_by"] is None
    unread = client.get("/api/v1/worklist", params={"read": "false"}, headers=bob).json()
    assert uids(unread) == ["1.2.3.2"]


def test_feedback_is_stored_and_returned(client: TestClient, clean_servers: Servers) -> None:
    Worklist(clean_servers.redis).put(make_item(1, PriorityClass.CRITICAL, 5))
    headers = auth(clean_servers)
    body = {"findings": [{"model": "head-ct-hyperdensity", "model_version": "1.0.0",
                          "code": "1386000", "agree": False}],
            "outcomes": {"1386000": False}}
    created = client.post("/api/v1/studies/1.2.3.1/feedback", json=body, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["user"] == "test-radiologist"
    detail = client.get("/api/v1/studies/1.2.3.1", headers=headers).json()
    assert detail["feedback"][0]["findings"][0]["agree"] is False
    assert detail["feedback"][0]["outcomes"] == {"1386000": False}
    assert detail["viewer_url"].endswith("#study?uuid=id-1")
    logged = [json.loads(r) for r in clean_servers.redis.lrange(FEEDBACK_LOG_KEY, 0, -1)]
    assert logged[0]["study_instance_uid"] == "1.2.3.1"
    wrong = {"findings": [{"model": "other", "model_version": "1", "code": "1",
                           "agree": True}]}
    refused = client.post("/api/v1/studies/1.2.3.1/feedback", json=wrong, headers=headers)
    assert refused.status_code == 422


def test_live_events_reach_an_http_client(live_api: str, clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="viewer")
    worklist = Worklist(clean_servers.redis)
    received: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{live_api}/api/v1/worklist/events",
                      headers={"Authorization": f"Bearer {token}"}, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == ": connected"
        worklist.put(make_item(1, PriorityClass.ROUTINE, 1), event="queued")
        claim(worklist, "1.2.3.1", "viewer", minutes=5)
        event = ""
        for line in lines:
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((event, json.loads(line.removeprefix("data: "))))
            if len(received) == 2:
                break
    assert [e for e, _ in received] == ["queued", "claim"]
    assert all(d["study_instance_uid"] == "1.2.3.1" for _, d in received)
    unauthorised = httpx.get(f"{live_api}/api/v1/worklist/events", timeout=5)
    assert unauthorised.status_code == 401
    in_url = httpx.get(f"{live_api}/api/v1/worklist/events",
                       params={"access_token": token}, timeout=5)
    assert in_url.status_code == 401  # tokens in URLs end up in access logs


def _events(lines: Iterator[str], count: int) -> list[tuple[str, str, dict]]:
    """The next ``count`` events of a stream as (id, event, data)."""
    found: list[tuple[str, str, dict]] = []
    event_id = event = ""
    for line in lines:
        if line.startswith("id: "):
            event_id = line.removeprefix("id: ")
        elif line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            found.append((event_id, event, json.loads(line.removeprefix("data: "))))
            if len(found) == count:
                break
    return found


def test_live_events_resume_after_the_last_event_id(live_api: str,
                                                    clean_servers: Servers) -> None:
    token = create_token(clean_servers.redis, role=Role.RADIOLOGIST, owner="viewer")
    headers = {"Authorization": f"Bearer {token}"}
    worklist = Worklist(clean_servers.redis)
    with httpx.stream("GET", f"{live_api}/api/v1/worklist/events", headers=headers,
                      timeout=20) as response:
        lines = response.iter_lines()
        assert next(lines) == ": connected"
        worklist.put(make_item(1, PriorityClass.ROUTINE, 1), event="queued")
        [(seen, _, _)] = _events(lines, 1)
    # Changes made while the client was away come first when it reconnects.
    worklist.put(make_item(2, PriorityClass.URGENT, 2), event="queued")
    claim(worklist, "1.2.3.1", "viewer", minutes=5)
    with httpx.stream("GET", f"{live_api}/api/v1/worklist/events",
                      headers={**headers, "Last-Event-ID": seen}, timeout=20) as response:
        missed = _events(response.iter_lines(), 2)
    assert [(e, d["study_instance_uid"]) for _, e, d in missed] == [
        ("queued", "1.2.3.2"), ("claim", "1.2.3.1")]
    # An id older than what is kept, or not an id at all: the client must fetch again.
    clean_servers.redis.xtrim("triage:events:stream", maxlen=1, approximate=False)
    for stale in (seen, "not-an-id"):
        with httpx.stream("GET", f"{live_api}/api/v1/worklist/events",
                          headers={**headers, "Last-Event-ID": stale}, timeout=20) as response:
            [(_, event, _)] = _events(response.iter_lines(), 1)
        assert event == "reset"


def test_late_instance_reanalysis_supersedes_the_sr(clean_servers: Servers,
                                                    tmp_path: Path) -> None:
    servers = clean_servers
    slices = list(build_sample(SAMPLE["head-ct-normal"]))
    paths = []
    for ds in slices:
        path = tmp_path / f"{ds.InstanceNumber:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(servers.settings, paths[:-1])
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    watch_until(servers, watcher, 1)
    run_worker(burst=True)
    [first] = Worklist(servers.redis).page()[0]
    assert first.status is StudyStatus.ANALYSED
    assert first.results[0].n_instances == len(slices) - 1

    storescu(servers.settings, paths[-1:])  # the last slice arrives late
    servers.wait_until(lambda: watcher.poll_once() == 1, timeout=20, what="re-analysis queued")
    run_worker(burst=True)
    latest = Worklist(servers.redis).get(first.study_instance_uid)
    assert latest is not None and latest.status is StudyStatus.ANALYSED
    assert latest.results[0].n_instances == len(slices)
    assert latest.sr_sop_instance_uid != first.sr_sop_instance_uid
    assert latest.received_at == first.received_at

    srs = {}
    for instance in our_srs(servers, latest):
        ds = pydicom.dcmread(io.BytesIO(servers.orthanc.instance_file(instance)))
        srs[ds.SOPInstanceUID] = (instance, ds)
    assert set(srs) == {first.sr_sop_instance_uid, latest.sr_sop_instance_uid}
    new = srs[latest.sr_sop_instance_uid][1]
    referenced = [ref.ReferencedSOPInstanceUID
                  for study in new.PredecessorDocumentsSequence
                  for series in study.ReferencedSeriesSequence
                  for ref in series.ReferencedSOPSequence]
    assert referenced == [first.sr_sop_instance_uid]
    path = tmp_path / "superseding.dcm"
    path.write_bytes(servers.orthanc.instance_file(srs[latest.sr_sop_instance_uid][0]))
    assert dciodvfy_errors(path) == []
    dsrdump(path)
