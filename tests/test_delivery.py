"""Results travel back: the SR and key image to a real DICOM receiver acting as the PACS,
exactly once even when it is down for a while; critical results page a webhook once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pydicom
import pytest

from tests.conftest import Servers, free_port
from tests.senders import storescu
from tests.studies import ct_studies
from tests.test_pipeline import watch_until, write_study
from tests.validators import dciodvfy_errors, dsrdump
from triage import jobs
from triage.servers import ManagedProcess
from triage.watcher import Watcher
from triage.workers import run_worker
from triage.worklist import DeliveryStatus, Worklist

pytestmark = pytest.mark.servers
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class Receiver:
    """dcmtk storescp as the hospital PACS, writing every object it gets to a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "storescp", ["storescp", "-aet", "PACS", "-pm", "+xa", "+uf", "-od", str(folder),
                         str(self.port)], folder.parent / f"storescp-{self.port}.log",
            env={"TCP_NODELAY": "1"})

    def start(self) -> None:
        """Start storescp and wait until it accepts associations' connections."""
        self.process.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or not self.process.alive():
                    raise
                time.sleep(0.02)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]


class Pager:
    """A webhook receiver that records every POST."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                pager.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/page"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def pacs(tmp_path: Path, clean_servers: Servers):
    receiver = Receiver(tmp_path / "pacs")
    pager = Pager()
    os.environ["TRIAGE_DESTINATIONS"] = json.dumps([{
        "name": "pacs", "aet": "PACS", "host": "127.0.0.1", "port": receiver.port,
        "send": "all", "key_images": True}])
    os.environ["TRIAGE_WEBHOOKS"] = json.dumps([{"name": "pager", "url": pager.url,
                                                 "on": "critical"}])
    os.environ["TRIAGE_DELIVERY_RETRY_SECONDS"] = "[1]"
    jobs.context.cache_clear()
    yield receiver, pager
    receiver.process.stop()
    pager.server.shutdown()
    for name in ("TRIAGE_DESTINATIONS", "TRIAGE_WEBHOOKS", "TRIAGE_DELIVERY_RETRY_SECONDS"):
        del os.environ[name]
    jobs.context.cache_clear()


def test_sr_and_key_image_reach_the_pacs_and_critical_results_page_once(
        pacs, clean_servers: Servers, tmp_path: Path) -> None:
    receiver, pager = pacs
    receiver.start()
    servers = clean_servers
    storescu(servers.settings, write_study(tmp_path / "p", "head-ct-hyperdense")
             + write_study(tmp_path / "n", "head-ct-normal"))
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 2)
    run_worker(burst=True)  # analyses, then runs the deliveries it queued

    items = {i.patient_name: i for i in Worklist(servers.redis).page()[0]}
    for item in items.values():
        assert [(d.target, d.status) for d in item.deliveries if d.kind == "dicom"] == [
            ("pacs", DeliveryStatus.DELIVERED)]
    received = receiver.received()
    by_class = Counter(str(ds.SOPClassUID) for ds in received)
    assert by_class == {SR_CLASS: 2, SC_CLASS: 1}  # key image for the positive study only
    for ds in received:
        path = next(p for p in receiver.folder.iterdir()
                    if pydicom.dcmread(p).SOPInstanceUID == ds.SOPInstanceUID)
        if str(ds.SOPClassUID) == SR_CLASS:
            assert ds.StudyInstanceUID in {i.study_instance_uid for i in items.values()}
            assert "Intracranial hemorrhage" in dsrdump(path)
        else:
            assert ds.StudyInstanceUID == items["DEMO^HEADCT PHANTOM"].study_instance_uid
            assert ds.BurnedInAnnotation == "YES"
            assert dciodvfy_errors(path) == []

    assert len(pager.bodies) == 1  # one critical study, one notification
    message = json.loads(pager.bodies[0])
    positive = items["DEMO^HEADCT PHANTOM"]
    assert message["accession_number"] == positive.accession_number
    assert message["priority"] == "critical" and message["findings"][0]["code"] == "1386000"
    text = pager.bodies[0].decode()
    assert "DEMO^HEADCT" not in text and positive.patient_id not in text
    assert positive.study_instance_uid not in message["study_key"]


def test_a_pacs_down_for_a_while_gets_every_result_exactly_once(
        pacs, clean_servers: Servers, tmp_path: Path) -> None:
    receiver, _pager = pacs
    servers = clean_servers
    studies = ct_studies(tmp_path, 6, tag="down")
    storescu(servers.settings, [p for s in studies for p in s])
    watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 6)
    worker = ManagedProcess("worker", [sys.executable, "-m", "triage.cli", "worker"],
                            tmp_path / "worker.log", env=dict(os.environ))
    worker.start()
    worklist = Worklist(servers.redis)
    try:
        def attempts() -> list[int]:
            return [d.attempts for i in worklist.page()[0] for d in i.deliveries]

        servers.wait_until(lambda: len(attempts()) == 6 and min(attempts()) >= 2,
                           timeout=90, what="failed delivery attempts while the PACS is down")
        assert all(d.status is DeliveryStatus.PENDING and "C-STORE" in d.last_error
                   for i in worklist.page()[0] for d in i.deliveries)
        receiver.start()  # the PACS is back
        servers.wait_until(lambda: all(d.status is DeliveryStatus.DELIVERED
                                       for i in worklist.page()[0] for d in i.deliveries),
                           timeout=90, what="every result delivered")
    finally:
        worker.stop()
    srs = Counter(str(ds.SOPInstanceUID) for ds in receiver.received())
    expected = {i.sr_sop_instance_uid for i in worklist.page()[0]}
    assert set(srs) == expected and set(srs.values()) == {1}


def test_destination_echo_command(pacs, clean_servers: Servers) -> None:
    receiver, _pager = pacs

    def echo() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "triage.cli", "destinations", "test",
                               "pacs"], env=dict(os.environ), capture_output=True, text=True,
                              timeout=60)

    down = echo()
    assert down.returncode == 1 and "did not answer" in down.stderr
    receiver.start()
    import time

    time.sleep(0.5)
    up = echo()
    assert up.returncode == 0, up.stderr
    assert "answered C-ECHO" in up.stdout
    # The PACS is a destination only: its AE title may not store, query or retrieve here.
    declared = clean_servers.orthanc._api.get_modalities(params={"expand": ""}).json()["pacs"]
    assert declared["AllowEcho"] is True
    for right in ("AllowStore", "AllowFind", "AllowFindWorklist", "AllowGet", "AllowMove"):
        assert declared[right] is False, right


def test_failed_deliveries_are_listed_and_retried_by_an_admin(
        pacs, clean_servers: Servers, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.test_api import auth
    from triage.api.app import create_app
    from triage.tokens import Role

    receiver, _pager = pacs
    servers = clean_servers
    os.environ["TRIAGE_DELIVERY_RETRIES"] = "0"  # fail at the first refusal
    jobs.context.cache_clear()
    try:
        storescu(servers.settings, write_study(tmp_path / "n", "head-ct-normal"))
        watch_until(servers, Watcher(servers.settings, servers.orthanc, servers.redis), 1)
        run_worker(burst=True)
        client = TestClient(create_app(jobs.context().settings))
        admin = auth(servers, Role.ADMIN)
        [failed] = client.get("/api/v1/admin/deliveries", headers=admin).json()
        assert failed["delivery"]["status"] == "failed"
        assert "C-STORE" in failed["delivery"]["last_error"]
        receiver.start()
        retried = client.post("/api/v1/admin/deliveries/retry", headers=admin).json()
        assert len(retried["requeued"]) == 1
        run_worker(burst=True)
    finally:
        del os.environ["TRIAGE_DELIVERY_RETRIES"]
    assert client.get("/api/v1/admin/deliveries", headers=admin).json() == []
    [item] = Worklist(servers.redis).page()[0]
    assert item.deliveries[0].status is DeliveryStatus.DELIVERED
    assert [str(ds.SOPInstanceUID) for ds in receiver.received()] == [item.sr_sop_instance_uid]
