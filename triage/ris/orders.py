"""Orders from the RIS: HL7 v2 ORM^O01 (v2.3 to v2.5.1) and OMI^O23 (v2.5 and later).

Fields move between versions and between the RIS products that send them, so each value is
read from every place it may be, first found wins:

- priority: TQ1-9 (v2.5 and later), else ORC-7 component 6, else OBR-27 component 6 (the
  quantity/timing field of v2.3 to v2.4); HL7 table 0027: S stat, A asap, R routine, ...;
- accession number: IPC-1 (OMI), else OBR-18 (IHE scheduled workflow's ORM), else ORC-3;
- Study Instance UID: IPC-3 (OMI), else ZDS-1 (IHE scheduled workflow's ORM);
- patient: every repetition of PID-3 (ID, and its assigning authority as the issuer);
- patient class PV1-2 (E emergency), ordering location ORC-13 else PV1-3, clinical question
  OBR-31 (reason for study) and OBR-13 (relevant clinical information), procedure OBR-4 (then
  OBR-44);
- order control ORC-1: NW new, XO changed, SC status changed, CA/OC/CR cancelled, DC/OD/DR
  discontinued.

A message may carry several orders (one ORC group each). Parsing is python-hl7's; the checks
are ours (a strict parser refuses the ORM^O01 messages real RIS products send). Values are
unescaped and cut to a sane length: they end up on the worklist and the study page.

An order is matched to a study by its Study Instance UID when it has one (and only then),
else by accession number together with the Patient ID, and the issuer when both sides name
one: a wrong match would show another patient's clinical question.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

import hl7
from pydantic import BaseModel, Field

from triage.priority import ClinicalPriority, PriorityClass
from triage.worklist import OrderItem, OrderStatus

SUPPORTED = {("ORM", "O01"), ("OMI", "O23")}
TEXT_LIMIT = 512
MAX_ORDERS = 100  # requested procedures taken from one message
_CONTROL_STATUS = {
    "NW": OrderStatus.ACTIVE, "XO": OrderStatus.ACTIVE, "SC": OrderStatus.ACTIVE,
    "CA": OrderStatus.CANCELLED, "OC": OrderStatus.CANCELLED, "CR": OrderStatus.CANCELLED,
    "DC": OrderStatus.DISCONTINUED, "OD": OrderStatus.DISCONTINUED,
    "DR": OrderStatus.DISCONTINUED,
}
# HL7 table 0027 (priority) values that make the study urgent before any analysis.
URGENT_PRIORITIES = {"S": "STAT", "A": "ASAP"}
PRIORITY_NAMES = {"S": "STAT", "A": "ASAP", "R": "Routine", "P": "Pre-op", "C": "Callback",
                  "T": "Timing critical", "PRN": "As needed"}
PATIENT_CLASSES = {"E": "Emergency", "I": "Inpatient", "O": "Outpatient",
                   "P": "Preadmit", "R": "Recurring", "B": "Obstetrics", "U": "Unknown"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


class OrderError(Exception):
    """A message that cannot be taken: ``answer`` is the ACK code it gets (AR: rejected as
    a message, AE: an error in what it says)."""

    def __init__(self, answer: str, reason: str) -> None:
        super().__init__(reason)
        self.answer = answer
        self.reason = reason


class PatientIdentifier(BaseModel):
    id: str
    issuer: str = Field(default="", description="Assigning authority (namespace)")
    issuer_uid: str = Field(default="", description="Assigning authority (universal id)")


class Order(BaseModel):
    """One order as the RIS last described it."""

    key: str
    sender: str
    message_type: str
    version: str
    control_id: str
    message_time: datetime | None = None
    control: str
    status: OrderStatus
    placer_order_number: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    study_uid: str = ""
    patients: list[PatientIdentifier] = Field(default_factory=list)
    priority_code: str = ""
    patient_class: str = ""
    ordering_location: str = ""
    clinical_question: str = ""
    procedure: str = ""
    procedure_code: str = ""
    procedure_coding_system: str = ""
    received_at: datetime
    updated_at: datetime

    def floor(self) -> ClinicalPriority:
        """What the order says of the study's urgency; a cancelled or discontinued order
        says nothing (and lowers nothing that was raised)."""
        if self.status is not OrderStatus.ACTIVE:
            return ClinicalPriority(PriorityClass.ROUTINE)
        reasons = []
        if self.priority_code in URGENT_PRIORITIES:
            reasons.append(f"clinical: {URGENT_PRIORITIES[self.priority_code]} order (RIS)")
        if self.patient_class == "E":
            reasons.append("clinical: emergency patient (RIS order)")
        return ClinicalPriority(PriorityClass.URGENT if reasons else PriorityClass.ROUTINE,
                                tuple(reasons))

    def item(self) -> OrderItem:
        return OrderItem(
            key=self.key, sender=self.sender, placer_order_number=self.placer_order_number,
            filler_order_number=self.filler_order_number,
            accession_number=self.accession_number, status=self.status,
            order_control=self.control, priority_code=self.priority_code,
            priority=self.floor().priority, patient_class=self.patient_class,
            ordering_location=self.ordering_location,
            clinical_question=self.clinical_question, procedure=self.procedure,
            procedure_code=self.procedure_code,
            procedure_coding_system=self.procedure_coding_system,
            received_at=self.received_at, updated_at=self.updated_at)


def matches(order: Order, *, study_uid: str, accession_number: str, patient_id: str,
            issuer: str) -> bool:
    """Whether ``order`` belongs to the study described by the other arguments."""
    if order.study_uid:
        return order.study_uid == study_uid
    if not order.accession_number or order.accession_number != accession_number.strip():
        return False
    patient_id, issuer = patient_id.strip(), issuer.strip().upper()
    if not patient_id:
        return False
    for patient in order.patients:
        if patient.id != patient_id:
            continue
        named = {n.upper() for n in (patient.issuer, patient.issuer_uid) if n}
        if not issuer or not named or issuer in named:
            return True
    return False


# -- reading a message ---------------------------------------------------------------------

def _clean(value: str, limit: int = TEXT_LIMIT) -> str:
    return _CONTROLS.sub(" ", value).strip()[:limit]


class _Reader:
    """Values of one parsed message, unescaped; '' for anything absent."""

    def __init__(self, message: hl7.Message) -> None:
        self.message = message

    def header(self, key: str) -> str:
        try:
            return _clean(self.message.unescape(str(self.message[key])))
        except (KeyError, IndexError, ValueError):
            return ""

    def value(self, segment: hl7.Segment | None, field: int, component: int = 1,
              subcomponent: int = 1, repetition: int = 1) -> str:
        if segment is None:
            return ""
        try:
            raw = segment.extract_field(1, field, repetition, component, subcomponent)
        except (KeyError, IndexError, ValueError):
            return ""
        return _clean(self.message.unescape(str(raw)))

    def repetitions(self, segment: hl7.Segment | None, field: int) -> int:
        if segment is None or len(segment) <= field:
            return 0
        value = segment[field]
        if isinstance(value, list) and value and isinstance(value[0], hl7.Repetition):
            return len(value)
        return 1


def _segment_name(segment: hl7.Segment) -> str:
    return str(segment[0]).strip().upper()


def _message_time(value: str, zone: tzinfo = UTC) -> datetime | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]); one without an offset is in
    ``zone`` (the site's)."""
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?"
                         r"([+-]\d{4})?", value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, offset = match.groups()
    tz = zone
    if offset:
        sign = 1 if offset[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    try:
        return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0),
                        int(minute or 0), int(second or 0), tzinfo=tz).astimezone(UTC)
    except ValueError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return ()


