"""Orders from the RIS over real MLLP sockets: the listener process (`triage ris-listener`),
a real Orthanc, Redis and watcher, studies sent with storescu."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
import redis
from hl7.client import MLLPClient
from rq import Queue

from tests.conftest import Servers, free_port
from tests.senders import storescu
from tests.studies import ct_studies
from tests.test_dicom_security import make_pki
from triage.priority import PriorityClass
from triage.ris import intake, store
from triage.ris.orders import Order, OrderError, parse_message, read_orders
from triage.servers import ManagedProcess
from triage.watcher import Watcher
from triage.worklist import OrderStatus, StudyStatus, Worklist, WorklistItem

pytestmark = pytest.mark.servers

IDLE_SECONDS = 1.5
MAX_BYTES = 8192
SENDERS = '[{"name": "ris", "host": "127.0.0.1", "application": "RIS"}]'


class Listener:
    def __init__(self, port: int, process: ManagedProcess) -> None:
        self.port = port
        self.process = process

    def send(self, text: str) -> hl7.Message:
        with MLLPClient("127.0.0.1", self.port) as client:
            client.socket.settimeout(10)
            return hl7.parse(client.send_message(text.replace("\n", "\r")))

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(source, 0))
        return sock


@pytest.fixture
def listener(clean_servers: Servers, tmp_path: Path) -> Iterator[Listener]:
    with _listener(tmp_path, {"TRIAGE_RIS_SENDERS": SENDERS}) as running:
        yield running


@contextlib.contextmanager
def _listener(tmp_path: Path, settings: dict[str, str]) -> Iterator[Listener]:
    port = free_port()
    env = {**os.environ, "TRIAGE_RIS_LISTEN_PORT": str(port),
           "TRIAGE_RIS_IDLE_SECONDS": str(IDLE_SECONDS),
           "TRIAGE_RIS_MAX_MESSAGE_BYTES": str(MAX_BYTES), **settings}
    process = ManagedProcess("ris", [sys.executable, "-m", "triage.cli", "ris-listener"],
                             tmp_path / "ris.log", env=env)
    process.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.popen is not None and process.popen.poll() is None, (
                    (tmp_path / "ris.log").read_text())
                assert time.monotonic() < deadline, "the listener did not start"
                time.sleep(0.1)
        yield Listener(port, process)
    finally:
        process.stop()


def orm_v23(*, control: str = "NW", placer: str = "P100", accession: str, patient_id: str,
            issuer: str = "", priority: str = "R", patient_class: str = "O",
            question: str = "", control_id: str = "MSG0001", application: str = "RIS") -> str:
    """An ORM^O01 as an IHE scheduled-workflow RIS writes it in v2.3: priority in ORC-7 and
    OBR-27 component 6, accession in OBR-18."""
    authority = f"^^^{issuer}" if issuer else ""
    return "\r".join([
        f"MSH|^~\\&|{application}|RADIOLOGY|TRIAGE|HOSPITAL|20261130101500||ORM^O01|"
        f"{control_id}|P|2.3",
        f"PID|1||{patient_id}{authority}||DOE^JANE||19700101|F",
        f"PV1|1|{patient_class}|ED^BAY3",
        f"ORC|{control}|{placer}|F{placer}||SC||^^^^^{priority}",
        f"OBR|1|{placer}|F{placer}|CTHEAD^CT head without contrast^L|||||||||{question}|||||"
        f"{accession}|||||||||^^^^^{priority}",
    ])


def omi_v251(*, control: str = "NW", placer: str = "P200", accession: str, patient_id: str,
             study_uid: str = "", priority: str = "R", patient_class: str = "I",
             question: str = "", control_id: str = "MSG1001",
             sent: str = "20261130111500") -> str:
    """An OMI^O23 in v2.5.1: priority in TQ1-9, accession and Study Instance UID in IPC."""
    return "\r".join([
        f"MSH|^~\\&|RIS|RADIOLOGY|TRIAGE|HOSPITAL|{sent}||OMI^O23^OMI_O23|"
        f"{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^HOSP^MR||DOE^JOHN||19650505|M",
        f"PV1|1|{patient_class}|WARD7^12^1",
        f"ORC|{control}|{placer}|F{placer}||SC",
        f"TQ1|1||||||||{priority}^Stat^HL70078",
        "|".join(["OBR", "1", placer, f"F{placer}", "CTHEAD^CT head^L", *[""] * 26,
                  f"^{question}"]),  # OBR-31, reason for study
        f"IPC|{accession}|RP{placer}|{study_uid}|SPS{placer}|CT",
    ])


def ack_of(message: hl7.Message) -> tuple[str, str, str]:
    def get(key: str) -> str:
        try:
            return str(message[key])
        except (KeyError, IndexError):
            return ""
    return get("MSA.1"), get("MSA.2"), message.unescape(get("MSA.3"))


def analysed_listing(servers: Servers, uid: str) -> WorklistItem:
    watcher = Watcher(servers.settings, servers.orthanc, servers.redis)
    worklist = Worklist(servers.redis)
    servers.wait_until(lambda: watcher.poll_once() >= 0 and worklist.get(uid) is not None,
                       timeout=30, what="the study on the worklist")
    item = worklist.get(uid)
    assert item is not None
    return item


def _study(tmp_path: Path, tag: str, **attributes: object) -> tuple[str, str, str, Path]:
    import pydicom

    [[path]] = ct_studies(tmp_path, 1, tag=tag, **attributes)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.AccessionNumber), str(ds.PatientID), path


# -- parsing, every version -------------------------------------------------------------------

@pytest.mark.parametrize(("version", "priority_field"), [
    ("2.3", "ORC-7"), ("2.3.1", "OBR-27"), ("2.4", "OBR-27"), ("2.5.1", "TQ1-9")])
def test_orders_are_read_from_where_each_version_keeps_them(version: str,
                                                            priority_field: str) -> None:
    orc7 = "^^^^^S" if priority_field == "ORC-7" else ""
    obr27 = "^^^^^S" if priority_field == "OBR-27" else ""
    segments = [
        f"MSH|^~\\&|RIS|RAD|TRIAGE|HOSP|202611301015+0100||ORM^O01|C1|P|{version}",
        "PID|1||A1^^^HOSP_A~B2^^^HOSP_B&1.2.3&ISO||DOE^JANE",
        "PV1|1|E|ED",
        f"ORC|NW|P1|F1||SC||{orc7}|||||||ED^TRIAGE",
        f"OBR|1|P1|F1|CTHEAD^CT head^L|||||||||Fall \\T\\ headache|||||ACC9|||||||||{obr27}"
        "||||||||||||||||||CTHEAD^CT head^L",
    ]
    if priority_field == "TQ1-9":
        segments.insert(4, "TQ1|1||||||||S")
    [order] = read_orders(parse_message("\n".join(segments)), sender="ris",
                          received_at=datetime.now(UTC))
    assert (order.priority_code, order.accession_number, order.placer_order_number,
            order.filler_order_number, order.patient_class, order.clinical_question,
            order.ordering_location, order.procedure) == (
        "S", "ACC9", "P1", "F1", "E", "Fall & headache", "ED",
        "CT head")
    assert (order.procedure_code, order.procedure_coding_system) == ("CTHEAD", "L")
    assert [(p.id, p.issuer, p.issuer_uid) for p in order.patients] == [
        ("A1", "HOSP_A", ""), ("B2", "HOSP_B", "1.2.3")]
    assert order.message_time == datetime(2026, 11, 30, 9, 15, tzinfo=UTC)
    floor = order.floor()
    assert floor.priority is PriorityClass.URGENT
    assert floor.reasons == ("clinical: STAT order (RIS)",
                             "clinical: emergency patient (RIS order)")


@pytest.mark.parametrize(("text", "answer", "reason"), [
    ("hello", "AR", "not an HL7 v2 message"),
    ("MSH|^~\\&|RIS|RAD|||20261130||ADT^A01|C1|P|2.5.1\rPID|1||X", "AR", "ADT^A01"),
    ("MSH|^~\\&|RIS|RAD|||20261130||OMI^O23|C1|P|2.4\rORC|NW|1", "AR", "from HL7 v2.5"),
    ("MSH|^~\\&|RIS|RAD|||20261130||ORM^O01||P|2.3\rORC|NW|1", "AR", "MSH-10"),
    ("MSH|^~\\&|RIS|RAD|||20261130||ORM^O01|C1|P|2.3\rPID|1||X", "AE", "no order"),
    ("MSH|^~\\&|RIS|RAD|||20261130||ORM^O01|C1|P|2.3\rPID|1||X\rORC|ZZ|1", "AE", "ZZ"),
    ("MSH|^~\\&|RIS|RAD|||20261130||ORM^O01|C1|P|2.3\rPID|1||\rORC|NW|1\rOBR|1|1|2|X",
     "AE", "neither a Study Instance UID"),
    ("MSH|^~\\&|RIS|RAD|||20261130||OMI^O23|C1|P|2.5.1\rPID|1||X\rORC|NW|1\rIPC|A|B|1.2.x",
     "AE", "not a valid UID"),
])
def test_what_an_order_message_lacks_is_named(text: str, answer: str, reason: str) -> None:
    with pytest.raises(OrderError) as refused:
        read_orders(parse_message(text), sender="ris", received_at=datetime.now(UTC))
    assert refused.value.answer == answer
    assert reason in refused.value.reason


# -- orders and studies ----------------------------------------------------------------------

def test_a_stat_order_sent_before_the_images_makes_a_routine_study_urgent_on_arrival(
        listener: Listener, clean_servers: Servers, tmp_path: Path) -> None:
    uid, accession, patient_id, path = _study(tmp_path, "stat")
    ack = listener.send(orm_v23(accession=accession, patient_id=patient_id, priority="S",
                                question="Sudden headache, anticoagulated"))
    assert ack_of(ack) == ("AA", "MSG0001", "")
    storescu(clean_servers.settings, [path])
    item = analysed_listing(clean_servers, uid)
    assert item.clinical_priority is PriorityClass.URGENT
    assert item.priority is PriorityClass.URGENT
    assert "clinical: STAT order (RIS)" in item.priority_reasons
    [order] = item.orders
    assert (order.priority_code, order.clinical_question, order.status, order.procedure) == (
        "S", "Sudden headache, anticoagulated", OrderStatus.ACTIVE,
        "CT head without contrast")
    # Queued with the urgent studies, ahead of the routine ones.
    assert item.job_id in Queue("urgent", connection=clean_servers.redis).job_ids


def test_an_order_sent_after_the_study_raises_it_and_a_cancel_is_shown(
        listener: Listener, clean_servers: Servers, tmp_path: Path) -> None:
    uid, accession, patient_id, path = _study(tmp_path, "later")
    storescu(clean_servers.settings, [path])
    item = analysed_listing(clean_servers, uid)
    assert item.priority is PriorityClass.ROUTINE and not item.orders
    default, urgent = (Queue(name, connection=clean_servers.redis)
                       for name in ("default", "urgent"))
    assert default.job_ids == [item.job_id]
    # OMI^O23 v2.5.1 naming the study by its UID (IPC-3): the best key.
    ack = listener.send(omi_v251(accession=accession, patient_id=patient_id, study_uid=uid,
                                 priority="S", patient_class="E", question="Trauma"))
    assert ack_of(ack)[0] == "AA"
    worklist = Worklist(clean_servers.redis)
    item = worklist.get(uid)
    assert item is not None
    assert item.priority is PriorityClass.URGENT
    assert {"clinical: STAT order (RIS)", "clinical: emergency patient (RIS order)"} <= set(
        item.priority_reasons)
    assert [(o.status, o.clinical_question) for o in item.orders] == [
        (OrderStatus.ACTIVE, "Trauma")]
    # Its analysis, still waiting with the routine ones, moves to the urgent queue.
    assert (default.job_ids, urgent.job_ids) == ([], [item.job_id])
    # The RIS cancels it: shown as cancelled, the study stays listed and its priority stays.
    ack = listener.send(omi_v251(control="CA", accession=accession, patient_id=patient_id,
                                 study_uid=uid, priority="S", patient_class="E",
                                 question="Trauma", control_id="MSG1002",
                                 sent="20261130111700"))
    assert ack_of(ack)[0] == "AA"
    item = worklist.get(uid)
    assert item is not None
    assert [(o.status, o.order_control) for o in item.orders] == [
        (OrderStatus.CANCELLED, "CA")]
    assert item.priority is PriorityClass.URGENT
    # The first message again (its ACK was lost): acknowledged, and the cancel stays.
    ack = listener.send(omi_v251(accession=accession, patient_id=patient_id, study_uid=uid,
                                 priority="S", patient_class="E", question="Trauma"))
    assert ack_of(ack)[:2] == ("AA", "MSG1001")
    item = worklist.get(uid)
    assert item is not None
    assert [o.status for o in item.orders] == [OrderStatus.CANCELLED]


def test_an_order_for_the_same_accession_but_another_patient_does_not_attach(
        listener: Listener, clean_servers: Servers, tmp_path: Path) -> None:
    uid, accession, patient_id, path = _study(tmp_path, "other",
                                              IssuerOfPatientID="HOSP_A")
    # Before the study: another Patient ID, and the right ID from another issuer.
    assert ack_of(listener.send(orm_v23(accession=accession, patient_id="someone-else",
                                        priority="S", control_id="X1")))[0] == "AA"
    assert ack_of(listener.send(orm_v23(accession=accession, patient_id=patient_id,
                                        issuer="HOSP_B", priority="S", placer="P101",
                                        control_id="X2")))[0] == "AA"
    storescu(clean_servers.settings, [path])
    item = analysed_listing(clean_servers, uid)
    assert item.issuer_of_patient_id == "HOSP_A"
    assert item.priority is PriorityClass.ROUTINE and not item.orders
    # After it: still nothing; the same patient with the same issuer attaches.
    assert ack_of(listener.send(orm_v23(accession=accession, patient_id="someone-else",
                                        priority="S", placer="P102", control_id="X3")))[0] \
        == "AA"
    worklist = Worklist(clean_servers.redis)
    assert worklist.get(uid).orders == []  # type: ignore[union-attr]
    assert ack_of(listener.send(orm_v23(accession=accession, patient_id=patient_id,
                                        issuer="HOSP_A", priority="S", placer="P103",
                                        control_id="X4")))[0] == "AA"
    item = worklist.get(uid)
    assert item is not None
    assert [o.placer_order_number for o in item.orders] == ["P103"]
    assert item.priority is PriorityClass.URGENT


def test_an_order_stored_while_the_watcher_queues_its_study_is_shown(
        clean_servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener stores an order after the watcher looked for the study's orders and
    before it wrote the study's item: the listener finds no item, the watcher no order."""
    uid, accession, patient_id, path = _study(tmp_path, "race")
    [order] = read_orders(parse_message(orm_v23(accession=accession, patient_id=patient_id,
                                                priority="S")),
                          sender="ris", received_at=datetime.now(UTC))
    real = intake.orders_for
    looked: list[str] = []

    def racing(connection, **study):  # type: ignore[no-untyped-def]
        looked.append(study["study_uid"])
        if len(looked) == 1:
            assert intake.take(connection, order, days=1) == []  # no item yet
            return []
        return real(connection, **study)

    monkeypatch.setattr(intake, "orders_for", racing)
    storescu(clean_servers.settings, [path])
    item = analysed_listing(clean_servers, uid)
    assert looked[:2] == [uid, uid]
    assert [o.placer_order_number for o in item.orders] == ["P100"]
    assert item.priority is PriorityClass.URGENT
    # Queued with the routine studies before the order was seen: moved to the urgent queue.
    assert item.job_id in Queue("urgent", connection=clean_servers.redis).job_ids
    assert item.job_id not in Queue("default", connection=clean_servers.redis).job_ids


