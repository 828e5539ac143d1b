"""`make test-deploy`: the compose stack deploy/README.md tells hospitals to run.

docker-compose.yml is started as it is (no override file) with an .env and a certificate
directory written the way deploy/README.md describes, on the images deploy/build-images.sh
built, with Debian's docker-compose 1.29 against `podman system service`. Studies are sent with
dcmtk's storescu to the published DICOM port from this host's network address (what a modality
on the hospital network does); the state inside (worklist, queues, lease, Orthanc's SRs) is
read from the api container, since Orthanc's REST API, Redis and PostgreSQL are not published.

The tests share one stack and run in file order, each leaving it running for the next.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.deploy.stack import (
    ROOT,
    TERMINAL,
    Engine,
    Stack,
    free_port,
    terminal,
    wait_until,
    write_env,
)
from tests.senders import storescu_as
from tests.studies import ct_studies
from tests.test_dicom_security import Pki, make_pki

pytestmark = [pytest.mark.servers, pytest.mark.timeout(900)]

PROJECT = "triagedeploytest"
RESTORED = "triagedeployrestore"
STABLE_AGE = 2
LEASE_SECONDS = 10  # TRIAGE_WATCHER_LEASE_SECONDS's default: what compose runs
AET = "TRIAGE"
# The senders of the allow-list; the test sends as TESTSCU from this host's address.
LISTED, ELSEWHERE = "TESTSCU", "ELSEWHERE"
RIS_APPLICATION = "DEPLOYRIS"
TLS_CERTS = {"TRIAGE_DICOM_TLS_CERT": "/run/triage/certs/dicom.crt",
             "TRIAGE_DICOM_TLS_KEY": "/run/triage/certs/dicom.key",
             "TRIAGE_DICOM_TLS_TRUSTED": "/run/triage/certs/dicom-trusted.crt"}


def host_address() -> str:
    """This host's address on its network (not loopback, not a container bridge): what a
    sender elsewhere on the network would reach, and what Orthanc then sees as the caller."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for address in out:
        if ":" not in address and not address.startswith(("127.", "10.88.", "10.89.")):
            return address
    raise AssertionError(f"no network address besides loopback and bridges: {out}")


