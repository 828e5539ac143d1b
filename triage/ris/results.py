"""Preliminary results to the RIS as HL7 v2 ORU^R01 messages over MLLP (v2.3 and v2.5.1).

Each result (one SR of the service) is one message: PID of the study's patient, ORC/OBR of the
matched order (placer and filler numbers, the accession number in OBR-18 as IHE Scheduled
Workflow has it), and OBX segments for the AI priority, each finding with its probability and
the model that produced it, the Study Instance UID and the SR SOP Instance UID. Every result
status is ``P`` (preliminary, HL7 table 0085/0123): no radiologist has verified it.

Messages are built with hl7apy at its strict validation level, never by joining strings, and
validated before they leave. The message control id (MSH-10) is derived from the destination
and the SR, so a message sent again after a lost acknowledgement is recognisably the same one.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import partial

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Element, Message
from hl7apy.exceptions import HL7apyException
from hl7apy.factories import datatype_factory

from triage.delivery import _attempt, configured, current_result
from triage.errors import PermanentError, TransientError
from triage.settings import RisDestination, Settings
from triage.worklist import FindingItem, OrderStatus, WorklistItem, utcnow

STRICT = VALIDATION_LEVEL.STRICT
PRELIMINARY = "P"  # HL7 table 0123 (OBR-25) and 0085 (OBX-11)
CONTROL_ID_LENGTH = 20  # MSH-10 is ST of at most 20 characters
LOCAL_CODES = "99TRIAGE"  # HL7 local coding system of this service's own codes
SERVICE = ("AI-TRIAGE", "AI triage of imaging study", LOCAL_CODES)
PRIORITY = ("AI-PRIORITY", "AI triage priority", LOCAL_CODES)
OUTCOME = ("AI-OUTCOME", "AI outcome of a model", LOCAL_CODES)
NO_FINDING = ("NEGATIVE", "No finding", LOCAL_CODES)
STUDY_UID = ("110180", "Study Instance UID", "DCM")
SR_UID = ("AI-SR-UID", "AI result SR SOP Instance UID", LOCAL_CODES)
PROBABILITY_UNIT = ("1", "", "UCUM")

# MLLP framing (HL7 v2 Minimal Lower Layer Protocol): <VT> message <FS><CR>.
START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\r"
MAX_ACK_BYTES = 65_536
ACCEPTED = ("AA", "CA")
REJECTED = ("AR", "CR")

_DA = re.compile(r"^\d{8}$")
# Longest value of the IS data type (HD-1 namespace id): longer names go to HD-2.
_IS_LENGTH = 20


def message_control_id(destination_name: str, sr_uid: str) -> str:
    """MSH-10 of the result ``sr_uid`` sent to ``destination_name``: the same for every
    attempt, different per destination and result."""
    digest = hashlib.sha256(f"{destination_name}\n{sr_uid}".encode()).hexdigest()
    return digest[:CONTROL_ID_LENGTH]


def oru_message(settings: Settings, destination: RisDestination, item: WorklistItem) -> str:
    """The ORU^R01 of the item's result for ``destination``, as ER7 text (segments separated
    by carriage returns), validated strictly."""
    if not item.sr_sop_instance_uid:
        raise ValueError("the study has no result to send")
    if not item.patient_id:
        raise ValueError("the study has no Patient ID, which PID-3 requires")
    builder = _OruBuilder(settings, destination, item)
    message = builder.build()
    message.validate()  # raises on any structural or data type error
    text = str(message.to_er7())
    _check(text, builder.control_id)
    return text


class _OruBuilder:
    """Fills one strict hl7apy ORU^R01 of the item's result, in the layout of its version."""

    def __init__(self, settings: Settings, destination: RisDestination,
                 item: WorklistItem) -> None:
        self.settings = settings
        self.destination = destination
        self.item = item
        self.version = destination.version
        self.zone = settings.site_zone
        self.control_id = message_control_id(destination.name, item.sr_sop_instance_uid or "")
        self.analysed = (item.analysed_at or utcnow()).astimezone(self.zone)
        # The order the result answers: the latest one still active (a cancelled order's
        # numbers would file it against the wrong request).
        active = [o for o in item.orders if o.status is OrderStatus.ACTIVE]
        self.order = max(active, key=lambda o: o.updated_at) if active else None

    def build(self) -> Message:
        message = Message("ORU_R01", version=self.version, validation_level=STRICT)
        self._msh(message.msh)
        result = message.add_group("ORU_R01_PATIENT_RESULT" if self.version == "2.5.1"
                                   else "ORU_R01_RESPONSE")
        self._pid(result.add_group("ORU_R01_PATIENT").pid)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        self._orc(order.orc)
        self._obr(order.obr)
        for number, fill in enumerate(self._observations(), start=1):
            obx = order.add_group("ORU_R01_OBSERVATION").obx
            self._put(obx.obx_1, str(number))
            fill(obx)
            self._put(obx.obx_11, PRELIMINARY)
        return message

    # -- segments ---------------------------------------------------------------------------

    def _msh(self, msh: Element) -> None:
        self._hd(msh.msh_3, self.settings.hl7_application)
        self._hd(msh.msh_4, self.settings.hl7_facility)
        self._hd(msh.msh_5, self.destination.receiving_application)
        self._hd(msh.msh_6, self.destination.receiving_facility)
        self._timestamp(msh.msh_7, _ts(datetime.now(self.zone)))
        # MSH-9 is CM_MSG (two components) in v2.3 and MSG (with the structure) in v2.5.1.
        kind = ("ORU", "R01", "ORU_R01") if self.version == "2.5.1" else ("ORU", "R01")
        for index, value in enumerate(kind, start=1):
            self._put(getattr(msh.msh_9, f"{msh.msh_9.datatype.lower()}_{index}"), value)
        if self.version == "2.5.1":
            self._put(msh.msh_18, "UNICODE UTF-8")
        self._put(msh.msh_10, self.control_id)
        self._put(msh.msh_11.pt_1, "P")  # production

    def _pid(self, pid: Element) -> None:
        item = self.item
        self._put(pid.pid_1, "1")
        cx = pid.pid_3
        self._put(cx.cx_1, item.patient_id)
        if item.issuer_of_patient_id:
            self._hd(cx.cx_4, item.issuer_of_patient_id)
        name = item.patient_name.split("=")[0].split("^")  # DICOM PN alphabetic group
        family, given, middle, prefix, suffix = (name + [""] * 5)[:5]
        if not (family or given):
            family = '""'  # HL7 null: PID-5 is required, the name is not known
        xpn = pid.pid_5
        self._put(xpn.xpn_1.fn_1 if self.version == "2.5.1" else xpn.xpn_1, family)
        for component, value in (("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix),
                                 ("xpn_5", prefix)):
            if value:
                self._put(getattr(xpn, component), value)
        if _valid_date(item.patient_birth_date):
            self._put(pid.pid_7.ts_1, item.patient_birth_date)
        if item.patient_sex in ("M", "F", "O"):  # DICOM and HL7 table 0001 agree on these
            self._put(pid.pid_8, item.patient_sex)

    def _orc(self, orc: Element) -> None:
        self._put(orc.orc_1, "RE")  # observations to follow
        self._order_numbers(orc.orc_2, orc.orc_3)
        if self.version == "2.3":
            self._quantity_timing(orc.orc_7)

    def _obr(self, obr: Element) -> None:
        self._put(obr.obr_1, "1")
        self._order_numbers(obr.obr_2, obr.obr_3)
        order = self.order
        # The procedure as ordered (code and coding system when the order gave them).
        service = ((order.procedure_code, order.procedure, order.procedure_coding_system)
                   if order and (order.procedure or order.procedure_code) else SERVICE)
        self._coded(obr.obr_4, service)
        self._timestamp(obr.obr_7, self._observed())
        accession = self.item.accession_number or (self.order.accession_number
                                                   if self.order else "")
        if accession:
            self._put(obr.obr_18, accession)
        self._timestamp(obr.obr_22, _ts(self.analysed))
        self._put(obr.obr_24, "RAD")
        self._put(obr.obr_25, PRELIMINARY)
        if self.version == "2.3":
            self._quantity_timing(obr.obr_27)

    def _observations(self) -> Iterator[Callable[[Element], None]]:
        """One filler per OBX: the priority, each finding, "no finding" for each model
        without a positive one, then the UIDs the RIS links the result with."""
        item = self.item
        priority = item.priority.value
        yield partial(self._coded_value, code=PRIORITY,
                      value=(priority.upper(), f"{priority.capitalize()} (AI)", LOCAL_CODES))
        for finding in item.findings:
            yield partial(self._finding, finding=finding)
        positive = {f.model for f in item.findings if f.positive}
        for model, version in self._models():
            if model not in positive:
                yield partial(self._no_finding, model=model, version=version)
        yield partial(self._text_value, code=STUDY_UID, value=item.study_instance_uid)
        yield partial(self._text_value, code=SR_UID, value=item.sr_sop_instance_uid or "")

    # -- observations -----------------------------------------------------------------------

    def _finding(self, obx: Element, finding: FindingItem) -> None:
        self._put(obx.obx_2, "NM")
        self._coded(obx.obx_3, (finding.code, finding.meaning, finding.scheme))
        obx.obx_5 = _er7_components(self.version, [f"{finding.probability:.4f}"])
        self._coded(obx.obx_6, PROBABILITY_UNIT)
        self._put(obx.obx_7, f"<{finding.threshold:g}")  # below the threshold: negative
        self._put(obx.obx_8, "A" if finding.positive else "N")  # HL7 table 0078
        self._timestamp(obx.obx_14, _ts(self.analysed))
        self._method(obx, finding.model, finding.model_version)

    def _no_finding(self, obx: Element, model: str, version: str) -> None:
        self._coded_value(obx, OUTCOME, NO_FINDING)
        self._method(obx, model, version)

    def _method(self, obx: Element, model: str, version: str) -> None:
        """The model and its version: OBX-17 (observation method), and in v2.5.1 OBX-18
        (equipment instance identifier) too."""
        self._coded(obx.obx_17, (model, f"{self._model_name(model)} {version}", LOCAL_CODES))
        if self.version == "2.5.1":
            self._put(obx.obx_18.ei_1, f"{model} {version}")
            if len(self.settings.hl7_application) <= _IS_LENGTH:
                self._put(obx.obx_18.ei_2, self.settings.hl7_application)

    def _coded_value(self, obx: Element, code: tuple[str, str, str],
                     value: tuple[str, str, str]) -> None:
        self._put(obx.obx_2, "CE")
        self._coded(obx.obx_3, code)
        obx.obx_5 = _er7_components(self.version, list(value))
        self._timestamp(obx.obx_14, _ts(self.analysed))

    def _text_value(self, obx: Element, code: tuple[str, str, str], value: str) -> None:
        self._put(obx.obx_2, "ST")
        self._coded(obx.obx_3, code)
        obx.obx_5 = _er7_components(self.version, [value])

    # -- values -----------------------------------------------------------------------------

    def _models(self) -> list[tuple[str, str]]:
        models = [(r.model, r.model_version) for r in self.item.results]
        models += [(f.model, f.model_version) for f in self.item.findings]
        return list(dict.fromkeys(models))

    def _model_name(self, model: str) -> str:
        return next((r.model_name for r in self.item.results if r.model == model and
                     r.model_name), model)

    def _observed(self) -> str:
        """The study date (a DICOM date, day precision), else when the study arrived."""
        if _valid_date(self.item.study_date):
            return self.item.study_date
        return _ts(self.item.received_at.astimezone(self.zone))

    def _order_numbers(self, placer: Element, filler: Element) -> None:
        if self.order is None:
            return
        if self.order.placer_order_number:
            self._put(placer.ei_1, self.order.placer_order_number)
        if self.order.filler_order_number:
            self._put(filler.ei_1, self.order.filler_order_number)

    def _quantity_timing(self, field: Element) -> None:
        """v2.3 requires ORC-7 and OBR-27: one procedure, with the order's priority."""
        self._put(field.tq_1.cq_simple_1, "1")
        if self.order is not None and self.order.priority_code:
            self._put(field.tq_6, self.order.priority_code)

    def _coded(self, field: Element, code: tuple[str, str, str]) -> None:
        for index, value in enumerate(code, start=1):
            if value:
                self._put(getattr(field, f"ce_{index}"), value)

    def _hd(self, field: Element, value: str) -> None:
        """An HD (hierarchic designator): HD-1 holds at most 20 characters (IS); a longer
        name goes to HD-2 with HD-3 ``L`` (a local identifier)."""
        if not value:
            return
        if len(value) <= _IS_LENGTH:
            self._put(field.hd_1, value)
        else:
            self._put(field.hd_2, value)
            self._put(field.hd_3, "L")

    def _timestamp(self, field: Element, value: str) -> None:
        """A TS field, through the data type of its first component (ST in v2.3, DTM in
        v2.5.1, which checks the format)."""
        self._put(field.ts_1, value)

    def _put(self, element: Element, value: str) -> None:
        """Set a primitive element through its data type: the library escapes the HL7
        delimiters and enforces the type's length."""
        element.value = datatype_factory(element.datatype, value, self.version, STRICT)


def _er7_components(version: str, components: list[str]) -> str:
    """OBX-5 (data type ``varies``): hl7apy takes its value as ER7 at the strict level, so
    each component is escaped by the library's ST type first."""
    return "^".join(str(datatype_factory("ST", c, version, STRICT).to_er7())
                    for c in components).rstrip("^")


def _ts(value: datetime) -> str:
    """HL7 v2 TS/DTM with seconds and the UTC offset."""
    return value.strftime("%Y%m%d%H%M%S%z")


def _valid_date(value: str) -> bool:
    if not _DA.match(value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def _check(text: str, control_id: str) -> None:
    """What strict hl7apy validation leaves out: table values and lengths this interface
    relies on (the result is preliminary, the control id fits MSH-10)."""
    message = hl7.parse(text)
    if str(message.segment("MSH")(10)) != control_id or len(control_id) > CONTROL_ID_LENGTH:
        raise ValueError("MSH-10 is not the message control id of this result")
    if str(message.segment("OBR")(25)) != PRELIMINARY:
        raise ValueError("OBR-25 must be P (preliminary)")
    if any(str(obx(11)) != PRELIMINARY for obx in message.segments("OBX")):
        raise ValueError("every OBX-11 must be P (preliminary)")


# -- sending ---------------------------------------------------------------------------------

def deliver_hl7(study_uid: str, sr_uid: str, destination_name: str) -> str:
    """RQ job: send the result ``sr_uid`` of the study to a RIS as an ORU^R01 over MLLP.

    The message is built again from the worklist item at each attempt; its control id stays
    the same, so the RIS recognises a message sent again after an acknowledgement was lost.
    """
    from triage.jobs import context

    ctx = context()
    destination = configured(ctx.settings.ris_destinations, destination_name, "RIS destination")

    def send() -> None:
        item = current_result(ctx.worklist, study_uid, sr_uid)
        try:
            message = oru_message(ctx.settings, destination, item)
        except HL7apyException as exc:  # its message would quote the value
            raise PermanentError(f"the result cannot be written as HL7 v2 "
                                 f"{destination.version}: {type(exc).__name__}") from exc
        except ValueError as exc:
            raise PermanentError(f"the result cannot be written as HL7 v2 "
                                 f"{destination.version}: {exc}") from exc
        exchange(destination, message, message_control_id(destination.name, sr_uid),
                 private=private_values(item))

    return _attempt(study_uid, sr_uid, destination_name, send, kind="hl7")


def exchange(destination: RisDestination, message: str, control_id: str,
             private: Iterable[str] = ()) -> None:
    """Send one message over MLLP and check its acknowledgement (original or enhanced mode,
    HL7 table 0008): returns when the RIS accepted it, raises ``TransientError`` when it may
    accept it later (error, no or garbled answer, unreachable) and ``PermanentError`` when it
    rejected it, with its reason (MSA-3), cleared of ``private`` values."""
    answer = _send_mllp(destination, message.encode("utf-8"))
    try:
        ack = hl7.parse(answer.decode("utf-8", errors="replace"))
        msa = ack.segment("MSA")
        code, acknowledged = str(msa(1)), str(msa(2))
        reason = ack.unescape(str(msa(3))) if len(msa) > 3 else ""
    except (KeyError, IndexError, ValueError, hl7.ParseException) as exc:
        raise TransientError(f"{destination.name} answered with a garbled acknowledgement"
                             ) from exc
    if acknowledged != control_id:
        raise TransientError(f"{destination.name} acknowledged another message")
    reason = cleared(reason, private)
    if code in ACCEPTED:
        return
    if code in REJECTED:
        raise PermanentError(f"{destination.name} rejected the result ({code})"
                             + (f": {reason}" if reason else ""))
    raise TransientError(f"{destination.name} could not accept the result ({code})"
                         + (f": {reason}" if reason else ""))


def _send_mllp(destination: RisDestination, payload: bytes) -> bytes:
    """One MLLP exchange: the framed message out, the framed answer back (its content)."""
    name, timeout = destination.name, destination.timeout_seconds
    try:
        connection = socket.create_connection((destination.host, destination.port),
                                              timeout=timeout)
    except TimeoutError as exc:
        raise TransientError(f"{name} unreachable: connection timed out") from exc
    except OSError as exc:
        raise TransientError(f"{name} unreachable: {exc.strerror or type(exc).__name__}"
                             ) from exc
    with connection:
        try:
            connection.sendall(START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN)
            return _read_block(connection, time.monotonic() + timeout, name)
        except TimeoutError as exc:
            raise TransientError(f"{name} did not acknowledge in time") from exc
        except OSError as exc:
            raise TransientError(f"{name} closed the connection without acknowledging "
                                 f"({exc.strerror or type(exc).__name__})") from exc


def _read_block(connection: socket.socket, deadline: float, name: str) -> bytes:
    received = b""
    while END_BLOCK not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        chunk = connection.recv(4096)
        if not chunk:
            raise TransientError(f"{name} closed the connection without acknowledging")
        received += chunk
        if len(received) > MAX_ACK_BYTES:
            raise TransientError(f"{name} answered with an oversized acknowledgement")
    start = received.find(START_BLOCK)
    return received[start + 1 if start >= 0 else 0:received.index(END_BLOCK)]


def private_values(item: WorklistItem) -> list[str]:
    """The patient's identifiers, name parts and birth date, and the order numbers, kept out
    of recorded errors."""
    parts = [item.patient_id, item.issuer_of_patient_id, item.accession_number,
             item.patient_birth_date]
    parts += [p for p in re.split(r"[\^= ]", item.patient_name)]
    parts += [n for o in item.orders for n in (o.placer_order_number, o.filler_order_number)]
    return [p for p in parts if len(p) >= 2]


def cleared(text: str, private: Iterable[str]) -> str:
    """``text`` (the receiver's own words) without the patient's identifiers (in any case),
    shortened."""
    for value in sorted((v for v in private if v), key=len, reverse=True):
        text = re.sub(re.escape(value), "…", text, flags=re.IGNORECASE)
    return text[:200]