# -- what the listener answers ---------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (reads return nothing)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except ConnectionResetError:
            return time.monotonic() - started


def test_bad_input_gets_its_documented_answer_while_another_client_keeps_sending(
        listener: Listener, clean_servers: Servers) -> None:
    sent, answers, errors = 0, [], []
    stop = threading.Event()

    def steady() -> None:  # a RIS that keeps one connection and sends valid orders
        nonlocal sent
        try:
            with MLLPClient("127.0.0.1", listener.port) as client:
                client.socket.settimeout(10)
                while not stop.is_set():
                    sent += 1
                    reply = hl7.parse(client.send_message(orm_v23(
                        accession=f"ACC-STEADY-{sent}", patient_id="steady",
                        placer=f"S{sent}", control_id=f"S{sent}")))
                    answers.append(ack_of(reply)[0])
                    time.sleep(0.05)
        except Exception as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=steady)
    thread.start()
    try:
        # A message that is not HL7, in a frame: AR, and the connection stays usable.
        with listener.connect() as sock:
            sock.sendall(b"\x0bGET / HTTP/1.1\r\x1c\r")
            reply = hl7.parse(sock.recv(65536).strip(b"\x0b\x1c\r").decode())
            assert ack_of(reply)[0] == "AR"
            assert "not an HL7 v2 message" in ack_of(reply)[2]
            sock.sendall(b"\x0b" + orm_v23(accession="ACC-SAME", patient_id="p",
                                           control_id="SAME1").encode() + b"\x1c\r")
            assert ack_of(hl7.parse(sock.recv(65536).strip(b"\x0b\x1c\r").decode()))[:2] == (
                "AA", "SAME1")
        # Another message type, and an application no sender has: AR with the reason.
        adt = listener.send("MSH|^~\\&|RIS|RAD|TRIAGE||20261130||ADT^A01|ADT1|P|2.5.1\r"
                            "PID|1||X")
        assert ack_of(adt)[:2] == ("AR", "ADT1") and "ADT^A01" in ack_of(adt)[2]
        stranger = listener.send(orm_v23(accession="A", patient_id="p", application="LAB",
                                         control_id="LAB1"))
        assert ack_of(stranger)[0] == "AR" and "not admitted" in ack_of(stranger)[2]
        # Bytes outside a frame: closed at once.
        with listener.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert _closed_within(sock, 5) < 1.0
        # Over the size cap: closed, without reading to the end.
        with listener.connect() as sock:
            big = orm_v23(accession="BIG", patient_id="p", question="x" * (MAX_BYTES * 2))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"\x0b" + big.encode() + b"\x1c\r")
            assert _closed_within(sock, 5) < 2.0
        # A frame cut by the client's end of the connection: nothing to answer.
        with listener.connect() as sock:
            sock.sendall(b"\x0bMSH|^~\\&|RIS|RAD|||20261130||ORM^O01|CUT1|P|2.3\rPID|1")
            sock.shutdown(socket.SHUT_WR)
            assert _closed_within(sock, 5) < 1.0
        # Connected and silent, or silent inside a frame: closed after the idle time.
        with listener.connect() as silent, listener.connect() as halfway:
            halfway.sendall(b"\x0bMSH|^~\\&|RIS|RAD")
            waited = _closed_within(silent, IDLE_SECONDS + 5)
            assert IDLE_SECONDS - 0.2 <= waited <= IDLE_SECONDS + 2
            assert _closed_within(halfway, 5) <= 2
        # From an address no sender has: closed before reading anything.
        with listener.connect("127.0.0.2") as sock:
            assert _closed_within(sock, 5) < 1.0
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not errors, errors
    assert sent >= 5 and answers and set(answers) == {"AA"}
    rejected = store.rejected_messages(clean_servers.redis)
    reasons = [(r.answer, r.reason) for r in rejected]
    for expected in [("AR", "not an HL7 v2 message"), ("closed", "bytes outside an MLLP frame"),
                     ("closed", f"message larger than {MAX_BYTES} bytes"),
                     ("closed", "frame cut by the end of the connection"),
                     ("closed", "address not admitted")]:
        assert any(a == expected[0] and expected[1] in r for a, r in reasons), (expected,
                                                                                 reasons)
    adt_kept = next(r for r in rejected if r.control_id == "ADT1")
    assert (adt_kept.message_type, adt_kept.sender, adt_kept.answer) == ("ADT^A01", "ris", "AR")
    assert "PID|1||X" in adt_kept.excerpt