@dataclass
class Site:
    """A hospital's installation: its .env, certificates and running stack."""

    directory: Path
    engine: Engine
    stack: Stack
    env: dict[str, str]
    pki: Pki
    host: str
    dicom_port: int
    https_port: int
    mllp_port: int = 0
    token: str = ""
    sent: int = 0
    # Every stack started, so that teardown stops each one and its healthcheck loop.
    stacks: list[Stack] = field(default_factory=list)

    @property
    def dicom(self) -> SimpleNamespace:
        return SimpleNamespace(orthanc_aet=AET, orthanc_dicom_port=self.dicom_port)

    def studies(self, count: int, tag: str) -> list[list[Path]]:
        self.sent += 1
        made = ct_studies(self.directory / "studies", count, tag=f"{tag}{self.sent}")
        return made

    @staticmethod
    def uids(studies: list[list[Path]]) -> list[str]:
        import pydicom
        return [str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID)
                for s in studies]

    def send(self, studies: list[list[Path]], aet: str = LISTED,
             tls: tuple[Path | None, Path | None, Path] | None = None
             ) -> subprocess.CompletedProcess[str]:
        files = [p for s in studies for p in s]
        return storescu_as(self.dicom, files, aet, tls=tls, host=self.host)

    def send_ok(self, studies: list[list[Path]], **kwargs: Any) -> list[str]:
        """Send as a modality does: an association that hangs is tried again (once seen right
        after `podman kill`, while podman tore down the killed container's network; Orthanc
        keeps one copy of an instance sent twice). Each retry is printed."""
        for attempt in range(3):
            try:
                done = self.send(studies, **kwargs)
                break
            except subprocess.TimeoutExpired:
                print(f"\nstorescu timed out (attempt {attempt + 1}); sending again")
        else:
            raise AssertionError("storescu timed out three times")
        assert done.returncode == 0, done.stderr
        return self.uids(studies)

    def wait_analysed(self, uids: list[str], timeout: float = 240,
                      stack: Stack | None = None) -> list[dict[str, Any]]:
        stack = stack or self.stack
        items = wait_until(lambda: (lambda got: got if terminal(got, uids) else None)(
            stack.probe("worklist")), timeout=timeout, what=f"{len(uids)} studies terminal",
            every=1)
        statuses = {i["study"]: i["status"] for i in items if i["study"] in uids}
        assert set(statuses.values()) == {"analysed"}, statuses
        return list(items)

    def assert_one_sr_each(self, uids: list[str], stack: Stack | None = None) -> None:
        counts = (stack or self.stack).probe("srs")
        assert {uid: counts.get(uid) for uid in uids} == {uid: 1 for uid in uids}

    def api(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"https://localhost:{self.https_port}{path}",
                         verify=ssl.create_default_context(cafile=str(self.pki.ca)),
                         headers={"Authorization": f"Bearer {self.token}"}, timeout=30,
                         **kwargs)

    def leader(self, stack: Stack | None = None) -> tuple[str, str] | None:
        """(hostname, container id) of the watcher holding the lease; None between a lease
        running out and the standby taking it."""
        stack = stack or self.stack
        holder = stack.probe("lease")["holder"]
        if not holder:
            return None
        hostname = holder.split("@", 1)[1].rsplit("-", 2)[0]
        # All states: a paused container is not "running" to `podman ps`.
        for container in stack.containers("watcher", all_states=True):
            if stack.hostname(container) == hostname:
                return hostname, container
        raise AssertionError(f"no watcher container has the leader's hostname {hostname}")

    def other_leader(self, hostname: str) -> tuple[str, str] | None:
        found = self.leader()
        return found if found is not None and found[0] != hostname else None

    def current_leader(self) -> tuple[str, str]:
        return wait_until(self.leader, timeout=LEASE_SECONDS + 15, what="a leading watcher")

    def crash(self, container: str) -> None:
        """Kill the container's main process from the host, as the kernel's OOM killer does:
        the engine sees it die, and restarts it (restart: unless-stopped)."""
        pid = int(self.stack.inspect(container)["State"]["Pid"])
        os.kill(pid, signal.SIGKILL)


def _certificates(directory: Path) -> tuple[Path, Pki]:
    """The certificate directory deploy/README.md describes, from a test CA: api.crt/api.key
    for HTTPS, dicom.crt/dicom.key/dicom-trusted.crt for DICOM TLS, each key readable by the
    uid of the container that uses it."""
    (directory / "pki").mkdir()
    pki = make_pki(directory / "pki")
    certs = directory / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    key, cert = pki.server
    for name, uid in (("api", 10001), ("dicom", 10101)):
        shutil.copy(cert, certs / f"{name}.crt")
        shutil.copy(key, certs / f"{name}.key")
        os.chown(certs / f"{name}.key", uid, uid)
        (certs / f"{name}.key").chmod(0o400)
        (certs / f"{name}.crt").chmod(0o644)
    shutil.copy(pki.ca, certs / "dicom-trusted.crt")
    (certs / "dicom-trusted.crt").chmod(0o644)
    return certs, pki


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("deploy")
    (directory / "studies").mkdir()
    certs, pki = _certificates(directory)
    host = host_address()
    dicom_port, https_port, mllp_port = free_port(), free_port(), free_port()
    env = {
        "TRIAGE_ORTHANC_PASSWORD": secrets.token_urlsafe(32),
        "TRIAGE_REDIS_PASSWORD": secrets.token_urlsafe(32),
        "TRIAGE_POSTGRES_PASSWORD": secrets.token_urlsafe(32),
        "TRIAGE_DATABASE_PASSWORD": secrets.token_urlsafe(32),
        "TRIAGE_VIGILANCE_EXPORT_KEY": secrets.token_urlsafe(32),
        "TRIAGE_CERTS_DIR": str(certs),
        "TRIAGE_DICOM_PORT": str(dicom_port),
        "TRIAGE_HTTPS_PORT": str(https_port),
        "TRIAGE_MLLP_PORT": str(mllp_port),
        # Orders from the RIS named by its MSH-3 (behind the published port, the listener
        # may see the bridge's address rather than the sender's).
        "TRIAGE_RIS_SENDERS": json.dumps([{"name": "ris", "application": RIS_APPLICATION}]),
        "TRIAGE_PUBLIC_URL": f"https://localhost:{https_port}",
        "TRIAGE_STABLE_AGE": str(STABLE_AGE),
        # Behind rootful podman's (and Docker's) port forwarding, Orthanc sees a remote
        # sender's own address: the allow-list checks it.
        "TRIAGE_DICOM_SENDERS": json.dumps([
            {"name": "testscu", "aet": LISTED, "host": host},
            {"name": "elsewhere", "aet": ELSEWHERE, "host": "192.0.2.250"}]),
    }
    env_file = directory / ".env"
    write_env(env_file, env)
    engine = Engine(directory)
    engine.start()
    stack = Stack(engine, PROJECT, env_file)
    running = Site(directory, engine, stack, env, pki, host, dicom_port, https_port,
                   mllp_port)
    try:
        started = time.monotonic()
        stack.up(workers=3)
        print(f"\nstack up and healthy in {time.monotonic() - started:.0f} s")
        running.token = stack.exec("api", "triage", "token", "create", "--role", "admin",
                                   "--owner", "deploy-test").decode().strip().splitlines()[-1]
        yield running
    finally:
        started = {s.project: s for s in [stack, *running.stacks]}
        for project in (PROJECT, RESTORED):
            started.get(project, Stack(engine, project, env_file)).down("-v")
        engine.stop()


