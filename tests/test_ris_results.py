"""Preliminary results reach a real MLLP receiver acting as the RIS (python-hl7's asyncio
server on a free port): every message validates strictly with hl7apy in v2.3 and v2.5.1, a
RIS that was down gets every result once it is back, a message sent again after a lost
acknowledgement keeps its control id, and a rejection ends with the RIS's reason."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import hl7
import pytest
import redis
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from tests.conftest import free_port
from triage import delivery, jobs
from triage.priority import PriorityClass
from triage.ris.results import message_control_id, oru_message
from triage.settings import Destination, RisDestination, Settings
from triage.workers import run_worker
from triage.worklist import (
    DeliveryStatus,
    FindingItem,
    OrderItem,
    OrderStatus,
    ResultItem,
    StudyStatus,
    Worklist,
    WorklistItem,
    utcnow,
)

pytestmark = pytest.mark.servers
MODEL, VERSION = "head-ct-hyperdensity", "1.1.0"
# DICOM PN components with every HL7 delimiter in them.
HOSTILE_NAME = "O'Brien&Sons|Ltd^Jo~hn\\Paul"
HOSTILE_ID = "ID^1&2~3|4\\5"


# -- the RIS ---------------------------------------------------------------------------------

class RisReceiver:
    """python-hl7's MLLP server on its own event loop thread: records every message and
    answers with the next planned reply (``AA`` once the plan is used up). A reply is an
    acknowledgement code, ``"drop"`` (close without answering), ``"garbled"`` or
    ``"silent"`` (no answer for a second)."""

    def __init__(self, plan: list[str] | None = None, reason: str = "") -> None:
        self.port = free_port()
        self.plan = list(plan or [])
        self.reason = reason
        self.messages: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def start(self) -> None:
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> asyncio.base_events.Server:
        return await start_hl7_server(self._client, "127.0.0.1", self.port,
                                      encoding="utf-8")

    async def _client(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.messages.append(str(message))
                reply = self.plan.pop(0) if self.plan else "AA"
                if reply == "drop":
                    break
                if reply == "silent":
                    await asyncio.sleep(1)
                    break
                if reply == "garbled":
                    writer.writeblock(b"this is no acknowledgement")
                else:
                    ack = message.create_ack(reply, message_id="ACK1")
                    if self.reason:
                        ack.segment("MSA").assign_field(self.reason, 3)
                    writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- results on the worklist -----------------------------------------------------------------

def result_item(n: int, *, positive: bool = True, name: str = "DOE^JANE",
                patient_id: str = "") -> WorklistItem:
    """A study analysed by the head CT model, with an SR and a matched RIS order."""
    now = utcnow()
    probability = 0.91 if positive else 0.07
    return WorklistItem(
        study_instance_uid=f"1.2.826.0.1.3680043.10.511.{n}", orthanc_id=f"o{n}",
        accession_number=f"ACC{n}", patient_name=name, patient_id=patient_id or f"PAT{n}",
        issuer_of_patient_id="HOSP", patient_birth_date="19600229", patient_sex="F",
        study_date="20261130", status=StudyStatus.ANALYSED,
        priority=PriorityClass.CRITICAL if positive else PriorityClass.ROUTINE,
        findings=[FindingItem(code="1386000", scheme="SCT", meaning="Intracranial hemorrhage",
                              probability=probability, threshold=0.5, positive=positive,
                              priority=PriorityClass.CRITICAL if positive else None,
                              model=MODEL, model_version=VERSION)],
        results=[ResultItem(model=MODEL, model_version=VERSION, model_name="Head CT bleed",
                            weights_sha256="0" * 64, regulatory_status="research use only",
                            series_instance_uid=f"1.2.826.0.1.3680043.10.511.{n}.1",
                            n_instances=40)],
        received_at=now - timedelta(minutes=5), analysed_at=now,
        sr_sop_instance_uid=f"1.2.826.0.1.3680043.10.511.{n}.9.1",
        orders=[OrderItem(key=f"ris:{n}", sender="ris", placer_order_number=f"PL{n}",
                          filler_order_number=f"FI{n}", accession_number=f"ACC{n}",
                          procedure="CT head without contrast", procedure_code="CTHEAD",
                          procedure_coding_system="L", received_at=now,
                          updated_at=now)])


@pytest.fixture
def stack(redis_settings: Settings, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Callable[..., redis.Redis]]:
    """Configures the worker's settings (``TRIAGE_`` variables) on the module's Redis,
    emptied; call it with the extra variables, it returns the Redis connection."""
    connection = redis.Redis.from_url(redis_settings.redis_connection_url)
    connection.flushall()

    def configure(**env: object) -> redis.Redis:
        monkeypatch.setenv("TRIAGE_DATA_DIR", str(redis_settings.data_dir))
        monkeypatch.setenv("TRIAGE_REDIS_PORT", str(redis_settings.redis_port))
        monkeypatch.setenv("TRIAGE_DELIVERY_RETRY_SECONDS", "[1]")
        for key, value in env.items():
            monkeypatch.setenv(f"TRIAGE_{key.upper()}",
                               value if isinstance(value, str) else json.dumps(value))
        jobs.context.cache_clear()
        return connection

    yield configure
    jobs.context.cache_clear()


def produce(connection: redis.Redis, items: list[WorklistItem]) -> list[str]:
    """Put the results on the worklist and schedule their deliveries, as the worker does
    after an analysis."""
    worklist = Worklist(connection)
    scheduled = []
    for item in items:
        worklist.put(item)
        scheduled += delivery.schedule(connection, jobs.context().settings, item)
    return scheduled


def drain(connection: redis.Redis, done: Callable[[], bool], timeout: float = 20) -> None:
    """Run burst workers (each moves due retries back to the queues first) until ``done``."""
    deadline = time.monotonic() + timeout
    while True:
        run_worker(burst=True)
        if done():
            return
        assert time.monotonic() < deadline, "deliveries did not end in time"
        time.sleep(0.2)


def states(connection: redis.Redis, kind: str = "hl7") -> list[tuple[str, DeliveryStatus]]:
    return sorted((d.sr_sop_instance_uid, d.status) for i in Worklist(connection).page()[0]
                  for d in i.deliveries if d.kind == kind)


def all_delivered(connection: redis.Redis, kind: str = "hl7") -> Callable[[], bool]:
    return lambda: bool(states(connection, kind)) and all(
        s is DeliveryStatus.DELIVERED for _, s in states(connection, kind))


def ris(receiver: RisReceiver, version: str = "2.5.1", **extra: object) -> list[dict]:
    return [{"name": "ris", "host": "127.0.0.1", "port": receiver.port, "version": version,
             "receiving_application": "RIS", "receiving_facility": "RADIOLOGY",
             "timeout_seconds": 2, **extra}]


@pytest.fixture
def receiver() -> Iterator[RisReceiver]:
    running = RisReceiver()
    yield running
    running.stop()


# -- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2.3", "2.5.1"])
def test_each_message_validates_strictly_and_carries_the_result(
        stack, receiver: RisReceiver, version: str) -> None:
    connection = stack(ris_destinations=ris(receiver, version), hl7_application="TRIAGE",
                       hl7_facility="AI")
    receiver.start()
    positive = result_item(1, name=HOSTILE_NAME, patient_id=HOSTILE_ID)
    negative = result_item(2, positive=False)
    produce(connection, [positive, negative])
    drain(connection, all_delivered(connection))

    assert len(receiver.messages) == 2
    received = {hl7.parse(m)["OBR.F18"]: m for m in receiver.messages}
    for item in (positive, negative):
        text = received[item.accession_number]
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT,
                               find_groups=True)
        parsed.validate()
        assert parsed.msh.msh_12.to_er7() == version
        message = hl7.parse(text)  # its accessor unescapes what it reads
        assert str(message.segment("MSH")(9)) == (
            "ORU^R01^ORU_R01" if version == "2.5.1" else "ORU^R01")
        control_id = message["MSH.F10"]
        assert control_id == message_control_id("ris", item.sr_sop_instance_uid or "")
        assert len(control_id) <= 20 and message["MSH.F11"] == "P"
        assert (message["MSH.F3"], message["MSH.F5"], message["MSH.F6"]) == (
            "TRIAGE", "RIS", "RADIOLOGY")
        # PID-3 and PID-5 come back as written, delimiters included.
        assert message["PID.F3.R1.C1"] == item.patient_id
        assert message["PID.F3.R1.C4"] == "HOSP"
        family, given = item.patient_name.split("^")
        assert (message["PID.F5.R1.C1"], message["PID.F5.R1.C2"]) == (family, given)
        assert (message["PID.F7"], message["PID.F8"]) == ("19600229", "F")
        order = item.orders[0]
        assert (message["ORC.F1"], message["ORC.F2"], message["ORC.F3"]) == (
            "RE", order.placer_order_number, order.filler_order_number)
        assert (message["OBR.F2"], message["OBR.F3"]) == (
            order.placer_order_number, order.filler_order_number)
        assert (message["OBR.F4.R1.C1"], message["OBR.F4.R1.C2"], message["OBR.F4.R1.C3"]) == (
            order.procedure_code, order.procedure, order.procedure_coding_system)
        assert (message["OBR.F18"], message["OBR.F25"]) == (item.accession_number, "P")
        count = len(message.segments("OBX"))
        values = {message[f"OBX{n}.F3.R1.C1"]: n for n in range(1, count + 1)}
        assert {message[f"OBX{n}.F11"] for n in range(1, count + 1)} == {"P"}
        assert message[f"OBX{values['AI-PRIORITY']}.F5"] == item.priority.value.upper()
        finding, [expected] = values["1386000"], item.findings
        assert message[f"OBX{finding}.F2"] == "NM"
        assert message[f"OBX{finding}.F3.R1.C3"] == "SCT"
        assert float(message[f"OBX{finding}.F5"]) == pytest.approx(expected.probability,
                                                                    abs=1e-4)
        assert message[f"OBX{finding}.F8"] == ("A" if expected.positive else "N")
        assert message[f"OBX{finding}.F17.R1.C2"] == f"Head CT bleed {VERSION}"
        assert message[f"OBX{values['110180']}.F5"] == item.study_instance_uid
        assert message[f"OBX{values['AI-SR-UID']}.F5"] == item.sr_sop_instance_uid
        # A negative study still says so, per model.
        assert ("AI-OUTCOME" in values) == (not expected.positive)


def test_a_ris_down_while_five_results_are_produced_gets_each_after_it_comes_back(
        stack, receiver: RisReceiver) -> None:
    connection = stack(ris_destinations=ris(receiver))
    items = [result_item(n) for n in range(1, 6)]
    assert len(produce(connection, items)) == 5
    run_worker(burst=True)  # the RIS is down: every attempt fails, to be retried
    worklist = Worklist(connection)
    deliveries = [d for i in worklist.page()[0] for d in i.deliveries]
    assert len(deliveries) == 5
    assert all(d.status is DeliveryStatus.PENDING and d.attempts == 1
               and "unreachable" in d.last_error for d in deliveries)
    assert receiver.messages == []

    receiver.start()  # the RIS is back
    drain(connection, all_delivered(connection))
    control_ids = [str(hl7.parse(m).segment("MSH")(10)) for m in receiver.messages]
    assert sorted(control_ids) == sorted(
        message_control_id("ris", i.sr_sop_instance_uid or "") for i in items)
    # A result delivered is never planned again.
    settings = jobs.context().settings
    assert [delivery.schedule(connection, settings, i) for i in worklist.page()[0]] == [[]] * 5
    run_worker(burst=True)
    assert len(receiver.messages) == 5


def test_a_lost_acknowledgement_resends_the_same_message(stack) -> None:
    receiver = RisReceiver(plan=["drop", "garbled", "silent", "AE", "AA"])
    try:
        connection = stack(ris_destinations=ris(receiver, "2.3", timeout_seconds=0.5))
        receiver.start()
        item = result_item(7)
        produce(connection, [item])
        drain(connection, all_delivered(connection))
    finally:
        receiver.stop()
    # Lost, garbled, too late, application error, accepted: the same message each time.
    assert len(receiver.messages) == 5
    control_ids = {str(hl7.parse(m).segment("MSH")(10)) for m in receiver.messages}
    assert control_ids == {message_control_id("ris", item.sr_sop_instance_uid or "")}
    [state] = Worklist(connection).get(item.study_instance_uid).deliveries  # type: ignore[union-attr]
    assert state.attempts == 5 and state.last_error == "" and state.delivered_at is not None


def test_a_rejection_ends_as_a_failed_delivery_with_the_reason(stack) -> None:
    item = result_item(8)
    receiver = RisReceiver(plan=["AR"], reason=f"Unknown patient {item.patient_id}")
    try:
        connection = stack(ris_destinations=ris(receiver))
        receiver.start()
        produce(connection, [item])
        run_worker(burst=True)
        assert len(receiver.messages) == 1  # not retried
        [state] = Worklist(connection).get(item.study_instance_uid).deliveries  # type: ignore[union-attr]
        assert state.status is DeliveryStatus.FAILED and state.attempts == 1
        assert "rejected" in state.last_error and "Unknown patient" in state.last_error
        assert item.patient_id not in state.last_error
        # Once the RIS knows the patient, an administrator sends it again.
        assert len(delivery.retry_failed(connection)) == 1
        run_worker(burst=True)
    finally:
        receiver.stop()
    [state] = Worklist(connection).get(item.study_instance_uid).deliveries  # type: ignore[union-attr]
    assert state.status is DeliveryStatus.DELIVERED and state.attempts == 2
    assert len({hl7.parse(m)["MSH.F10"] for m in receiver.messages}) == 1


def test_the_rule_of_a_ris_decides_and_names_do_not_collide_across_kinds(stack) -> None:
    connection = stack()
    settings = Settings(
        redis_port=jobs.context().settings.redis_port,
        data_dir=jobs.context().settings.data_dir,
        destinations=[Destination(name="ris", aet="PACS", host="127.0.0.1", port=104)],
        ris_destinations=[RisDestination(name="ris", host="127.0.0.1", port=1),
                          RisDestination(name="urgent-only", host="127.0.0.1", port=1,
                                         send="critical")])
    negative = result_item(9, positive=False)
    Worklist(connection).put(negative)
    assert len(delivery.schedule(connection, settings, negative)) == 2  # dicom and "all"
    stored = Worklist(connection).get(negative.study_instance_uid)
    assert stored is not None
    assert sorted((d.kind, d.target) for d in stored.deliveries) == [
        ("dicom", "ris"), ("hl7", "ris")]
    assert delivery.schedule(connection, settings, stored) == []  # planned already, per kind
    message = oru_message(settings, settings.ris_destinations[0], negative)
    assert "AI-OUTCOME^" in message and "NEGATIVE^No finding" in message


def test_the_result_answers_the_latest_active_order() -> None:
    """A cancelled order's numbers would file the result against the wrong request."""
    item = result_item(7)
    [active] = item.orders
    cancelled = active.model_copy(update={
        "key": "ris:cancelled", "placer_order_number": "PL-OLD", "status": OrderStatus.CANCELLED,
        "updated_at": active.updated_at + timedelta(minutes=1)})
    destination = RisDestination(name="ris", host="127.0.0.1", port=1, version="2.5.1")
    for orders, placer in (([cancelled, active], active.placer_order_number),
                           ([cancelled], "")):
        text = oru_message(Settings(), destination, item.model_copy(update={"orders": orders}))
        message = hl7.parse(text)
        assert message["ORC.F2"] == placer and message["OBR.F2"] == placer