def test_over_tls_only_clients_with_a_certificate_of_the_hospital_ca_are_admitted(
        clean_servers: Servers, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    key, cert = pki.server
    tls = {"TRIAGE_RIS_TLS_CERT": str(cert), "TRIAGE_RIS_TLS_KEY": str(key),
           "TRIAGE_RIS_TLS_CA": str(pki.ca)}

    def context(client: tuple[Path, Path] | None) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=str(pki.ca))
        made.check_hostname = False  # the test certificate names no host
        if client is not None:
            made.load_cert_chain(client[1], client[0])
        return made

    with _listener(tmp_path, tls) as listening:
        order = orm_v23(accession="ACC-TLS", patient_id="tls-1", control_id="TLS1")
        with socket.create_connection(("127.0.0.1", listening.port), timeout=10) as raw, \
                context(pki.client).wrap_socket(raw) as sock:
            sock.sendall(b"\x0b" + order.encode() + b"\x1c\r")
            reply = hl7.parse(sock.recv(65536).strip(b"\x0b\x1c\r").decode())
            assert ack_of(reply)[:2] == ("AA", "TLS1")
        # No certificate, or one from another CA: the handshake fails.
        for client in (None, pki.rogue):
            with socket.create_connection(("127.0.0.1", listening.port), timeout=10) as raw, \
                    pytest.raises((ssl.SSLError, ConnectionError)), \
                    context(client).wrap_socket(raw) as sock:
                sock.sendall(b"\x0b" + order.encode() + b"\x1c\r")
                if not sock.recv(65536):
                    raise ConnectionError("closed")
        # Plain MLLP to the TLS port: no answer.
        with socket.create_connection(("127.0.0.1", listening.port), timeout=10) as sock:
            sock.sendall(b"\x0b" + order.encode() + b"\x1c\r")
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert not sock.recv(65536)
    [stored] = store.candidates(clean_servers.redis, study_uid="", accession_number="ACC-TLS")
    assert stored.sender == "tls:modality"