def _api_worklist(site: Site) -> list[tuple[str, str, str]]:
    response = site.api("/api/v1/worklist", params={"limit": 200})
    assert response.status_code == 200, response.text
    return [(i["study_instance_uid"], i["status"], i["priority"])
            for i in response.json()["items"]]


# -- the tests, in order ---------------------------------------------------------------------

def test_every_service_is_healthy_non_root_and_only_dicom_and_https_published(
        site: Site) -> None:
    stack = site.stack
    expected_users = {"postgres": "10102", "orthanc": "10101", "redis": "10103",
                      "api": "10001", "worker": "10001", "watcher": "10001",
                      "ris-listener": "10001"}
    published = {"orthanc": {4242}, "api": {8443}, "ris-listener": {2575}}
    for service, uid in expected_users.items():
        containers = stack.containers(service)
        assert containers, service
        for container in containers:
            assert stack.health(container) == "healthy", service
            assert stack.inspect(container)["Config"]["User"].split(":")[0] == uid, service
            assert stack.published_ports(container) == published.get(service, set()), service
    assert len(stack.containers("worker")) == 3
    assert len(stack.containers("watcher")) == 2


def test_studies_sent_with_storescu_are_analysed_with_index_in_postgresql(site: Site) -> None:
    uids = site.send_ok(site.studies(3, "first"))
    items = site.wait_analysed(uids)
    site.assert_one_sr_each(uids)
    # Orthanc's index lives in PostgreSQL: its Resources table holds the studies (type 1).
    in_postgres = set(site.stack.psql("SELECT publicid FROM resources WHERE resourcetype = 1"))
    orthanc_ids = {i["orthanc_id"] for i in items if i["study"] in uids}
    assert orthanc_ids <= in_postgres
    # The vigilance record of each analysis, in the "triage" database (moved there from the
    # workers' outbox after each study).
    wait_until(lambda: set(_recorded(site.stack)) >= set(uids), timeout=60,
               what="the analyses recorded in PostgreSQL")