def parse_message(text: str) -> hl7.Message:
    """Parse HL7 v2 text (segments ended by CR, LF or CRLF). Raises ``OrderError`` (AR)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\n\x00 ")
    # Blank lines between segments (some senders write them) are no segments.
    text = "\r".join(line for line in text.split("\r") if line.strip())
    if not text.startswith("MSH") or len(text) < 8:
        raise OrderError("AR", "not an HL7 v2 message (no MSH segment first)")
    try:
        return hl7.parse(text)
    except Exception as error:  # python-hl7 raises several kinds on malformed input
        raise OrderError("AR", f"not parseable as HL7 v2 ({type(error).__name__})") from error


def header(message: hl7.Message, key: str) -> str:
    """A value of the message's header (``"MSH.10"``, ``"MSH.3.1.1"``), unescaped; ''
    when absent."""
    return _Reader(message).header(key)


def message_type(message: hl7.Message) -> tuple[str, str]:
    reader = _Reader(message)
    return reader.header("MSH.9.1.1").upper(), reader.header("MSH.9.1.2").upper()


def read_orders(message: hl7.Message, *, sender: str, received_at: datetime,
                zone: tzinfo = UTC) -> list[Order]:
    """The orders of an ORM^O01 or OMI^O23 message, one per requested procedure (an order
    with several IPC segments gives several). Raises ``OrderError``. ``zone``: the time zone
    of times written without an offset."""
    reader = _Reader(message)
    code, event = message_type(message)
    version = reader.header("MSH.12.1.1")
    if (code, event) not in SUPPORTED:
        raise OrderError("AR", f"message type {code}^{event} is not accepted here "
                               "(ORM^O01 and OMI^O23 only)")
    numbers = _version_tuple(version)
    if not numbers or numbers < (2, 3):
        raise OrderError("AR", f"HL7 version {version or '(none)'} is not supported (2.3 "
                               "and later)")
    if code == "OMI" and numbers < (2, 5):
        raise OrderError("AR", f"OMI^O23 exists from HL7 v2.5, not in v{version}")
    control_id = reader.header("MSH.10")
    if not control_id:
        raise OrderError("AR", "MSH-10 (message control ID) is empty")
    segments = list(message)
    pid = next((s for s in segments if _segment_name(s) == "PID"), None)
    pv1 = next((s for s in segments if _segment_name(s) == "PV1"), None)
    zds = next((s for s in segments if _segment_name(s) == "ZDS"), None)
    patients = _patients(reader, pid)
    groups = _order_groups(segments)
    if not groups:
        raise OrderError("AE", "the message has no order (ORC segment)")
    common = {
        "sender": sender, "message_type": f"{code}^{event}", "version": version,
        "control_id": control_id,
        "message_time": _message_time(reader.header("MSH.7"), zone),
        "patients": patients, "patient_class": reader.value(pv1, 2).upper()[:8],
        "received_at": received_at, "updated_at": received_at,
    }
    orders = []
    for group in groups:
        for ipc in group.get("IPC", [None]):
            orders.append(_order(reader, group, ipc, zds, pv1, common,
                                 new_tq1=numbers >= (2, 5)))
    if len(orders) > MAX_ORDERS:
        raise OrderError("AE", f"{len(orders)} requested procedures in one message; at most "
                               f"{MAX_ORDERS} are taken")
    return orders


def _patients(reader: _Reader, pid: hl7.Segment | None) -> list[PatientIdentifier]:
    found = []
    for repetition in range(1, reader.repetitions(pid, 3) + 1):
        identifier = reader.value(pid, 3, 1, 1, repetition)
        if identifier:
            found.append(PatientIdentifier(
                id=identifier[:64], issuer=reader.value(pid, 3, 4, 1, repetition)[:64],
                issuer_uid=reader.value(pid, 3, 4, 2, repetition)[:64]))
    return found


def _order_groups(segments: Sequence[hl7.Segment]) -> list[dict[str, Any]]:
    """One dict per ORC: its ORC, the first TQ1 and OBR before the next ORC, and every IPC
    (``"IPC"``: a list; one requested procedure each)."""
    groups: list[dict[str, Any]] = []
    for segment in segments:
        name = _segment_name(segment)
        if name == "ORC":
            groups.append({"ORC": segment})
        elif groups and name == "IPC":
            groups[-1].setdefault("IPC", []).append(segment)
        elif groups and name in ("TQ1", "OBR") and name not in groups[-1]:
            groups[-1][name] = segment
    return groups


def _order(reader: _Reader, group: dict[str, Any], ipc: hl7.Segment | None,
           zds: hl7.Segment | None, pv1: hl7.Segment | None, common: Mapping[str, Any], *,
           new_tq1: bool) -> Order:
    orc, obr, tq1 = (group.get(n) for n in ("ORC", "OBR", "TQ1"))
    control = reader.value(orc, 1).upper()
    if control not in _CONTROL_STATUS:
        raise OrderError("AE", f"order control {control or '(empty)'} is not handled "
                               f"({', '.join(sorted(_CONTROL_STATUS))})")
    placer = reader.value(orc, 2) or reader.value(obr, 2)
    filler = reader.value(orc, 3) or reader.value(obr, 3)
    accession = reader.value(ipc, 1) or reader.value(obr, 18) or filler
    study_uid = reader.value(ipc, 3) or reader.value(zds, 1)
    if study_uid and not (_UID.match(study_uid) and len(study_uid) <= 64):
        raise OrderError("AE", "the Study Instance UID (IPC-3 or ZDS-1) is not a valid UID")
    priorities = [reader.value(tq1, 9)] if new_tq1 else []
    priorities += [reader.value(orc, 7, 6), reader.value(obr, 27, 6)]
    priority = next((p.upper() for p in priorities if p), "")[:8]
    patients = common["patients"]
    if not study_uid and not (accession and patients):
        raise OrderError("AE", "the order has neither a Study Instance UID (IPC-3, ZDS-1) nor "
                               "an accession number (IPC-1, OBR-18) with a patient ID (PID-3)")
    reasons = [reader.value(obr, 31, 2) or reader.value(obr, 31, 1), reader.value(obr, 13)]
    question = " / ".join(r for r in reasons if r)
    procedure_field = 4 if reader.value(obr, 4, 1) or reader.value(obr, 4, 2) else 44
    procedure = (reader.value(obr, procedure_field, 2)
                 or reader.value(obr, procedure_field, 1))
    procedure_code = reader.value(obr, procedure_field, 1)[:64]
    procedure_system = reader.value(obr, procedure_field, 3)[:32]
    location = reader.value(orc, 13) or reader.value(pv1, 3)
    # One order may request several procedures (each its own study, IHE scheduled
    # workflow): the requested procedure (IPC-2, OBR-19), else its study, tells them apart.
    # Without those, several IPC of one order are told apart by their studies; a single one
    # is the order itself, whatever study the RIS later corrects it to.
    several = len(group.get("IPC", [])) > 1
    requested = (reader.value(ipc, 2) or reader.value(obr, 19)
                 or (study_uid or accession if several else ""))
    identity = f"{placer or filler}\x00{requested}"
    key = hashlib.sha256(f"{common['sender']}\x00{identity}".encode()).hexdigest()[:32]
    return Order(key=key, control=control, status=_CONTROL_STATUS[control],
                 placer_order_number=placer[:64], filler_order_number=filler[:64],
                 accession_number=accession[:64], study_uid=study_uid,
                 priority_code=priority, ordering_location=location[:128],
                 clinical_question=question, procedure=procedure[:128],
                 procedure_code=procedure_code, procedure_coding_system=procedure_system,
                 **common)