# -- the README's examples -------------------------------------------------------------------

def _readme_blocks(title: str) -> list[str]:
    """The code blocks of README.md's section ``title`` (up to the next section)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return [block.strip("\n") for block in section.split("```")[1::2]]


def test_the_readme_examples_are_what_the_service_reads_and_writes() -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message as strict_parse

    blocks = [b for b in _readme_blocks("Connecting a RIS") if b.startswith("MSH|")]
    orm, omi, oru = blocks[0].split("\n\n")[0], blocks[1], blocks[2]
    [v23] = read_orders(parse_message(orm), sender="ris", received_at=datetime.now(UTC))
    assert (v23.version, v23.priority_code, v23.accession_number, v23.study_uid,
            v23.patient_class, v23.clinical_question, v23.procedure_code) == (
        "2.3", "S", "A2026113001", "1.2.826.0.1.3680043.8.498.12345", "E",
        "Fall, anticoagulated / Sudden headache", "CTHEAD")
    [v251] = read_orders(parse_message(omi), sender="ris", received_at=datetime.now(UTC))
    assert (v251.version, v251.priority_code, v251.accession_number, v251.study_uid,
            v251.clinical_question) == (
        "2.5.1", "S", "A2026113002", "1.2.826.0.1.3680043.8.498.12346", "Trauma, GCS 12")
    # The ACK shown is the one the listener writes for the v2.3 order.
    ack = hl7.parse(blocks[0].split("\n\n")[1].replace("\n", "\r"))
    assert ack_of(ack) == ("AA", "MSG0001", "")
    # The ORU^R01 shown validates strictly, preliminary throughout.
    strict = strict_parse(oru.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT,
                          find_groups=True)
    strict.validate()
    result = hl7.parse(oru.replace("\n", "\r"))
    assert result["OBR.F25"] == "P"
    assert {result[f"OBX{n}.F11"] for n in range(1, len(result.segments("OBX")) + 1)} == {"P"}


# -- what the RIS corrects, repeats or sends together -----------------------------------------

def _orders(text: str, *, received: datetime | None = None) -> list[Order]:
    return read_orders(parse_message(text), sender="ris",
                       received_at=received or datetime.now(UTC))


def _listed(connection: redis.Redis, uid: str, accession: str, patient_id: str) -> None:
    from tests.test_api import make_item

    item = make_item(int(uid.rsplit(".", 1)[1]), PriorityClass.ROUTINE, 1).model_copy(
        update={"study_instance_uid": uid, "accession_number": accession,
                "patient_id": patient_id, "status": StudyStatus.QUEUED, "findings": []})
    Worklist(connection).put(item)


def test_each_requested_procedure_of_an_order_is_its_own_order(
        clean_servers: Servers) -> None:
    """IHE scheduled workflow: one order (one placer number), two requested procedures, each
    with its own study; the STAT one must reach its study."""
    text = "\r".join([
        "MSH|^~\\&|RIS|RAD|TRIAGE|HOSP|20261130111500||OMI^O23^OMI_O23|TWO1|P|2.5.1",
        "PID|1||PAT-2^^^HOSP", "PV1|1|O",
        "ORC|NW|P1|F1||SC", "TQ1|1||||||||S", "OBR|1|P1|F1|CTHEAD^CT head^L",
        "IPC|ACC1|RP1|1.2.3.10|SPS1|CT", "IPC|ACC2|RP2|1.2.3.11|SPS2|CT",
        "ORC|NW|P1|F1||SC", "TQ1|1||||||||R", "OBR|1|P1|F1|CTCHEST^CT chest^L",
        "IPC|ACC3|RP3|1.2.3.12|SPS3|CT",
    ])
    orders = _orders(text)
    assert [(o.study_uid, o.priority_code) for o in orders] == [
        ("1.2.3.10", "S"), ("1.2.3.11", "S"), ("1.2.3.12", "R")]
    assert len({o.key for o in orders}) == 3
    connection = clean_servers.redis
    for order in orders:
        intake.take(connection, order, days=1)
    for uid, code in (("1.2.3.10", "S"), ("1.2.3.11", "S"), ("1.2.3.12", "R")):
        [found] = intake.orders_for(connection, study_uid=uid, accession_number="",
                                    patient_id="PAT-2", issuer="")
        assert found.priority_code == code
    # More requested procedures than one message may carry: AE.
    many = "\r".join([*text.split("\r")[:3],
                      *[f"ORC|NW|P{n}|F{n}\rIPC|A{n}|R{n}|1.2.3.{n}" for n in range(101)]])
    with pytest.raises(OrderError) as refused:
        _orders(many)
    assert refused.value.answer == "AE" and "at most 100" in refused.value.reason


def test_an_order_the_ris_moves_to_another_study_leaves_the_first(
        clean_servers: Servers) -> None:
    connection = clean_servers.redis
    worklist = Worklist(connection)
    _listed(connection, "1.2.3.1", "ACC-A", "PAT-A")
    _listed(connection, "1.2.3.2", "ACC-B", "PAT-B")

    def message(control: str, zds: str, sent: str, control_id: str) -> str:
        return "\r".join([
            f"MSH|^~\\&|RIS|RAD|TRIAGE|HOSP|{sent}||ORM^O01|{control_id}|P|2.3",
            "PID|1||PAT-B", "PV1|1|E", f"ORC|{control}|P1|F1||SC||^^^^^S",
            "|".join(["OBR", "1", "P1", "F1", "CTHEAD^CT head^L", *[""] * 8,
                      "Question of patient B"]),  # OBR-13
            f"ZDS|{zds}^^Application^DICOM"])

    [first] = _orders(message("NW", "1.2.3.1", "20261130100000", "M1"))
    assert intake.take(connection, first, days=1) == ["1.2.3.1"]  # (the RIS's error)
    [moved] = _orders(message("XO", "1.2.3.2", "20261130100500", "M2"))
    assert intake.take(connection, moved, days=1) == ["1.2.3.2"]
    shown_a, shown_b = worklist.get("1.2.3.1"), worklist.get("1.2.3.2")
    assert shown_a is not None and shown_b is not None
    assert shown_a.orders == []  # no other patient's question any more
    assert shown_a.priority is PriorityClass.URGENT  # what it raised stays
    assert [o.clinical_question for o in shown_b.orders] == ["Question of patient B"]
    assert intake.orders_for(connection, study_uid="1.2.3.1", accession_number="",
                             patient_id="PAT-A", issuer="") == []
    # The same message again, and an older one: acknowledged, nothing changes.
    assert intake.take(connection, moved, days=1) == []
    assert intake.take(connection, first, days=1) == []
    assert worklist.get("1.2.3.1").orders == []  # type: ignore[union-attr]
    # A cancel in the same second as the order it cancels, then that order late: cancelled.
    [cancel] = _orders(message("CA", "1.2.3.2", "20261130100500", "M3"))
    assert intake.take(connection, cancel, days=1) == ["1.2.3.2"]
    [late] = _orders(message("XO", "1.2.3.2", "20261130100500", "M4"))
    assert intake.take(connection, late, days=1) == []
    assert [o.status for o in worklist.get("1.2.3.2").orders] == [  # type: ignore[union-attr]
        OrderStatus.CANCELLED]


def test_a_shown_order_is_never_replaced_by_an_earlier_state(clean_servers: Servers) -> None:
    connection = clean_servers.redis
    _listed(connection, "1.2.3.5", "ACC-5", "PAT-5")
    worklist = Worklist(connection)
    text = orm_v23(accession="ACC-5", patient_id="PAT-5", priority="S")
    [old] = _orders(text, received=datetime(2026, 11, 30, 10, 0, tzinfo=UTC))
    [new] = _orders(text.replace("ORC|NW", "ORC|CA"),
                    received=datetime(2026, 11, 30, 10, 1, tzinfo=UTC))
    item = intake.with_orders(worklist.get("1.2.3.5"), [new])  # type: ignore[arg-type]
    assert intake.with_orders(item, [old]) is item  # the watcher's stale copy: ignored
    assert [o.status for o in item.orders] == [OrderStatus.CANCELLED]
    assert item.priority is PriorityClass.ROUTINE  # a cancelled order raises nothing


def test_odd_input_gets_a_safe_answer(clean_servers: Servers) -> None:
    from triage.ris.listener import Peer, answer
    from triage.settings import Settings

    settings = Settings(ris_senders=[{"name": "ris", "application": "RIS"}])
    peer = Peer("10.0.0.9", False)
    # Blank lines between segments: taken.
    spaced = orm_v23(accession="ACC-SP", patient_id="p", control_id="SP1").replace(
        "\r", "\r\n\r\n")
    reply = answer(spaced.encode(), peer, clean_servers.redis, settings)
    assert (reply.code, ack_of(hl7.parse(reply.ack.decode()))[:2]) == ("AA", ("AA", "SP1"))
    # A control id that tries to write a segment into our answer: our header stays ours.
    forged = orm_v23(accession="A", patient_id="p",
                     control_id="M\\X0D\\MSA\\F\\AA").replace("ORC|NW", "ORC|ZZ")
    reply = answer(forged.encode(), peer, clean_servers.redis, settings)
    ack = hl7.parse(reply.ack.decode())
    assert [str(s[0]) for s in ack] == ["MSH", "MSA"]
    assert ack_of(ack)[0] == "AE"


def test_receivers_words_are_cleared_of_the_patient_in_any_case() -> None:
    from triage.ris.results import cleared

    text = "Patient Jane DOE (pat-77, born 19700101) not found for order PL9"
    assert cleared(text, ["DOE", "JANE", "PAT-77", "19700101", "PL9"]) == (
        "Patient … … (…, born …) not found for order …")