def test_a_stat_order_from_the_ris_makes_a_routine_study_urgent(site: Site) -> None:
    """The RIS sends the order (HL7 v2.3 ORM^O01 over MLLP to the published port) before the
    modality sends the images."""
    import pydicom
    from hl7.client import MLLPClient

    studies = site.studies(1, "ordered")
    ds = pydicom.dcmread(studies[0][0], stop_before_pixels=True)
    order = "\r".join([
        f"MSH|^~\\&|{RIS_APPLICATION}|RADIOLOGY|TRIAGE|HOSPITAL|20261130101500||ORM^O01|"
        "DEPLOY1|P|2.3",
        f"PID|1||{ds.PatientID}||{ds.PatientName}",
        "PV1|1|O|CLINIC",
        "ORC|NW|DP1|DF1||SC||^^^^^S",
        "|".join(["OBR", "1", "DP1", "DF1", "CTHEAD^CT head^L", *[""] * 13,
                  str(ds.AccessionNumber)]),
    ])
    with MLLPClient(site.host, site.mllp_port) as client:
        client.socket.settimeout(30)
        ack = client.send_message(order)
    assert "MSA|AA|DEPLOY1" in ack.decode(), ack
    [uid] = site.send_ok(studies)
    site.wait_analysed([uid])
    response = site.api(f"/api/v1/studies/{uid}")
    assert response.status_code == 200, response.text
    item = response.json()
    assert item["clinical_priority"] == "urgent"
    assert "clinical: STAT order (RIS)" in item["priority_reasons"]
    assert [o["placer_order_number"] for o in item["orders"]] == ["DP1"]


def _recorded(stack: Stack) -> list[str]:
    return stack.psql("SELECT study_uid FROM analyses WHERE role = 'active'", "triage")


def test_the_api_answers_over_https_only_with_the_hospitals_certificate(site: Site) -> None:
    response = site.api("/api/v1/worklist")
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) >= 3
    # The certificate served is the one placed in the certificate directory.
    served = ssl.get_server_certificate(("127.0.0.1", site.https_port))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(
        (site.directory / "certs" / "api.crt").read_text())
    # Without the hospital's CA the certificate is not trusted; plain HTTP gets no answer.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://localhost:{site.https_port}/healthz", timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{site.https_port}/healthz", timeout=10)


def test_senders_off_the_allow_list_are_refused_and_logged_without_patient_data(
        site: Site) -> None:
    studies = site.studies(2, "refused")
    names = [f"BATCH^REFUSED{site.sent}{n}" for n in range(2)]
    unknown = site.send(studies[:1], aet="INTRUDER")
    wrong_host = site.send(studies[1:], aet=ELSEWHERE)  # listed, but for another address
    for refused in (unknown, wrong_host):
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr, refused.stderr
    log = site.stack.logs(site.stack.container("orthanc"))
    assert f"Rejected association for remote AET INTRUDER on IP {site.host}" in log
    assert f"Rejected association for remote AET {ELSEWHERE} on IP {site.host}" in log
    assert not any(name in log or name.replace("^", " ") in log for name in names)
    time.sleep(STABLE_AGE + 2)
    on_list = {i["study"] for i in site.stack.probe("worklist")}
    assert not set(site.uids(studies)) & on_list


def test_a_worker_container_killed_mid_batch_loses_no_study(site: Site) -> None:
    stack = site.stack
    # Each worker's main process, found before the batch: the kill then follows the probe
    # that chose the victim at once (with images scored as they arrive, the analyses at
    # stability of small studies take a few tens of milliseconds each).
    containers = stack.containers("worker")
    victims = {stack.hostname(c): int(stack.inspect(c)["State"]["Pid"]) for c in containers}
    # The workers are paused while the batch arrives, so that the whole batch is queued when
    # they resume (the small studies of a batch otherwise finish as fast as they arrive, and
    # whether half of them still waited at the kill depended on the sending's pace).
    for container in containers:
        site.engine.podman("pause", container)
    try:
        uids = site.send_ok(site.studies(48, "batch"))
        wait_until(lambda: sum(i["study"] in uids and i["status"] == "queued"
                               for i in stack.probe("worklist")) == len(uids),
                   timeout=60, what="the whole batch queued")
    finally:
        for container in containers:
            site.engine.podman("unpause", container)

    def busy_worker() -> str | None:
        # A worker analysing a study of the batch while enough of the batch is left that it
        # is still under way once the kill lands (a probe takes a few tenths of a second);
        # not one running the hourly vigilance check, a delivery or a streaming batch.
        state = stack.probe("progress")
        if len(set(state["pending"]) & set(uids)) < len(uids) // 2:
            return None
        return next((w["hostname"] for w in state["workers"]
                     if str(w["job"] or "").startswith("analyse-")), None)

    hostname = wait_until(busy_worker, timeout=60, what="a worker analysing a study early "
                          "in the batch", every=0.1)
    # As the kernel's OOM killer does (``Site.crash``): the engine restarts the container.
    os.kill(victims[hostname], signal.SIGKILL)
    pending = [i for i in stack.probe("worklist")
               if i["study"] in uids and i["status"] not in TERMINAL]
    assert pending, "the batch was finished before the kill: not mid-batch"
    site.wait_analysed(uids, timeout=300)
    site.assert_one_sr_each(uids)
    # The killed container came back (restart policy) and is healthy again.
    stack.wait_healthy(workers=3)


