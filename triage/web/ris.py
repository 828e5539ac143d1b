"""How the pages show the RIS orders matched to a study (HL7 v2 ORM^O01 / OMI^O23).

Codes are spelled out for people: the priority as the RIS sent it (HL7 tables 0027 and 0485,
TQ1-9 or the priority component of ORC-7 / OBR-27) and the patient class (HL7 table 0004,
PV1-2), with the names ``triage.ris.orders`` gives them. A code outside those tables is
shown as sent.
"""

from __future__ import annotations

from triage.ris.orders import PATIENT_CLASSES, PRIORITY_NAMES
from triage.worklist import OrderItem, OrderStatus, WorklistItem

# HL7 table 0485: TS<n>, TM<n>, ... are timing critical within n seconds, minutes, ...
_WITHIN = {"S": "seconds", "M": "minutes", "H": "hours", "D": "days", "W": "weeks",
           "L": "months"}
ENDED = {OrderStatus.CANCELLED: "Order cancelled", OrderStatus.DISCONTINUED: "Order discontinued"}
QUESTION_CHARS = 90


def _first_component(code: str) -> str:
    return code.split("^", 1)[0].strip().upper()


def order_priority(code: str) -> str:
    """The priority as the RIS sent it, spelled out: ``S`` is "STAT", ``TM30`` is "Timing
    critical (within 30 minutes)"; empty when none was sent."""
    value = _first_component(code)
    if not value:
        return ""
    if value in PRIORITY_NAMES:
        return f"{PRIORITY_NAMES[value]} ({value})"
    if len(value) > 2 and value[0] == "T" and value[1] in _WITHIN and value[2:].isdigit():
        return f"Timing critical (within {int(value[2:])} {_WITHIN[value[1]]}) ({value})"
    return code.strip()


def patient_class(code: str) -> str:
    """PV1-2 spelled out: ``E`` is "Emergency"; empty when none was sent."""
    value = _first_component(code)
    if not value:
        return ""
    return f"{PATIENT_CLASSES[value]} ({value})" if value in PATIENT_CLASSES else code.strip()


def order_ended(order: OrderItem) -> str:
    """"Order cancelled" or "Order discontinued"; empty for an active order."""
    return ENDED.get(order.status, "")


def _single_line(text: str) -> str:
    return " ".join(text.split())


def row_order(item: WorklistItem) -> dict[str, str]:
    """What a worklist row shows of the study's orders, kept to one short line each:
    ``question`` (the clinical question of the newest active order, else of the newest
    order), ``question_full`` (all of it, for the row's tooltip) and ``ended`` ("order
    cancelled" or "order discontinued" when every order matched to the study ended so; with
    the count when only some did)."""
    if not item.orders:
        return {"question": "", "question_full": "", "ended": ""}
    newest = sorted(item.orders, key=lambda o: o.updated_at, reverse=True)
    active = [o for o in newest if o.status is OrderStatus.ACTIVE]
    full = _single_line(next((o.clinical_question for o in (*active, *newest)
                              if o.clinical_question.strip()), ""))
    short = full if len(full) <= QUESTION_CHARS else full[:QUESTION_CHARS - 1].rstrip() + "…"
    ended = [o for o in newest if o.status is not OrderStatus.ACTIVE]
    label = ""
    if ended:
        states = {o.status for o in ended}
        label = (ENDED[ended[0].status] if len(states) == 1 else "Order ended").lower()
        if active:
            label += f" ({len(ended)} of {len(item.orders)})"
    return {"question": short, "question_full": full, "ended": label}