def test_down_then_up_keeps_the_worklist_and_the_studies(site: Site) -> None:
    stack = site.stack
    before = sorted(map(json.dumps, stack.probe("worklist")))
    srs_before = stack.probe("srs")
    stack.down()
    assert not stack.containers("api", all_states=True)
    stack.up(workers=3)
    assert sorted(map(json.dumps, stack.probe("worklist"))) == before
    assert stack.probe("srs") == srs_before
    assert site.api("/api/v1/worklist").status_code == 200  # tokens live in Redis too


def test_the_standby_watcher_takes_over_when_the_leaders_container_is_killed(
        site: Site) -> None:
    hostname, container = site.current_leader()
    # Killed for good (`kill`: the engine does not restart it), so that only the standby
    # can take the lease; a crashed container that comes back may win it back instead.
    site.engine.podman("kill", container)
    killed = datetime.now(UTC)
    uids = site.send_ok(site.studies(3, "leaderkill"))
    successor = wait_until(lambda: site.other_leader(hostname), timeout=60,
                           what="another watcher leading")
    assert successor[1] != container
    # When it took over, by its own log (container clocks are the host's).
    took = _led_since(site.stack.logs(successor[1])) - killed
    print(f"\nleader killed: the standby led {took.total_seconds():.1f} s later")
    assert took.total_seconds() < LEASE_SECONDS + LEASE_SECONDS / 3 + 2
    site.wait_analysed(uids)
    site.assert_one_sr_each(uids)
    site.engine.podman("start", container)
    site.stack.wait_healthy(workers=3)


def _led_since(log: str) -> datetime:
    """The time of the last "leading" line of a watcher's log."""
    line = [line for line in log.splitlines() if "INFO triage.watcher: leading (" in line][-1]
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)


def test_a_leader_paused_past_its_lease_neither_queues_twice_nor_moves_the_cursor_back(
        site: Site) -> None:
    stack = site.stack
    # No workers for a while: what the watchers queue stays on the queues to be counted.
    stack.compose("up", "-d", "--scale", "worker=0")
    wait_until(lambda: not stack.containers("worker"), timeout=120, what="workers stopped")
    errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
    sampler = stack.cursor_sampler(errors)
    try:
        hostname, container = site.current_leader()
        first = site.send_ok(site.studies(3, "pausea"))
        time.sleep(0.5)  # their arrivals noted, the studies not yet complete
        site.engine.podman("pause", container)
        paused = time.monotonic()
        try:
            wait_until(lambda: site.other_leader(hostname), timeout=LEASE_SECONDS + 15,
                       what="the standby leading")
            print(f"\nleader paused: the standby led after {time.monotonic() - paused:.1f} s")
            second = site.send_ok(site.studies(3, "pauseb"))
            wait_until(lambda: {i["study"] for i in stack.probe("worklist")} >= {*first,
                                                                                  *second},
                       timeout=60, what="the six studies queued")
        finally:
            site.engine.podman("unpause", container)
        wait_until(lambda: "standby (watcher" in stack.logs(container).split(
            "leading (watcher")[-1], timeout=30, what="the old leader stepping down")
        time.sleep(STABLE_AGE + 3)
        assert site.other_leader(hostname)
        items = {i["study"]: i for i in stack.probe("worklist")}
        queues = stack.probe("queues")
    finally:
        sampler.kill()
        assert sampler.stdout is not None
        out = sampler.stdout.read()
        sampler.wait(30)
    on_queues = Counter(job for jobs in queues.values() for job in jobs)
    assert set(on_queues.values()) == {1}, on_queues  # no job queued twice
    assert set(on_queues) == {items[uid]["job"] for uid in [*first, *second]}
    cursors = [int(line) for line in out.split()]
    errors.seek(0)
    said = errors.read()
    errors.close()
    assert len(cursors) > 50, f"the cursor sampler printed {len(cursors)} lines: {said}"
    assert all(a <= b for a, b in zip(cursors, cursors[1:], strict=False)), \
        "the watcher cursor went down"
    stack.compose("up", "-d", "--scale", "worker=3")
    stack.wait_healthy(workers=3)
    site.wait_analysed([*first, *second])
    site.assert_one_sr_each([*first, *second])


def test_dicom_tls_accepts_only_mutually_authenticated_senders(site: Site) -> None:
    stack = site.stack
    site.env.update(TLS_CERTS)
    write_env(stack.env_file, site.env)
    stack.compose("up", "-d", "--scale", "worker=3")  # Orthanc is recreated with TLS on
    stack.wait_healthy(workers=3)
    pki = site.pki
    trusted = site.send_ok(site.studies(1, "tls"), tls=(*pki.client, pki.ca))
    refused = {
        "certificate from an unknown CA": site.send(site.studies(1, "rogue"),
                                                    tls=(*pki.rogue, pki.ca)),
        "no client certificate": site.send(site.studies(1, "anon"), tls=(None, None, pki.ca)),
        "plain DICOM": site.send(site.studies(1, "plain")),
    }
    for case, done in refused.items():
        assert done.returncode != 0, case
    site.wait_analysed(trusted)
    site.assert_one_sr_each(trusted)


def test_a_restore_drill_gives_the_same_worklist_in_a_fresh_stack(site: Site) -> None:
    stack = site.stack
    before = sorted(map(json.dumps, stack.probe("worklist")))
    srs_before = stack.probe("srs")
    api_before = _api_worklist(site)
    recorded_before = sorted(_recorded(stack))
    assert recorded_before
    backup = site.directory / "backup"
    compose = " ".join([*stack.compose_command[:3], "--env-file", str(stack.env_file)])
    env = {**site.engine.env, "COMPOSE": f"{compose} -p {PROJECT}", "ENGINE": "podman"}
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "deploy" / "backup.sh"), str(backup)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(f"\nbackup: {time.monotonic() - started:.0f} s")
    assert sorted(p.name for p in backup.iterdir()) == [
        "SHA256SUMS", "orthanc-storage.tar", "postgres-orthanc.dump", "postgres-triage.dump",
        "redis-aof.tar"]
    stack.down()  # the old server is gone (its volumes are kept until the end of the test)

    restored = Stack(site.engine, RESTORED, stack.env_file)
    site.stacks.append(restored)
    restored.start_health_loop()
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "deploy" / "restore.sh"), str(backup)],
                          env={**env, "COMPOSE": compose, "COMPOSE_PROJECT_NAME": RESTORED},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    restored.up(workers=1)
    print(f"restore and start: {time.monotonic() - started:.0f} s")
    assert sorted(map(json.dumps, restored.probe("worklist"))) == before
    assert restored.probe("srs") == srs_before
    assert sorted(_recorded(restored)) == recorded_before
    assert _api_worklist(site) == api_before
    # The restored stack goes on working.
    uids = site.send_ok(site.studies(1, "restored"), tls=(*site.pki.client, site.pki.ca))
    site.wait_analysed(uids, stack=restored)
    site.assert_one_sr_each(uids, stack=restored)
    # A restore into a stack that already has volumes is refused.
    again = subprocess.run([str(ROOT / "deploy" / "restore.sh"), str(backup)],
                           env={**env, "COMPOSE": compose, "COMPOSE_PROJECT_NAME": RESTORED},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "restore into a stack that never ran" in again.stderr
